"""Long generation: decode speed at position ~100 vs ~16k with a 4096-token sliding window, and
memory along the way (flat once the window is full).

    python benchmarks/bench_long.py                      # bench-125m, fp32, positions 100 and 16384
    python benchmarks/bench_long.py --dtype bf16 --compile
    python benchmarks/bench_long.py --compile --kv-cache int8   # int8 keys/values (a quarter of fp32's bytes)
    python benchmarks/bench_long.py --aot --kv-cache int8       # the batch-1 step compiled ahead of time
    python benchmarks/bench_long.py --compile --kv-cache int8 --vnni-ab  # + far steps without AVX512-VNNI
    python benchmarks/bench_long.py --decode-all         # really decode every token up to 16k (slow)

By default the sequence reaches 16k through chunked prefill (O(n·W), the window's chunks) and
then decodes; `--decode-all` decodes one token at a time from position 100 instead, recording
tokens/s every 1024 positions. Short and long caches then decode in alternating bursts, medians
reported, and the median of each round's far ÷ near (bursts next to each other in time share the
machine's speed of the moment). Beside it the ratio the bytes allow: (weights + near keys and
values) ÷ (weights + the window's keys and values), what a step bound by memory would reach.
Memory: resident set (RSS) and cache bytes at each checkpoint on the way.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mistral_torch import ModelArgs, fast  # noqa: E402
from mistral_torch.cache import KV_DTYPES  # noqa: E402


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def burst(model, tok: torch.Tensor, cache, n: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    for _ in range(n):
        logits, cache = model(tok, cache=cache)
        tok = common.greedy(logits)
    return n / (time.perf_counter() - t0), tok


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = common.threads_from_env(args.threads)
    a = ModelArgs.from_name(args.preset)
    a.sliding_window = args.window
    model = common.make_model(a, common.DTYPES[args.dtype])
    model.kv_cache_dtype = KV_DTYPES[args.kv_cache]
    if args.compile or args.aot:
        model.compile_decode(aot=args.aot)
    g = torch.Generator().manual_seed(0)
    memory: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    with torch.inference_mode():
        short_prompt = torch.randint(3, a.vocab_size, (1, args.short), generator=g)
        logits, short = model(short_prompt, last_logits_only=True)
        tok_s = common.greedy(logits)
        t0 = time.perf_counter()
        burst(model, tok_s, short, 4)  # warm-up (compiles with --compile)
        warmup = time.perf_counter() - t0
        long = model.new_cache(1)
        pos = 0
        if args.decode_all:
            logits, long = model(short_prompt, cache=long, last_logits_only=True)
            tok_l, pos = common.greedy(logits), args.short
            while pos < args.long:
                n = min(1024, args.long - pos)
                rate, tok_l = burst(model, tok_l, long, n)
                pos += n
                gc.collect()
                rates.append(dict(position=pos, tok_s=rate))
                memory.append(dict(position=pos, rss_MB=rss() / 2**20, cache_MB=long.nbytes() / 2**20))
                print(f"  position {pos}: {rate:.1f} tok/s, RSS {rss() / 2**20:.0f} MB", file=sys.stderr, flush=True)
        else:
            step = args.window // 2
            while pos < args.long:
                n = min(step, args.long - pos)
                chunk = torch.randint(3, a.vocab_size, (1, n), generator=g)
                logits, long = model(chunk, cache=long, last_logits_only=True)
                pos += n
                gc.collect()
                memory.append(dict(position=pos, rss_MB=rss() / 2**20, cache_MB=long.nbytes() / 2**20))
                print(f"  prefilled to {pos}: RSS {rss() / 2**20:.0f} MB, cache {long.nbytes() / 2**20:.0f} MB",
                      file=sys.stderr, flush=True)
            tok_l = common.greedy(logits)
        near, far, far_avx2, paired = [], [], [], []
        for _ in range(args.repeats):
            r, tok_s = burst(model, tok_s, short, args.burst)
            near.append(r)
            r, tok_l = burst(model, tok_l, long, args.burst)
            far.append(r)
            paired.append(far[-1] / near[-1])
            if args.vnni_ab:
                with fast.int8_vnni(False):
                    r, tok_l = burst(model, tok_l, long, args.burst)
                far_avx2.append(r)
    result = {
        "machine": common.machine(), "config": vars(args).copy(), "threads": threads,
        "compile_warmup_s": warmup if args.compile or args.aot else None,
        "aot_steps": model._aot_step.steps if args.aot and model._aot_step else None,  # of decode_steps
        "fused_steps": model._fused_step.steps if model._fused_step else None,  # of decode_steps
        "decode_steps": 4 + 2 * args.repeats * args.burst + (args.long - args.short if args.decode_all else 0),
        "tok_s_near": statistics.median(near), "tok_s_far": statistics.median(far),
        "position_near": int(short.next_pos[0]), "position_far": int(long.next_pos[0]),
        "memory": memory, "rates": rates, "peak_rss_MB": common.peak_rss() / 2**20,
    }
    result["ratio_far_near"] = result["tok_s_far"] / result["tok_s_near"]
    result["ratio_far_near_paired"] = statistics.median(paired)
    result["ratio_far_near_rounds"] = paired
    # what a memory-bound step allows: bytes read per step near and far (weights + the keys/values attended)
    weights = common.weight_bytes_per_token(model)
    per_slot = long.nbytes() / long.allocated  # keys, values and scales of one slot, every layer
    near_bytes = weights + per_slot * min(result["position_near"], args.window)
    far_bytes = weights + per_slot * min(result["position_far"], args.window)
    result.update(weight_MB=weights / 2**20, cache_read_far_MB=(far_bytes - weights) / 2**20,
                  ratio_bytes_bound=near_bytes / far_bytes)
    if far_avx2:
        result["tok_s_far_avx2_attention"] = statistics.median(far_avx2)
    # Growth = last minus first checkpoint once the window is full (the allocator's churn makes
    # single checkpoints move both ways; the range is kept beside it).
    after = [m["rss_MB"] for m in memory if m["position"] >= args.window]
    result["rss_growth_after_window_MB"] = after[-1] - after[0] if after else None
    result["rss_range_after_window_MB"] = [min(after), max(after)] if after else None
    rows = [dict(position=f"~{result['position_near']}", tok_s=result["tok_s_near"]),
            dict(position=f"~{result['position_far']}", tok_s=result["tok_s_far"])]
    if far_avx2:
        rows.append(dict(position=f"~{result['position_far']}, AVX2 int8 attention",
                         tok_s=result["tok_s_far_avx2_attention"]))
    label = args.dtype + ("" if args.kv_cache == "auto" else f", {args.kv_cache} cache")
    print(common.table(rows, [("position", "position", "s"), ("tok_s", f"decode tok/s ({label})", ".1f")]))
    if after:
        lo, hi = result["rss_range_after_window_MB"]
        print(f"ratio far/near: {result['ratio_far_near']:.3f} (medians), {result['ratio_far_near_paired']:.3f} "
              f"(median of rounds); the bytes allow {result['ratio_bytes_bound']:.3f} "
              f"({result['weight_MB']:.0f} MB of weights, {result['cache_read_far_MB']:.1f} MB of cache far)")
        print(f"RSS growth after the window: "
              f"{result['rss_growth_after_window_MB']:+.0f} MB (range {lo:.0f}-{hi:.0f} MB); "
              f"cache {memory[-1]['cache_MB']:.0f} MB")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-125m")
    p.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES))
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--short", type=int, default=100, help="position of the near measurement")
    p.add_argument("--long", type=int, default=16384, help="position of the far measurement")
    p.add_argument("--burst", type=int, default=32, help="tokens per timed burst")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--aot", action="store_true", help="compile the batch-1 step ahead of time (implies --compile)")
    p.add_argument("--kv-cache", default="auto", choices=sorted(KV_DTYPES),
                   help="what the cache holds: the model's dtype (auto) or int8 with per-vector scales")
    p.add_argument("--vnni-ab", action="store_true",
                   help="int8 cache: also time the far steps with the AVX2 form of the attention (A/B in one run)")
    p.add_argument("--decode-all", action="store_true", help="decode every position (slow) instead of prefilling")
    p.add_argument("--out", default="benchmarks/results/long.json")
    args = p.parse_args(argv)
    common.write_json(args.out, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
