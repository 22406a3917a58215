"""Prefill speed: a 512-token prompt through mistral-torch vs transformers vs llama.cpp, one run.

    python benchmarks/bench_prefill.py                    # bench-125m, fp32 + bf16, 512 tokens
    python benchmarks/bench_prefill.py --prompt 2048 --dtypes fp32 --memory
    python benchmarks/bench_prefill.py --int8 --no-hf       # + int8 weights, beside llama.cpp q8_0

Each contender turns the prompt into the cache and the last position's logits (ours:
`last_logits_only=True`; transformers: `logits_to_keep=1`; llama.cpp: `eval`), interleaved,
medians reported. "% of matmul peak" = the FLOPs the prefill needs (projections, attention
scores over the causal/window mask, one row of lm_head) per second, over the fp32 matmul
throughput measured in every round beside the contenders at a prefill shape (512 x 768 x 2048;
median over the rounds): the faster of the BLAS call and oneDNN with a packed weight. On a
shared machine that throughput moves from run to run (130-176 GFLOP/s over one day here), so it
is measured with the contenders, not once. "mistral-torch packed" is the model with its linears
swapped for oneDNN-packed `fast.PackedLinear`s (what `compile_decode()` does on CPUs without the
C++ kernels).
On a GPU (`--device cuda --preset mistral-7b-v0.1 --dtypes bf16`) the peak is the run's dtype's
matmul throughput at the model's own FFN shape (prompt x dim x hidden_dim), measured the same way.
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
from bench_decode import build, child_argv, child_setup  # noqa: E402

from mistral_torch import ModelArgs, fast  # noqa: E402


PEAK = "fp32 matmul peak"  # the probe measured in every round beside the contenders


def prefill_flops(a: ModelArgs, T: int) -> float:
    """Matmul FLOPs of one prefill of T tokens, logits for the last position only."""
    proj = a.n_layers * (a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim)
    W = min(T, a.sliding_window or T)
    keys = sum(min(t + 1, W) for t in range(T))  # (query, key) pairs attended
    attn = a.n_layers * 2 * 2 * keys * a.n_heads * a.head_dim  # q.k and p.v
    return 2 * proj * T + attn + 2 * a.dim * a.vocab_size


def ours(model, prompt: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        common.sync(prompt.device)
        t0 = time.perf_counter()
        logits, _ = model(prompt, last_logits_only=True)
        logits[:, -1].argmax(-1).tolist()
        return {"s": time.perf_counter() - t0}


def transformers_run(hf, prompt: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        common.sync(prompt.device)
        t0 = time.perf_counter()
        out = hf(input_ids=prompt, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).tolist()
        return {"s": time.perf_counter() - t0}


def llama_run(llm, ids: list[int]) -> dict[str, float]:
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))
    return {"s": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = common.threads_from_env(args.threads)
    print(f"threads {threads}", file=sys.stderr)
    results: dict[str, Any] = {"machine": common.machine(), "config": vars(args).copy(), "rows": []}
    dev = args.device
    have_llama = dev == "cpu" and not args.no_llama and common.llama_cpp_available()
    tmp = tempfile.TemporaryDirectory()
    for dtype in args.dtypes:
        model = build(args, dtype)
        a = model.args
        prompt = torch.randint(3, a.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(dev)
        contenders: dict[str, Callable[[], dict[str, float]]] = {"mistral-torch": lambda: ours(model, prompt)}
        packed = common.twin(model)
        if fast.pack_linears(packed):  # oneDNN-packed linears (compile_decode does this where the C++ kernels are off)
            contenders["mistral-torch packed"] = lambda: ours(packed, prompt)
        int8 = None
        if args.int8:  # int8 weights (linears, LM head, embedding): quantize_model(.., "int8")
            from mistral_torch.quantize import quantize_model
            int8 = quantize_model(common.twin(model), "int8")
            contenders["mistral-torch int8"] = lambda: ours(int8, prompt)
        hf = None
        if not args.no_hf:
            hf = common.hf_model(model)
            contenders["transformers"] = lambda: transformers_run(hf, prompt)
        llms = []
        if have_llama:
            for kind in ["f32" if dtype == "fp32" else "f16"] + (["q8_0"] if args.int8 else []):
                path = common.write_gguf(model, Path(tmp.name) / f"m-{kind}.gguf", kind)
                llm = common.LlamaWorker(path, n_ctx=args.prompt + 8, threads=threads, n_batch=args.prompt)
                llms.append(llm)
                contenders[f"llama.cpp {kind}"] = lambda llm=llm: llm.run(prompt[0].tolist(), 1)
        for fn in contenders.values():
            fn()
        flops = prefill_flops(a, args.prompt)
        # CPU: fp32 at a bench-125m prefill shape; GPU: the run's dtype at the model's FFN shape
        peak_dtype = "fp32" if dev == "cpu" else dtype
        shape = dict(m=512, k=768, n=2048) if dev == "cpu" else dict(m=args.prompt, k=a.dim, n=a.hidden_dim)
        probe = {PEAK: lambda: {"GFLOPs": common.matmul_flops(**shape, dtype=common.DTYPES[peak_dtype],
                                                              device=dev) / 1e9}}
        medians = common.interleave({**probe, **contenders}, args.repeats)
        peak = medians.pop(PEAK)["GFLOPs"] * 1e9
        print(f"{dtype}: {peak_dtype} matmul peak {peak / 1e9:.0f} GFLOP/s (median of the rounds)", file=sys.stderr)
        for name, m in medians.items():
            results["rows"].append(dict(name=name, dtype=dtype, tok_s=args.prompt / m["s"], ttft_s=m["s"],
                                        pct_matmul_peak=100 * flops / m["s"] / peak,
                                        matmul_peak_dtype=peak_dtype, matmul_GFLOPs=peak / 1e9))
        for llm in llms:
            llm.close()
        del hf, llms, model, packed, int8
        gc.collect()
    if args.memory and dev == "cpu":  # RSS of fresh processes: a CPU measure
        names = [f"{r['name']}|{r['dtype']}" for r in results["rows"]]
        mem = common.peak_memory(__file__, names, child_argv(args))
        for r in results["rows"]:
            r["peak_rss_MB"] = mem.get(f"{r['name']}|{r['dtype']}")
    print(common.table(results["rows"], [
        ("name", "contender", "s"), ("dtype", "dtype", "s"), ("tok_s", "prefill tok/s", ".0f"),
        ("ttft_s", "time s", ".3f"), ("pct_matmul_peak", "% matmul peak", ".0f"),
        ("matmul_peak_dtype", "peak of", "s"), ("matmul_GFLOPs", "peak GFLOP/s", ".0f"),
        ("peak_rss_MB", "peak RSS MB", ".0f")]))
    tmp.cleanup()
    return results


def child(args: argparse.Namespace) -> None:
    name, model, prompt = child_setup(args)
    if name.startswith("mistral-torch"):
        if name.endswith("packed"):
            fast.pack_linears(model)
        elif name.endswith("int8"):
            from mistral_torch.quantize import quantize_model
            quantize_model(model, "int8")
        ours(model, prompt)
    elif name == "transformers":
        hf = common.hf_model(model)
        del model
        gc.collect()
        transformers_run(hf, prompt)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = common.write_gguf(model, Path(tmp) / "m.gguf", name.split()[1])
            del model
            gc.collect()
            llm = common.llama_cpp_model(path, n_ctx=args.prompt + 8, threads=torch.get_num_threads(), n_batch=args.prompt)
            llama_run(llm, prompt[0].tolist())
    print(f"PEAK {common.peak_rss()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-125m")
    p.add_argument("--model", default=None, help="a checkpoint folder or shipped model name instead of a preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","))
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--int8", action="store_true", help="also our model with int8 weights, and llama.cpp q8_0")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--memory", action="store_true", help="also peak RSS per contender (fresh processes)")
    p.add_argument("--out", default="benchmarks/results/prefill.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    common.write_json(args.out, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
