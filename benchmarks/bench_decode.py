"""Decode speed: mistral-torch (eager, fused, compiled) vs transformers vs llama.cpp, one run.

    python benchmarks/bench_decode.py                         # bench-125m, fp32 + bf16, batch 1 and 8
    python benchmarks/bench_decode.py --dtypes fp32 --batches 1 --no-compile
    python benchmarks/bench_decode.py --dtypes bf16 --int8               # + int8 weights beside llama.cpp q8_0
    python benchmarks/bench_decode.py --device cuda --preset mistral-7b-v0.1 --dtypes bf16
    mistral-torch bench --model PATH                          # the same on a user's checkpoint

All contenders hold the same random weights (llama.cpp: a GGUF written from them: f32 beside
fp32, f16 beside bf16, and q8_0, which `--int8` meets with our int8 weights) and run interleaved, `--repeats` rounds, medians reported:
greedy decoding of `--new` tokens after a `--prompt`-token prompt. Reported per contender:
decode tokens/s (all rows, after the first token), time to first token (prefill + first
token), peak RSS (fresh process per contender, `--memory`), and % of the roofline, where the
roofline = copy bandwidth measured in the same run / weight bytes one decode step reads (on a
GPU a device-to-device copy of 1 GiB: the HBM's read + write bandwidth), and on a GPU
transformers with its static cache and torch.compile (reduce-overhead) beside its eager form.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mistral_torch import ModelArgs, Transformer  # noqa: E402

GGUF_FOR = {"fp32": ["f32"], "bf16": ["f16", "q8_0"], "fp16": ["f16", "q8_0"]}


# ---------------------------------------------------------------- one generation per contender
def ours(model: Transformer, prompt: torch.Tensor, new: int, compiled: Callable | None) -> dict[str, float]:
    """Greedy decoding through `Transformer.forward`; `compiled`: the compiled decode step, or None."""
    model._decode_step = compiled
    dev = prompt.device.type
    with torch.inference_mode():
        common.sync(dev)
        t0 = time.perf_counter()
        logits, cache = model(prompt, last_logits_only=True)
        tok = common.greedy(logits)
        common.sync(dev)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            logits, cache = model(tok, cache=cache)
            tok = common.greedy(logits)
        common.sync(dev)
        t2 = time.perf_counter()
    model._decode_step = None
    return {"ttft_s": t1 - t0, "tok_s": prompt.shape[0] * (new - 1) / (t2 - t1)}


def transformers_run(hf, prompt: torch.Tensor, new: int, static: bool = False) -> dict[str, float]:
    """Greedy decoding through `MistralForCausalLM.forward` and its cache (dynamic, or static)."""
    dev = prompt.device.type
    with torch.inference_mode():
        past = None
        if static:
            from transformers import StaticCache
            past = StaticCache(config=hf.config, max_cache_len=prompt.shape[1] + new)
        common.sync(dev)
        t0 = time.perf_counter()
        P = prompt.shape[1]
        kw = dict(cache_position=torch.arange(P, device=prompt.device)) if static else {}
        out = hf(input_ids=prompt, past_key_values=past, use_cache=True, logits_to_keep=1, **kw)
        past, tok = out.past_key_values, common.greedy(out.logits)
        common.sync(dev)
        t1 = time.perf_counter()
        for i in range(new - 1):
            kw = dict(cache_position=torch.tensor([P + i], device=prompt.device)) if static else {}
            out = hf(input_ids=tok, past_key_values=past, use_cache=True, **kw)
            past, tok = out.past_key_values, common.greedy(out.logits)
        common.sync(dev)
        t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "tok_s": prompt.shape[0] * (new - 1) / (t2 - t1)}


def llama_run(llm, prompt: list[int], new: int) -> dict[str, float]:
    import numpy as np

    vocab = llm.n_vocab()
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    t1 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([tok])
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "tok_s": (new - 1) / (t2 - t1)}


# ---------------------------------------------------------------- the benchmark
def build(args: argparse.Namespace, dtype: str) -> Transformer:
    if args.model:
        from mistral_torch.checkpoint import load_model
        return load_model(args.model, dtype=common.DTYPES[dtype], device=args.device).eval()
    return common.make_model(ModelArgs.from_name(args.preset), common.DTYPES[dtype], args.device)


def compile_step(model: Transformer, args: argparse.Namespace, prompt: torch.Tensor,
                 kernels: bool | None = None, aot: bool = False, fused: bool = True) -> tuple[Callable, float]:
    """The compiled decode step and its warm-up time (a first short generation, which compiles);
    `kernels=False`: without the C++ kernels (inductor's fused reductions and SDPA instead);
    `aot=True, fused=False`: batch-1 steps compiled ahead of time by AOTInductor; by default
    batch-1 steps run as one C++ call where they can (`fused.py`: nothing to compile)."""
    mode = "reduce-overhead" if args.device.startswith("cuda") else None
    model.compile_decode(mode=mode, kernels=kernels, aot=aot, fused=fused)
    fn = model._decode_step
    t0 = time.perf_counter()
    ours(model, prompt, 4, fn)
    return fn, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = common.threads_from_env(args.threads)
    dev = args.device
    results: dict[str, Any] = {"machine": common.machine(), "config": vars(args).copy(), "rows": []}
    bw = common.copy_bandwidth(device=dev)  # main memory, or a GPU's HBM: the roofline's bandwidth
    results["copy_bandwidth_GBps"] = bw / 1e9
    if dev.startswith("cuda"):
        results["machine"]["gpu"] = torch.cuda.get_device_name(dev)
    print(f"device {dev}; threads {threads}; copy bandwidth {bw / 1e9:.1f} GB/s", file=sys.stderr)
    have_llama = dev == "cpu" and not args.no_llama and common.llama_cpp_available()
    tmp = tempfile.TemporaryDirectory()
    rows = results["rows"]
    for dtype in args.dtypes:
        model = build(args, dtype)
        a = model.args
        wbytes = common.weight_bytes_per_token(model)
        g = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(3, a.vocab_size, (b, args.prompt), generator=g).to(dev) for b in args.batches}
        contenders: dict[str, Callable[[], dict[str, float]]] = {}
        meta: dict[str, dict[str, Any]] = {}
        fast = None if args.no_compile else common.twin(model)
        inductor = common.twin(model) if args.inductor_only and not args.no_compile else None
        aot = common.twin(model) if dev == "cpu" and 1 in prompts and not (args.no_compile or args.no_aot) else None
        int8 = None  # int8 weights (`quantize_model(.., "int8")`: linears, LM head, embedding), beside q8_0
        if args.int8 and dev == "cpu" and not args.no_compile:
            from mistral_torch.quantize import quantize_model
            int8 = quantize_model(common.twin(model), "int8")
        graph = None  # batches that the fused step takes: also torch.compile's step, for comparison
        if fast is not None and dev == "cpu" and any(b > 1 for b in prompts):
            graph = common.twin(model)
        for b, prompt in prompts.items():
            contenders[f"mistral-torch eager b{b}"] = lambda p=prompt: ours(model, p, args.new, None)
            meta[f"mistral-torch eager b{b}"] = dict(impl="mistral-torch", mode="eager", batch=b)
            if not args.no_compile:
                fn, warm = compile_step(fast, args, prompt)
                mode = "fused" if fast._fused_step is not None and b <= fast._fused_step.max_rows else "compiled"
                contenders[f"mistral-torch {mode} b{b}"] = lambda p=prompt, fn=fn: ours(fast, p, args.new, fn)
                meta[f"mistral-torch {mode} b{b}"] = dict(impl="mistral-torch", mode=mode, batch=b,
                                                          compile_warmup_s=warm)
                print(f"  {dtype} b{b} {mode} warm-up {warm:.1f} s", file=sys.stderr, flush=True)
            if int8 is not None:
                fn, warm = compile_step(int8, args, prompt)
                mode8 = "fused" if int8._fused_step is not None and b <= int8._fused_step.max_rows else "compiled"
                name = f"mistral-torch int8 {mode8} b{b}"
                contenders[name] = lambda p=prompt, fn=fn: ours(int8, p, args.new, fn)
                meta[name] = dict(impl="mistral-torch", mode=f"int8 {mode8}", batch=b, compile_warmup_s=warm,
                                  weight_bytes=common.weight_bytes_per_token(int8), weights="int8")
            if graph is not None and mode == "fused" and b > 1:
                name = f"mistral-torch compiled b{b}"
                fn, warm = compile_step(graph, args, prompt, fused=False)
                contenders[name] = lambda p=prompt, fn=fn: ours(graph, p, args.new, fn)
                meta[name] = dict(impl="mistral-torch", mode="compiled", batch=b, compile_warmup_s=warm)
                print(f"  {dtype} b{b} compiled warm-up {warm:.1f} s", file=sys.stderr, flush=True)
            if aot is not None and b == 1:
                name = "mistral-torch compiled AOT b1"
                fn, warm = compile_step(aot, args, prompt, aot=True, fused=False)
                contenders[name] = lambda p=prompt, fn=fn: ours(aot, p, args.new, fn)
                meta[name] = dict(impl="mistral-torch", mode="compiled AOT", batch=1, compile_warmup_s=warm)
                print(f"  {dtype} b1 AOT compile warm-up {warm:.1f} s", file=sys.stderr, flush=True)
            if inductor is not None:
                name = f"mistral-torch compiled, no C++ kernels b{b}"
                fn, warm = compile_step(inductor, args, prompt, kernels=False)
                contenders[name] = lambda p=prompt, fn=fn: ours(inductor, p, args.new, fn)
                meta[name] = dict(impl="mistral-torch", mode="compiled, no C++ kernels", batch=b, compile_warmup_s=warm)
        hf = None
        if not args.no_hf:
            hf = common.hf_model(model)
            for b, prompt in prompts.items():
                contenders[f"transformers eager b{b}"] = lambda p=prompt: transformers_run(hf, p, args.new)
                meta[f"transformers eager b{b}"] = dict(impl="transformers", mode="eager", batch=b)
            if dev.startswith("cuda"):
                hfc = common.hf_model(model)
                hfc.forward = torch.compile(hfc.forward, mode="reduce-overhead", fullgraph=True)
                for b, prompt in prompts.items():
                    name = f"transformers static+compile b{b}"
                    t0 = time.perf_counter()
                    try:  # the StaticCache API moves between transformers releases: the rest still runs
                        transformers_run(hfc, prompt, 4, static=True)
                    except Exception as e:
                        print(f"  {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                        continue
                    contenders[name] = lambda p=prompt: transformers_run(hfc, p, args.new, static=True)
                    meta[name] = dict(impl="transformers", mode="static cache + compile", batch=b,
                                      compile_warmup_s=time.perf_counter() - t0)
        llms = []
        if have_llama and 1 in prompts:
            for kind in GGUF_FOR[dtype]:
                path = common.write_gguf(model, Path(tmp.name) / f"m-{kind}.gguf", kind)
                llm = common.LlamaWorker(path, n_ctx=args.prompt + args.new + 8, threads=threads)
                llms.append(llm)
                ids = prompts[1][0].tolist()
                contenders[f"llama.cpp {kind} b1"] = lambda llm=llm, ids=ids: llm.run(ids, args.new)
                per_param = {"f32": 4, "f16": 2, "q8_0": 34 / 32}[kind]  # q8_0: 32 int8 + one f16 scale
                meta[f"llama.cpp {kind} b1"] = dict(impl="llama.cpp", mode=kind, batch=1,
                                                    weight_bytes=wbytes / model.lm_head.weight.element_size() * per_param)
        for fn in contenders.values():  # warm every contender once (allocators, oneDNN primitives)
            fn()
        # the roofline's bandwidth, measured between the contenders too
        contenders["copy bandwidth"] = lambda: {"bytes_per_s": common.copy_bandwidth(repeats=3, device=dev)}
        medians = common.interleave(contenders, args.repeats)
        if "copy bandwidth" in medians:
            bw = medians.pop("copy bandwidth")["bytes_per_s"]
            results.setdefault("copy_bandwidth_GBps_by_dtype", {})[dtype] = bw / 1e9
        for name, m in medians.items():
            row = dict(name=name, dtype=dtype, **meta[name], **m)
            wb = row.pop("weight_bytes", None) or wbytes
            row["weight_MB"] = wb / 1e6
            if bw and row["batch"] == 1:
                row["roofline_tok_s"] = bw / wb
                row["pct_roofline"] = 100 * row["tok_s"] / row["roofline_tok_s"]
            rows.append(row)
        for llm in llms:
            llm.close()
        del llms, hf, model, fast, inductor, graph, int8
        gc.collect()
    if args.memory and dev == "cpu":
        names = [r["name"] + "|" + r["dtype"] for r in rows if r["batch"] == 1]
        argv = child_argv(args)
        mem = common.peak_memory(__file__, names, argv)
        for r in rows:
            r["peak_rss_MB"] = mem.get(r["name"] + "|" + r["dtype"])
    summarize(results)
    tmp.cleanup()
    return results


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--preset", args.preset, "--prompt", str(args.prompt), "--new", str(args.new)]
    if args.model:
        argv += ["--model", args.model]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def child_setup(args: argparse.Namespace) -> tuple[str, Transformer, torch.Tensor]:
    """For a peak-memory child process (`--child NAME|DTYPE`): its contender name, model and prompt."""
    common.threads_from_env(args.threads)
    name, dtype = args.child.split("|")
    model = build(args, dtype)
    prompt = torch.randint(3, model.args.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    return name, model, prompt


def child(args: argparse.Namespace) -> None:
    """One contender alone in this process: build, warm up, generate; print peak RSS."""
    name, model, prompt = child_setup(args)
    if name.startswith("mistral-torch"):
        if " int8 " in name:
            from mistral_torch.quantize import quantize_model
            quantize_model(model, "int8")
        aot = "AOT" in name
        fn = compile_step(model, args, prompt, aot=aot, fused=not aot)[0] if "eager" not in name else None
        ours(model, prompt, args.new, fn)
    elif name.startswith("transformers"):
        hf = common.hf_model(model)
        del model
        gc.collect()
        transformers_run(hf, prompt, args.new)
    else:
        kind = name.split()[1]
        with tempfile.TemporaryDirectory() as tmp:
            path = common.write_gguf(model, Path(tmp) / "m.gguf", kind)
            del model
            gc.collect()
            llm = common.llama_cpp_model(path, n_ctx=args.prompt + args.new + 8, threads=torch.get_num_threads())
            llama_run(llm, prompt[0].tolist(), args.new)
    print(f"PEAK {common.peak_rss()}")


def summarize(results: dict[str, Any]) -> None:
    rows = results["rows"]
    cols = [("name", "contender", "s"), ("dtype", "dtype", "s"), ("tok_s", "decode tok/s", ".1f"),
            ("ttft_s", "TTFT s", ".3f"), ("pct_roofline", "% roofline", ".0f"),
            ("peak_rss_MB", "peak RSS MB", ".0f"), ("compile_warmup_s", "compile warm-up s", ".0f")]
    print(common.table(rows, cols))
    def best(impl: str, dtype: str | None = None, b: int = 1, int8: bool = False) -> float | None:
        return max((r["tok_s"] for r in rows if r["impl"] == impl and r["batch"] == b
                    and (dtype is None or r["dtype"] == dtype) and (r.get("weights") == "int8") == int8), default=None)

    ours_best = best("mistral-torch")
    checks = {}
    hf_eager = max((r["tok_s"] for r in rows if r["impl"] == "transformers" and r["mode"] == "eager"
                    and r["batch"] == 1), default=None)
    if ours_best and hf_eager:
        checks["best mistral-torch / best transformers eager (b1)"] = ours_best / hf_eager
    for dtype in {r["dtype"] for r in rows}:
        o1, o8 = best("mistral-torch", dtype), best("mistral-torch", dtype, 8)
        if o1 and o8:
            checks[f"{dtype}: batch-8 / batch-1 aggregate tok/s"] = o8 / o1
        hf_static = [r["tok_s"] for r in rows if r["impl"] == "transformers" and r["batch"] == 1
                     and r["dtype"] == dtype and r["mode"] == "static cache + compile"]  # a GPU's contender
        if o1 and hf_static:
            checks[f"{dtype}: best mistral-torch / transformers static cache + compile (b1)"] = o1 / hf_static[0]
        for r in rows:  # the same weight precision: fp32 / f32, bf16 or fp16 / f16, int8 / q8_0
            if r["impl"] == "llama.cpp" and r["dtype"] == dtype:
                ours_same = best("mistral-torch", dtype, int8=r["mode"] == "q8_0")
                if ours_same:
                    label = "mistral-torch int8" if r["mode"] == "q8_0" else "best mistral-torch"
                    checks[f"{dtype}: {label} / llama.cpp {r['mode']}"] = ours_same / r["tok_s"]
    results["checks"] = checks
    for k, v in checks.items():
        print(f"{k}: {v:.2f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench-125m", help="model shape (random weights); default bench-125m")
    p.add_argument("--model", default=None, help="a checkpoint folder or shipped model name instead of a preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","), help="comma list: fp32,bf16,fp16")
    p.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    p.add_argument("--inductor-only", action="store_true",
                   help="also the compiled step without the C++ kernels (compile_decode(kernels=False))")
    p.add_argument("--no-aot", action="store_true",
                   help="skip the batch-1 step compiled ahead of time (compile_decode(aot=True); CPU)")
    p.add_argument("--int8", action="store_true",
                   help="also our model with int8 weights (quantize_model(.., 'int8'); compiled/fused step)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument("--memory", action="store_true", help="also peak RSS per contender (fresh processes)")
    p.add_argument("--out", default="benchmarks/results/decode.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        child(args)
        return 0
    results = run(args)
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
