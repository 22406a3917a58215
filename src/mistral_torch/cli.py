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


# ---------------------------------------------------------------- generate
def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt (or a file of prompts, as one batch)",
                       description="Complete PROMPT (from stdin when absent or '-'), streaming the text; "
                                   "'\\n' in a prompt argument is a newline. With --batch-file, every line "
                                   "is a prompt, all run as one batch, and line i of the output is the "
                                   "completion of line i (newlines written as '\\n').")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="prompt text (default: read stdin)")
    p.add_argument("--batch-file", default=None, metavar="FILE", help="one prompt per line ('-': stdin)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is produced (default: on; single prompts only)")
    add_generation_flags(p, max_new_tokens=128)
    p.set_defaults(func=_generate)


def add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Model and sampling flags shared by `generate` and `chat`."""
    p.add_argument("--model", default=None, help="checkpoint folder or shipped model name (default: the shipped model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file, or v1 / v3 (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default: {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible output")
    p.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16 or fp16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="do not print speed figures on stderr")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter folder (PEFT format) to the model")
    p.add_argument("--quantize", default=None, metavar="METHOD",
                   help="quantize the weights after loading: int8, int4 or nf4 (quantize.py)")
    p.add_argument("--compile", action="store_true",
                   help="the fast decode step: on x86 AVX2/AVX-512 CPUs steps of up to 8 prompts (16 for small "
                        "models and, with AVX512_BF16, bf16 ones) run as one C++ call (~2.5x faster tokens, "
                        "int8 weights included: ~3.5x; nothing to compile; the kernels build once, ~20 s) and "
                        "larger batches, LoRA adapters and int4/nf4 weights through torch.compile (20-35 s warm-up the first "
                        "time, ~5 s later from inductor's on-disk cache); elsewhere torch.compile for all, "
                        "fp32 weights packed for oneDNN (2x their memory)")
    p.add_argument("--aot", action="store_true",
                   help="--compile, with the one-prompt steps the fused C++ step does not take (LoRA adapters, "
                        "int4/nf4 weights) compiled ahead of time by AOTInductor: one C++ call per token, "
                        "7-13 %% faster than torch.compile's on a CPU; ~30 s to build once, then loaded from "
                        "inductor's on-disk cache in about a second")
    p.add_argument("--eager", action="store_true",
                   help="plain PyTorch decoding, even where the fast C++ step is built (by default, once "
                        "--compile has built it on this machine, it runs without --compile: nothing to wait for)")
    add_kv_cache_flag(p)


def add_kv_cache_flag(p: argparse.ArgumentParser) -> None:
    """`--kv-cache` (generate, chat, serve); `cache_dtype` turns it into `Transformer.kv_cache_dtype`.
    The names are `cache.KV_DTYPES`' keys, repeated so that parsing needs no torch import."""
    p.add_argument("--kv-cache", default="auto", choices=["auto", "int8"],
                   help="what the key/value cache holds: the weights' dtype (auto), or int8 with one scale per "
                        "token and head: a quarter of fp32's memory (half of bf16's), logits within ~1e-2")


def cache_dtype(name: str):
    """The `--kv-cache` choice as `Transformer.kv_cache_dtype`."""
    from .cache import KV_DTYPES

    return KV_DTYPES[name]


def _unescape(text: str) -> str:
    r"""`\n` -> newline, `\t` -> tab, `\\` -> backslash (shells make real newlines awkward to type)."""
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _load_for_generation(args: argparse.Namespace):
    """(model, tokenizer, GenerationConfig) from the shared flags."""
    import torch

    from .checkpoint import load_model, resolve_model_path
    from .generate import GenerationConfig
    from .tokenizer import load_tokenizer

    config = GenerationConfig(  # checked first: a bad flag should not wait for the model to load
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=[_unescape(s) for s in args.stop],
        seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer else path)
    model = load_model(path, dtype=args.dtype, device=args.device)
    if args.adapter:  # LoRA: load, then fold into the weights (decoding then costs what the base does)
        from .lora import load_adapter, merge_adapter

        merge_adapter(load_adapter(model, args.adapter))
    if args.quantize:
        from .quantize import quantize_model

        model = quantize_model(model, args.quantize) or model
    model.kv_cache_dtype = cache_dtype(args.kv_cache)
    if args.compile or args.aot:
        model.compile_decode(aot=args.aot)
        if not args.quiet:
            print("[compiling the decode step: the first tokens wait for it]", file=sys.stderr, flush=True)
    elif not args.eager:
        _fast_decode_if_ready(model, quiet=args.quiet)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    return model, tokenizer, config


def _fast_decode_if_ready(model, quiet: bool) -> None:
    """Without --compile: the fused C++ decode step where it costs nothing to start (the kernels are
    built on this machine already), no compiler; else plain eager decoding, with a hint."""
    from . import fast

    if model.device.type != "cpu" or not fast.kernels_supported():
        return
    if fast.kernels_ready():
        model.compile_decode(backend=None, pack=False)
    elif not quiet:
        print("[tip: --compile builds this CPU's fast decode kernels once (~20 s); later runs use them "
              "by default]", file=sys.stderr, flush=True)


def _generate(args: argparse.Namespace) -> int:
    from .generate import GenerationStats, complete, stream

    if args.batch_file is not None:
        if args.prompt is not None:
            raise ValueError("give either a PROMPT or --batch-file, not both")
        source = sys.stdin if args.batch_file == "-" else open(args.batch_file, encoding="utf-8")
        with source:
            prompts = [_unescape(line.rstrip("\r\n")) for line in source if line.strip()]
        if not prompts:
            raise ValueError(f"no prompts in {args.batch_file}")
    elif args.prompt is None or args.prompt == "-":
        prompts = [sys.stdin.read().rstrip("\n")]
    else:
        prompts = [_unescape(args.prompt)]
    if any(not p.strip() for p in prompts):
        raise ValueError("empty prompt")
    model, tokenizer, config = _load_for_generation(args)
    stats = GenerationStats()
    if args.batch_file is None and args.stream:
        for piece in stream(model, tokenizer, prompts[0], config, stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        completions = complete(model, tokenizer, prompts, config, stats)
        for c in completions:
            text = c.text.replace("\\", "\\\\").replace("\n", "\\n") if args.batch_file is not None else c.text
            print(text)
    sys.stdout.flush()
    if not args.quiet:
        batch = f", batch of {len(prompts)}" if len(prompts) > 1 else ""
        print(f"[{stats.summary()}{batch}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- chat
def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat on the instruct template",
                       description="Chat with the model: one user message per line on stdin, replies "
                                   "streamed. /reset starts over, /exit (or end of input) quits. The oldest "
                                   "turns are dropped when the conversation outgrows the context.")
    p.add_argument("--system", default=None, help="system prompt")
    add_generation_flags(p, max_new_tokens=512)
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    from .generate import GenerationStats, context_limit, stream

    model, tokenizer, config = _load_for_generation(args)
    limit = context_limit(model)
    room = max(1, min(config.max_new_tokens, limit // 2))  # keep this much context free for a reply
    system = [{"role": "system", "content": _unescape(args.system)}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset starts over, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        message = line.rstrip("\r\n")
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            history = []
            print("[conversation reset]", file=sys.stderr)
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": _unescape(message)})
        ids = tokenizer.encode_chat(system + history)
        while len(ids) > limit - room and len(history) > 1:  # drop the oldest exchange
            history = history[2:]
            ids = tokenizer.encode_chat(system + history)
        if len(ids) >= limit:
            history.pop()
            print(f"chat: error: this message needs {len(ids)} tokens but the model's context is {limit} tokens",
                  file=sys.stderr)
            continue
        stats = GenerationStats()
        reply = []
        for piece in stream(model, tokenizer, ids, config, stats):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply) or " "})
        if not args.quiet:
            print(f"[{stats.summary()}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- convert
def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between HF, Mistral native and GGUF formats",
                       description="Load SRC (HF folder, Mistral native folder, .gguf file or shipped model name) "
                                   "and write it to DST atomically; tokenizer files are copied along "
                                   "(GGUF: the tokenizer and a chat template are embedded in the file).")
    p.add_argument("src", metavar="SRC", help="checkpoint folder, .gguf file or shipped model name")
    p.add_argument("dst", metavar="DST", help="folder (or .gguf file) to write (must not exist unless --force)")
    p.add_argument("--to", required=True, choices=["hf", "mistral", "gguf"], help="output format")
    p.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="GGUF tensor type (default: the model's dtype)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="merge this LoRA adapter into the weights first")
    p.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16 or fp16 (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="HF shard size limit (default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, resolve_model_path, save_model, tokenizer_files

    if args.to == "gguf" or args.src.endswith(".gguf") or args.adapter or args.outtype:
        from .gguf import convert_command  # GGUF in or out, or a LoRA merge on the way

        return convert_command(args)
    src = resolve_model_path(args.src)
    model = load_model(src, dtype=args.dtype)
    folder = src if src.is_dir() else src.parent
    try:
        save_model(model, args.dst, format=args.to, max_shard_size=args.max_shard_size,
                   overwrite=args.force, extra_files=tokenizer_files(folder))
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    dtype = str(model.dtype).removeprefix("torch.")
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
    p.add_argument("--quantize", default=None, metavar="METHOD",
                   help="quantize the weights after loading: int8, int4 or nf4 (quantize.py)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="load a LoRA adapter folder on top of the model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step, compiled before serving (30-60 s on a CPU; faster "
                        "decoding of the running batch; on x86 AVX2/AVX-512 CPUs with two C++ kernels built once, "
                        "and on AVX-512 and other CPUs with weights packed for oneDNN: 2x memory)")
    p.add_argument("--eager", action="store_true",
                   help="plain PyTorch decoding, even where the fast C++ step is built (by default, once "
                        "it is built on this machine, batches it takes run through it without --compile)")
    add_kv_cache_flag(p)
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
    model.kv_cache_dtype = cache_dtype(args.kv_cache)
    if args.compile:
        print("compiling the decode step for every batch size up to --max-batch-size ...", flush=True)
        model.eval().compile_decode().warm_up_decode(max_batch_size=args.max_batch_size)
    elif not args.eager:
        _fast_decode_if_ready(model, quiet=False)
    name = args.model_name or (args.model if args.model and not os.path.exists(args.model) else path.name)
    api_key = args.api_key or os.environ.get("MISTRAL_TORCH_API_KEY") or None
    print(f"serving {name} ({model.args.n_params:,} parameters) at http://{args.host}:{args.port}/ "
          f"(chat page at /, API at /v1{', API key required' if api_key else ''})", flush=True)
    serve(model.eval(), tokenizer, name, args.host, args.port, api_key=api_key,
          max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_body_bytes=parse_size(args.max_body_size), shutdown_timeout=args.shutdown_timeout,
          access_log=args.access_log)
    return 0


# ---------------------------------------------------------------- evaluate
def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="perplexity, multiple-choice benchmarks, translation BLEU/chrF, lm-eval",
                       description="Evaluate a model: perplexity at several lengths (window on/off), MMLU/ARC/"
                                   "HellaSwag/TruthfulQA by log-likelihood, translation BLEU/chrF, or run "
                                   "lm-evaluation-harness with this model.")
    ev_sub = p.add_subparsers(dest="evaluate_command", required=True, metavar="EVALUATION")

    def model_flags(q: argparse.ArgumentParser, batch: int) -> None:
        q.add_argument("--model", default=None, help="checkpoint folder or shipped model name (default: the shipped model)")
        q.add_argument("--tokenizer", default=None, help="tokenizer file/name (default: the checkpoint's)")
        q.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's)")
        q.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter folder (PEFT format)")
        q.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        q.add_argument("--batch-size", type=int, default=batch, help=f"rows per forward (default: {batch})")
        q.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the results as JSON")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    q = ev_sub.add_parser("perplexity", help="token-level NLL / perplexity with strided windows",
                          description="Perplexity of a text file at several evaluation lengths, each window fed "
                                      "through the rolling KV cache in chunks, optionally with the sliding window "
                                      "disabled or forced, as a table (and a PNG plot with --plot).")
    model_flags(q, 1)
    q.add_argument("--data", required=True, help="UTF-8 text file (encoded as one stream after one BOS)")
    q.add_argument("--seq-len", default="256,1024,4096", help="comma-separated lengths (default: 256,1024,4096)")
    q.add_argument("--stride", default=None,
                   help="window step: tokens (capped at each length) or a fraction like 0.5 (default: the length)")
    q.add_argument("--window", default="model",
                   help="comma-separated: model (as loaded), none (disabled), or an integer (default: model)")
    q.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the file")
    q.add_argument("--plot", default=None, metavar="PNG", help="write a perplexity-vs-length plot")
    q.set_defaults(func=_evaluate_perplexity)

    q = ev_sub.add_parser("mc", help="multiple-choice benchmarks by log-likelihood (MMLU, ARC, HellaSwag, TruthfulQA)",
                          description="Score MMLU (5-shot), ARC-Easy/Challenge, HellaSwag, TruthfulQA MC1/MC2 "
                                      "(0-shot) from their original files, with lm-eval's prompts and metrics.")
    model_flags(q, 16)
    q.add_argument("--tasks", default="mmlu,arc_easy,arc_challenge,hellaswag",
                   help="comma-separated: mmlu, mmlu_<subject>, arc_easy, arc_challenge, hellaswag, "
                        "truthfulqa_mc1, truthfulqa_mc2 (default: mmlu,arc_easy,arc_challenge,hellaswag)")
    q.add_argument("--data-dir", default=None,
                   help="folder holding the data sets under their original file names")
    q.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="a task's file (MMLU: the folder with dev/ and test/); repeatable")
    q.add_argument("--shots", type=int, default=None, help="MMLU exemplars from dev (default: 5)")
    q.add_argument("--limit", type=int, default=None, help="first N items per task (MMLU: per subject)")
    q.add_argument("--self-check", action="store_true",
                   help="first compare our log-likelihoods with transformers' on the same weights")
    q.set_defaults(func=_evaluate_mc)

    q = ev_sub.add_parser("translate", help="BLEU and chrF of greedy translations (sacrebleu)",
                          description="Translate the source side of a TSV (en<TAB>fr per line) with the model's "
                                      "prompt template and score BLEU/chrF; lines sharing a source are its "
                                      "references.")
    model_flags(q, 32)
    q.add_argument("--data", required=True, help="TSV of en<TAB>fr pairs")
    q.add_argument("--reverse", action="store_true", help="French → English")
    q.add_argument("--limit", type=int, default=None, help="first N source sentences")
    q.add_argument("--template", default=None,
                   help="prompt with {source} (default: the shipped model's 'Translate: English → French\\n"
                        "English: {source}\\nFrench:', or its fr→en twin with --reverse)")
    q.add_argument("--max-new-tokens", type=int, default=128, help="longest translation (default: 128)")
    q.add_argument("--single-ref", action="store_true", help="score every line alone, not grouped by source")
    q.add_argument("--output", default=None, metavar="PATH", help="write the hypotheses, one per line")
    q.set_defaults(func=_evaluate_translate)

    q = ev_sub.add_parser("self-check", help="our log-likelihoods vs transformers' on the same weights",
                          description="Score a few known items with our batched scorer and with transformers' "
                                      "MistralForCausalLM holding the same weights; exit 1 if they disagree.")
    model_flags(q, 8)
    q.set_defaults(func=_evaluate_self_check)

    q = ev_sub.add_parser("lm-eval", help="run lm-evaluation-harness with --model mistral-torch",
                          description="lm-eval's own command line with this package's model registered; "
                                      "everything after `lm-eval` is passed on, e.g. "
                                      "--model_args pretrained=DIR --tasks arc_easy.")
    q.add_argument("args", nargs=argparse.REMAINDER, help="lm_eval arguments")
    q.set_defaults(func=_evaluate_lm_eval)


def _evaluate_load(args: argparse.Namespace):
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if getattr(args, "adapter", None):
        from .lora import load_adapter, merge_adapter

        merge_adapter(load_adapter(model, args.adapter))
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                         f"{model.args.vocab_size} embeddings (pass the right --tokenizer)")
    return model, tokenizer


def _evaluate_write_json(path: str | None, payload: dict) -> None:
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def _evaluate_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values


def _evaluate_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import evaluate as ev

    seq_lens = _evaluate_ints(args.seq_len, "--seq-len")
    stride = None
    if args.stride is not None:
        stride = float(args.stride) if "." in args.stride else int(args.stride)
        if stride <= 0:
            raise ValueError(f"--stride must be positive, got {args.stride}")
    windows = [ev.parse_window(w) for w in args.window.split(",") if w.strip()]
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    model, tokenizer = _evaluate_load(args)
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), bos=True)[:args.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{path} has fewer than 2 tokens")
    results = ev.perplexity(model, ids, seq_lens, stride, windows, args.batch_size,
                            progress=False if args.no_progress else None)
    print(f"{path.name}: {len(ids)} tokens (BOS + text), {len(ids) - 1} scored per setting")
    print(ev.perplexity_table(results))
    if args.plot:
        ev.plot_perplexity(results, args.plot, title=f"{path.name}: perplexity by evaluation length")
        print(f"wrote {args.plot}")
    _evaluate_write_json(args.json_path, {"data": str(path), "model": args.model, "tokens": len(ids),
                                          "results": [r.to_dict() for r in results]})
    return 0


def _evaluate_mc(args: argparse.Namespace) -> int:
    from . import evaluate as ev

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    paths = {}
    for spec in args.data:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--data expects TASK=PATH, got {spec!r}")
        paths[task.strip()] = path
        if task.strip() not in tasks:
            tasks.append(task.strip())
    items = []
    for task in tasks:
        if task in paths:
            path = paths[task]
        elif task.startswith("mmlu_") and "mmlu" in paths:
            path = paths["mmlu"]
        elif args.data_dir:
            path = ev.find_task_data(task, args.data_dir)
        else:
            raise ValueError(f"no data for {task}: pass --data-dir DIR or --data {task}=PATH")
        items += ev.load_task(task, path, shots=args.shots if task.startswith("mmlu") else None, limit=args.limit)
    model, tokenizer = _evaluate_load(args)
    check = None
    if args.self_check:
        check = ev.self_check(model, tokenizer, batch_size=args.batch_size)
        print(check.summary())
        if not check.ok:
            return 1
    n_requests = sum(len(it.choices) for it in items)
    print(f"{len(items)} items, {n_requests} continuations to score")
    results = ev.evaluate_mc(model, tokenizer, items, args.batch_size,
                             progress=False if args.no_progress else None)
    print(ev.results_table(results))
    _evaluate_write_json(args.json_path, {
        "model": args.model, "shots": {"mmlu": ev.DEFAULT_SHOTS["mmlu"] if args.shots is None else args.shots},
        "limit": args.limit, "results": [r.to_dict() for r in results],
        "self_check": None if check is None else {"ok": check.ok, "max_diff": check.max_diff}})
    return 0


def _evaluate_translate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import evaluate as ev
    from .data import get_template

    template = args.template or get_template("translate-fr-en" if args.reverse else "translate-en-fr").prompt
    template = template.replace("\\n", "\n")
    pairs = ev.read_translation_pairs(args.data, reverse=args.reverse, limit=args.limit,
                                      group_references=not args.single_ref)
    model, tokenizer = _evaluate_load(args)
    sources = [s for s, _ in pairs]
    hyps = ev.translate_eval(model, tokenizer, sources, template, args.batch_size, args.max_new_tokens,
                             progress=False if args.no_progress else None)
    scores = ev.translation_scores(hyps, [refs for _, refs in pairs])
    direction = "fr→en" if args.reverse else "en→fr"
    print(f"{direction}: {scores['sentences']} sentences (up to {scores['max_references']} references each)")
    print(f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}   ({scores['bleu_signature']})")
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        print(f"wrote {args.output}")
    _evaluate_write_json(args.json_path, {"data": args.data, "model": args.model, "direction": direction,
                                          "template": template, **scores})
    return 0


def _evaluate_self_check(args: argparse.Namespace) -> int:
    from . import evaluate as ev

    model, tokenizer = _evaluate_load(args)
    check = ev.self_check(model, tokenizer, batch_size=args.batch_size)
    for row in check.items:
        ref = row.get("transformers")
        print(f"  {row['continuation']!r:>22} {row['tokens']:>3} tokens  ours {row['ours']:12.6f}"
              + (f"  transformers {ref:12.6f}  diff {row['diff']:.2e}" if ref is not None else ""))
    print(check.summary())
    _evaluate_write_json(args.json_path, {"ok": check.ok, "max_diff": check.max_diff,
                                          "batch_diff": check.batch_diff, "items": check.items})
    return 0 if check.ok else 1


def _evaluate_lm_eval(args: argparse.Namespace) -> int:
    try:
        from .lm_eval_adapter import main as lm_eval_main
    except ImportError as exc:
        raise ValueError(f"lm-eval is not installed ({exc}); pip install 'mistral-torch[eval]'") from None
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if "--model" not in rest:
        rest = ["--model", "mistral-torch", *rest]
    try:
        lm_eval_main(rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ---------------------------------------------------------------- finetune: LoRA / QLoRA flags, memory plan
# Used by `finetune`: add_lora_flags(parser) declares the flags; lora_table(args, cfg.lora) merges them
# over a config's [lora] table; print_memory_plan(cfg) is --dry-run; report_peak_memory(...) follows a run.
def add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA / QLoRA (a [lora] table in the config does the same)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base")
    g.add_argument("--qlora", action="store_true",
                   help="LoRA over an NF4-quantized frozen base (implies --lora; turns on activation checkpointing)")
    g.add_argument("--r", type=int, default=None, help="adapter rank (default: 8)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha/r (default: 16)")
    g.add_argument("--dropout", type=float, default=None, help="dropout on the adapters' input (default: 0.05)")
    g.add_argument("--targets", default=None,
                   help="modules to adapt: comma-separated names (q_proj,v_proj) or all-linear (default: q_proj,v_proj)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scale alpha/sqrt(r)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the expected peak memory (full / LoRA / QLoRA) for this model, batch and length, and exit")


def lora_table(args: argparse.Namespace, table: dict | None) -> dict | None:
    """The config's [lora] table with the command-line LoRA flags applied (None: full fine-tuning)."""
    flags = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "targets": args.targets}
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.rslora:
        flags["use_rslora"] = True
    if args.qlora:
        flags["qlora"] = True
    if table is None and not (args.lora or args.qlora or flags):
        return None
    from .lora import LoRAConfig

    return LoRAConfig.from_dict({**(table or {}), **flags}).to_dict()


def print_memory_plan(cfg, world_size: int = 1) -> None:
    from .lora import config_method, format_plans, plans_for_config

    plans = plans_for_config(cfg, world_size)
    method = config_method(cfg)
    micro = max(1, cfg.batch_size // max(1, world_size))
    print(f"expected peak memory per process: batch {micro} x {cfg.seq_len} tokens, compute {cfg.dtype}, AdamW "
          f"(this run: {method}{', activation checkpointing' if cfg.activation_checkpointing else ''})")
    print(format_plans(plans))
    if cfg.data_format == "pairs":
        print(f"(pairs are padded to the longest example of each batch, usually far below seq_len={cfg.seq_len}: "
              "this is the worst case)")


def report_peak_memory(cfg, rss_before: int, world_size: int = 1) -> None:
    """After a run: measured peak RSS growth next to the planned peak of the method that ran."""
    from .lora import config_method, peak_rss_bytes, plans_for_config

    method = config_method(cfg)
    plan = {p.method: p for p in plans_for_config(cfg, world_size)}[method]
    measured = peak_rss_bytes() - rss_before
    print(f"peak memory ({method}): measured {measured / 2**20:,.0f} MiB above the pre-run baseline "
          f"(includes the tokenized data), planned {plan.total / 2**20:,.0f} MiB")


# ---------------------------------------------------------------- merge-lora
def add_merge_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model and save the result",
                       description="Load BASE, apply the PEFT-format LoRA adapter in ADAPTER, fold W + (alpha/r)·B·A "
                                   "into the weights and write a plain checkpoint to OUT (tokenizer files copied "
                                   "along). An adapter trained with --qlora is merged into the NF4 base it was "
                                   "trained on (dequantized), which is what its training loss measured.")
    p.add_argument("base", metavar="BASE", help="base checkpoint folder or shipped model name")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist unless --force)")
    p.add_argument("--dtype", default=None, help="weights dtype of OUT: fp32, bf16 or fp16 (default: the base's)")
    p.add_argument("--qlora-base", choices=["auto", "yes", "no"], default="auto",
                   help="merge into the NF4-quantized base (auto: when the adapter was trained with --qlora)")
    p.add_argument("--format", default="hf", choices=["hf", "mistral"], help="output format (default: hf)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_merge_lora)


def _merge_lora(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .checkpoint import load_model, resolve_model_path, save_model, tokenizer_files
    from .lora import ADAPTER_CONFIG, load_adapter, lora_modules, merge_lora, quantize_base_nf4

    adapter_cfg = Path(args.adapter) / ADAPTER_CONFIG
    if not adapter_cfg.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {args.adapter} (not a LoRA adapter folder)")
    trained_on_nf4 = bool(json.loads(adapter_cfg.read_text()).get("mistral_torch", {}).get("qlora"))
    src = resolve_model_path(args.base)
    model = load_model(src, dtype=args.dtype)
    dtype = model.dtype
    nf4 = args.qlora_base == "yes" or (args.qlora_base == "auto" and trained_on_nf4)
    if nf4:
        quantize_base_nf4(model)
    load_adapter(model, args.adapter)
    n = len(list(lora_modules(model)))
    merge_lora(model, dtype=dtype)
    folder = src if src.is_dir() else src.parent
    try:
        save_model(model, args.out, format=args.format, overwrite=args.force, extra_files=tokenizer_files(folder))
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    base = "the NF4-quantized base (dequantized)" if nf4 else "the base"
    print(f"merged {n} LoRA layers into {base}; wrote {args.out} ({args.format}, "
          f"{str(dtype).removeprefix('torch.')}, {model.args.n_params:,} parameters)")
    return 0


# ---------------------------------------------------------------- pretrain / finetune: shared training flags
# `pretrain` and `finetune` build a TrainConfig the same way: --config FILE (TOML or YAML), then the
# flags given (flags win), then --set KEY=VALUE for any other config key; `train.train` does the rest.
# Under `torchrun --nproc_per_node N` the same command runs on N processes (FSDP2, or --ddp).
def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="run config: a .toml or .yaml file of TrainConfig keys")
    g = p.add_argument_group("config overrides (default: the config file's value, else the built-in default)")
    for flag, kind, text in [
        ("--out-dir", str, "run folder: checkpoints, metrics.jsonl, loss.png, final/"),
        ("--model", str, "ModelArgs preset name (e.g. tiny, bench-125m)"),
        ("--init-from", str, "start from this model folder or shipped name"),
        ("--tokenizer", str, "tokenizer file/name, or sentencepiece:N to train one on the data"),
        ("--data", str, "data file(s), comma-separated"),
        ("--val-data", str, "validation file (default: a val_fraction split of --data)"),
        ("--template", str, "prompt template of supervised pairs"),
        ("--seq-len", int, "sequence length"),
        ("--batch-size", int, "GLOBAL batch: sequences per micro-step, over all processes"),
        ("--grad-accum", int, "micro-steps per optimizer step"),
        ("--max-steps", int, "optimizer steps"),
        ("--lr", float, "peak learning rate"),
        ("--min-lr", float, "final learning rate of the cosine decay"),
        ("--warmup-steps", int, "linear warmup steps"),
        ("--weight-decay", float, "AdamW decoupled weight decay (matrices only)"),
        ("--grad-clip", float, "gradient-norm clip"),
        ("--seed", int, "seed of initialisation and data order"),
        ("--eval-every", int, "steps between validation losses"),
        ("--ckpt-every", int, "steps between checkpoints"),
        ("--keep-last", int, "checkpoints kept"),
        ("--log-every", int, "steps between throughput updates"),
        ("--threads", int, "CPU threads per process"),
    ]:
        g.add_argument(flag, type=kind, default=None, help=text)
    g.add_argument("--data-format", choices=["text", "pairs"], default=None, help="text corpus or supervised pairs")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="compute dtype")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: CUDA when available")
    g.add_argument("--ddp", action="store_const", const="ddp", dest="parallel",
                   help="under torchrun: replicate with DDP instead of sharding with FSDP2")
    g.add_argument("--activation-checkpointing", action="store_const", const=True, default=None,
                   help="recompute each decoder layer in the backward pass")
    g.add_argument("--compile", action="store_const", const=True, default=None, help="torch.compile the model")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, value in TOML syntax (repeatable), e.g. --set 'betas=[0.9, 0.99]'")
    r = p.add_argument_group("resuming")
    r.add_argument("--resume", nargs="?", const="latest", default="latest", metavar="CKPT",
                   help="resume from CKPT (a checkpoints/step_* folder); default: the latest in --out-dir, if any")
    r.add_argument("--no-resume", dest="resume", action="store_const", const=None,
                   help="start from scratch (refused when --out-dir already holds checkpoints)")
    r.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N steps (resume later)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace, defaults: dict):
    """The TrainConfig of a `pretrain`/`finetune` command line (file, then `defaults` for keys it
    lacks, then flags, then --set)."""
    import tomllib

    from .train import TrainConfig, read_config_file

    raw = {**defaults, **(read_config_file(args.config) if args.config else {})}
    names = ["out_dir", "model", "init_from", "tokenizer", "data", "val_data", "template", "seq_len",
             "batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
             "grad_clip", "seed", "eval_every", "ckpt_every", "keep_last", "log_every", "threads",
             "data_format", "dtype", "device", "parallel", "activation_checkpointing", "compile"]
    raw.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            raw[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raw[key.strip()] = value  # a bare string
    if not raw.get("data"):
        raise ValueError("no training data: give --data or a config file with `data`")
    return TrainConfig.from_dict(raw)


def run_training(args: argparse.Namespace, cfg) -> int:
    import os
    from pathlib import Path

    from .train import latest_checkpoint, train

    if args.resume is None and latest_checkpoint(Path(cfg.out_dir)) is not None:
        raise ValueError(f"{cfg.out_dir} already holds checkpoints; resume (the default), or choose another --out-dir")
    result = train(cfg, resume=False if args.resume is None else args.resume, progress=not args.quiet,
                   stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        done = result["step"] >= cfg.max_steps
        print(f"step {result['step']}/{cfg.max_steps}, loss {result['loss']:.4f}; run folder {cfg.out_dir}"
              + (f" (model: {Path(cfg.out_dir) / 'final'})" if done and cfg.lora is None else ""))
    return 0


# ---------------------------------------------------------------- pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train a model on text corpora (1 process, or N under torchrun)",
                       description="Pre-train on plain-text / JSONL corpora packed into fixed-length sequences. "
                                   "Resumes from the latest checkpoint of --out-dir when there is one. Under "
                                   "`torchrun --nproc_per_node N` the same command trains with FSDP2 (or --ddp).")
    add_train_flags(p)
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    return run_training(args, train_config(args, {"data_format": "text"}))


# ---------------------------------------------------------------- finetune
def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune on supervised pairs: all weights (--full) or LoRA/QLoRA",
                       description="Fine-tune on supervised pairs (TSV or JSONL prompt/target) rendered through a "
                                   "prompt template, loss on the target tokens only. --full trains every weight; "
                                   "--lora / --qlora (or a [lora] table) train adapters on a frozen base.")
    p.add_argument("--full", action="store_true", help="full fine-tuning: every weight is trained")
    add_train_flags(p)
    add_lora_flags(p)
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    import os

    cfg = train_config(args, {"data_format": "pairs"})
    cfg.lora = lora_table(args, cfg.lora)
    if cfg.lora is not None and cfg.lora["qlora"]:
        cfg.activation_checkpointing = True  # QLoRA = NF4 base + adapters + activation checkpointing
    if args.full and cfg.lora is not None:
        raise ValueError("--full trains every weight; it cannot be combined with --lora/--qlora or a [lora] table")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        print_memory_plan(cfg, world)
        return 0
    if not args.full and cfg.lora is None:
        raise ValueError("choose --full (train every weight) or --lora / --qlora (adapters on a frozen base)")
    from .lora import peak_rss_bytes, return_freed_memory_to_os

    if cfg.lora is not None:
        return_freed_memory_to_os()  # glibc then returns freed activations: peak RSS tracks live tensors
    before = peak_rss_bytes()
    code = run_training(args, cfg)
    if int(os.environ.get("RANK", "0")) == 0 and cfg.lora is not None:
        report_peak_memory(cfg, before, world)
    return code


# ---------------------------------------------------------------- export-run
def add_export_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-run", help="turn a training run's checkpoint into a loadable model folder",
                       description="Write the latest (or --step N) checkpoint of RUN_DIR to DST as a transformers-format "
                                   "folder (config.json + model.safetensors) with the run's tokenizer beside it, "
                                   "ready for load_model / generate / chat. Sharded (FSDP) checkpoints work too.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's --out-dir")
    p.add_argument("dst", metavar="DST", help="model folder to write (must not exist unless --force)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16 or fp16 (default: fp32)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_export_run)


def _export_run(args: argparse.Namespace) -> int:
    from .train import export_run, find_checkpoint

    ckpt = find_checkpoint(args.run_dir, args.step)
    try:
        export_run(args.run_dir, args.dst, step=args.step, dtype=args.dtype, overwrite=args.force)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    print(f"wrote {args.dst} from {ckpt}")
    return 0


# ---------------------------------------------------------------- translate
def add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate sentences with the shipped translator (or any model "
                                         "trained on the translate-* templates)",
                       description="Translate TEXT, or every line of --file / stdin (one translation per "
                                   "line, in order, batched).")
    p.add_argument("text", nargs="?", default=None, help="sentence to translate (default: lines of stdin)")
    p.add_argument("--to", choices=["fr", "en"], default="fr", help="target language (default: fr)")
    p.add_argument("--file", default=None, metavar="FILE", help="one sentence per line ('-': stdin)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default: 32)")
    add_generation_flags(p, max_new_tokens=96)
    p.set_defaults(func=_translate)


def _translate(args: argparse.Namespace) -> int:
    import time

    from .translate import iter_translations

    if args.text is not None and args.file is not None:
        raise ValueError("give either TEXT or --file, not both")
    if args.text is not None:
        sentences = [args.text]
    else:
        stream = sys.stdin if args.file in (None, "-") else open(args.file, encoding="utf-8")
        with stream:
            sentences = [line.rstrip("\n") for line in stream if line.strip()]
        if not sentences:
            raise ValueError("nothing to translate: the input has no non-empty lines")
    model, tokenizer, config = _load_for_generation(args)
    options = {k: v for k, v in vars(config).items() if k not in ("max_new_tokens", "stop")}
    t0 = time.perf_counter()
    for line in iter_translations(model, tokenizer, sentences, to=args.to, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, stop=config.stop, **options):
        print(line, flush=True)
    if not args.quiet:
        dt = time.perf_counter() - t0
        print(f"[{len(sentences)} sentence(s) in {dt:.2f} s]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- quantize
def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint's weights (int8, int4, nf4)",
                       description="Read SRC (a float checkpoint folder or shipped model name) tensor by tensor, "
                                   "quantize every linear layer (and the token embedding) as it arrives, and write "
                                   "a safetensors checkpoint to DST whose config.json records the quantization; "
                                   "load_model and every command load it as quantized.")
    p.add_argument("src", metavar="SRC", help="checkpoint folder or shipped model name")
    p.add_argument("dst", metavar="DST", help="folder to write (must not exist unless --force)")
    p.add_argument("--method", required=True, choices=["int8", "int4", "nf4"],
                   help="int8: per-output-channel; int4: group-wise with scales and zeros; nf4: QLoRA's NF4 "
                        "with double-quantized block constants")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size: 32, 64, 128 or 256 (default: 32)")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="leave the token embedding in floating point (default: quantize it too)")
    p.add_argument("--dtype", default=None, help="dtype of the unquantized rest: fp32, bf16 or fp16 (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="shard size limit (default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from .checkpoint import resolve_model_path, tokenizer_files
    from .quantize import load_and_quantize, save_quantized, weight_bytes

    src = resolve_model_path(args.src)
    model = load_and_quantize(src, args.method, args.group_size, embeddings=not args.keep_embeddings,
                              dtype=args.dtype)
    folder = src if src.is_dir() else src.parent
    try:
        save_quantized(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.force,
                       extra_files=tokenizer_files(folder))
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    q = model.quantization
    group = f", group size {q['group_size']}" if q["method"] == "int4" else ""
    print(f"wrote {args.dst} ({q['method']}{group}, {weight_bytes(model) / 2**20:.1f} MiB of weights, "
          f"{model.args.n_params:,} parameters)")
    return 0


# ---------------------------------------------------------------- bench
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="decode and prefill speed of a checkpoint (vs transformers, llama.cpp)",
                       description="Run benchmarks/bench_decode.py and bench_prefill.py (from a source "
                                   "checkout) on --model, or on random weights of --preset.")
    p.add_argument("--model", default=None, help="checkpoint folder or shipped model name (default: --preset)")
    p.add_argument("--preset", default="bench-125m", help="random-weights shape when no --model (default: bench-125m)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (default: fp32,bf16)")
    p.add_argument("--batches", default="1", help="decode batch sizes, comma list (default: 1)")
    p.add_argument("--prompt", type=int, default=64, help="decode prompt tokens (default: 64)")
    p.add_argument("--new", type=int, default=128, help="new tokens (default: 128)")
    p.add_argument("--prefill", type=int, default=512, help="prefill benchmark prompt tokens; 0 skips it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also the compiled decode step (CPU: 20-35 s warm-up per batch size, ~5 s once cached)")
    p.add_argument("--int8", action="store_true",
                   help="also the model with int8 weights (decode: with --compile; llama.cpp q8_0 beside it)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument("--out", default="bench-results", help="folder for decode.json / prefill.json")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import importlib
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "bench_decode.py").is_file():
        raise FileNotFoundError(f"the benchmarks are not installed with the package; expected {folder} "
                                "(run from a source checkout: pip install -e .)")
    sys.path.insert(0, str(folder))
    common = [f"--preset={args.preset}", f"--dtypes={args.dtypes}", f"--repeats={args.repeats}",
              f"--device={args.device}", *([f"--model={args.model}"] if args.model else []),
              *([f"--threads={args.threads}"] if args.threads else []),
              *(["--no-hf"] if args.no_hf else []), *(["--no-llama"] if args.no_llama else []),
              *(["--int8"] if args.int8 else [])]
    importlib.import_module("bench_decode").main(
        [*common, f"--batches={args.batches}", f"--prompt={args.prompt}", f"--new={args.new}",
         f"--out={Path(args.out) / 'decode.json'}", *([] if args.compile else ["--no-compile"])])
    if args.prefill > 0:
        importlib.import_module("bench_prefill").main(
            [*common, f"--prompt={args.prefill}", f"--out={Path(args.out) / 'prefill.json'}"])
    return 0


# ---------------------------------------------------------------- entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_generate, add_chat, add_translate, add_convert, add_serve, add_evaluate, add_merge_lora, add_pretrain, add_finetune, add_export_run, add_quantize, add_bench]  # add_<name> functions, in help order


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
