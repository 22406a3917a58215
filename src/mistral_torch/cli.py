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


# ---------------------------------------------------------------- convert
def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between HF and Mistral native formats",
                       description="Load SRC (HF folder, Mistral native folder or shipped model name) "
                                   "and write it to DST atomically; tokenizer files are copied along.")
    p.add_argument("src", metavar="SRC", help="checkpoint folder or shipped model name")
    p.add_argument("dst", metavar="DST", help="folder to write (must not exist unless --force)")
    p.add_argument("--to", required=True, choices=["hf", "mistral"], help="output format")
    p.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16 or fp16 (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="HF shard size limit (default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, resolve_model_path, save_model, tokenizer_files

    src = resolve_model_path(args.src)
    model = load_model(src, dtype=args.dtype)
    folder = src if src.is_dir() else src.parent
    try:
        save_model(model, args.dst, format=args.to, max_shard_size=args.max_shard_size,
                   overwrite=args.force, extra_files=tokenizer_files(folder))
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    print(f"wrote {args.dst} ({args.to}, {dtype}, {model.args.n_params:,} parameters)")
    return 0


# ---------------------------------------------------------------- entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_convert]  # add_<name> functions, in help order


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
