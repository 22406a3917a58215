"""`mistral-torch`: one command, many subcommands, each a thin call into the modules.

Every subcommand is a pair: `add_<name>(subparsers)` declares its flags and sets `func`, which
does the work. `main` turns user errors (ValueError, FileNotFoundError) into one clear line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


# ---------------------------------------------------------------- subcommands (one section each)
# (sections are added below this line; keep each command's code inside its own section)


# ---------------------------------------------------------------- entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []  # add_<name> functions, in help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-torch", description="Mistral models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"mistral-torch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
