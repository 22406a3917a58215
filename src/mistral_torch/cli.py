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


# ---------------------------------------------------------------- serve
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                       description="Serve a model over HTTP: POST /v1/completions, /v1/chat/completions "
                                   "(streaming with \"stream\": true), GET /v1/models, /health, and a chat "
                                   "page at /. Stop with Ctrl-C or SIGTERM (requests in flight finish).")
    p.add_argument("--model", default=None, help="checkpoint folder or shipped model name (default: the shipped model)")
    p.add_argument("--model-name", default=None, help="model id reported by the API (default: from --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MISTRAL_TORCH_API_KEY if set)")
    p.add_argument("--max-batch-size", type=int, default=16, help="most requests decoded together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch row; more are refused with 429 (default: 64)")
    p.add_argument("--max-body-size", default="2MiB", help="largest request body, else 413 (default: 2MiB)")
    p.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16 or fp16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--quantize", default=None, metavar="METHOD", help="quantize the weights after loading")
    p.add_argument("--adapter", default=None, metavar="DIR", help="load a LoRA adapter folder on top of the model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight may take to finish after SIGTERM (default: 30)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("serving needs FastAPI and uvicorn: pip install 'mistral-torch[serve]'") from None
    import torch

    from .checkpoint import load_model, parse_size, resolve_model_path
    from .serve import serve
    from .tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    model = load_model(path, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(path)
    if args.quantize:
        from .quantize import quantize_model

        model = quantize_model(model, args.quantize) or model
    if args.adapter:
        from .lora import load_adapter

        model = load_adapter(model, args.adapter) or model
    name = args.model_name or (args.model if args.model and not os.path.exists(args.model) else path.name)
    api_key = args.api_key or os.environ.get("MISTRAL_TORCH_API_KEY") or None
    print(f"serving {name} ({model.args.n_params:,} parameters) at http://{args.host}:{args.port}/ "
          f"(chat page at /, API at /v1{', API key required' if api_key else ''})", flush=True)
    serve(model.eval(), tokenizer, name, args.host, args.port, api_key=api_key,
          max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_body_bytes=parse_size(args.max_body_size), shutdown_timeout=args.shutdown_timeout,
          access_log=args.access_log)
    return 0


# ---------------------------------------------------------------- entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_convert, add_serve]  # add_<name> functions, in help order


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
