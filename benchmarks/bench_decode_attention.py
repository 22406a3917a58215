"""The C++ decode attention alone, over caches of each kind: one decode step's attention of a model.

    python benchmarks/bench_decode_attention.py                  # bench-125m, 4096 keys, fp32 / bf16 / int8 caches
    python benchmarks/bench_decode_attention.py --keys 128,4096 --rounds 20
    python benchmarks/bench_decode_attention.py --avx2-int8     # + int8 without AVX512-VNNI, same rounds

For each cache kind and number of keys: ms for one step's attention over every layer (one query
per query head, the layer's own keys and values: at 4096 keys the step reads them from memory,
as a real step does after streaming the weights), GB/s of cache read, and each kind's speed
relative to the model-dtype cache (fp32 queries over fp32 or int8 caches, bf16 over bf16 or
int8). The kinds alternate round by round in one process; medians of `--rounds`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mistral_torch import ModelArgs, fast  # noqa: E402
from mistral_torch.cache import quantize_int8  # noqa: E402

KINDS = [("fp32", "fp32"), ("fp32", "int8"), ("bf16", "bf16"), ("bf16", "int8")]  # (query dtype, cache)


def caches(a: ModelArgs, keys: int, dtype: torch.dtype, cache: str, g: torch.Generator) -> list[tuple]:
    """Per layer: (k, v, k_scale, v_scale) as the decode step passes them (scales None unless int8)."""
    out = []
    for _ in range(a.n_layers):
        k, v = (torch.randn(1, a.n_kv_heads, keys, a.head_dim, generator=g).to(dtype) for _ in range(2))
        if cache == "int8":
            (k, ks), (v, vs) = quantize_int8(k), quantize_int8(v)
            out.append((k, v, ks, vs))
        else:
            out.append((k, v, None, None))
    return out


def step(q: torch.Tensor, bias: torch.Tensor, layers: list[tuple], vnni: bool = True) -> float:
    with fast.int8_vnni(vnni):
        t0 = time.perf_counter()
        for k, v, ks, vs in layers:
            fast.decode_attention(q, k, v, bias, ks, vs)
        return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    if not fast.cpp_kernels():
        raise SystemExit("the C++ kernels are unavailable here (x86 with AVX2 or AVX-512 only)")
    a = ModelArgs.from_name(args.preset)
    g = torch.Generator().manual_seed(0)
    results = {"machine": common.machine(), "config": vars(args).copy(), "rows": []}
    for keys in args.keys:
        setups = {}
        for qd, cache in [kind for kind in KINDS if kind[0] in args.dtypes]:
            dtype = common.DTYPES[qd]
            layers = caches(a, keys, dtype, cache, g)
            nbytes = sum(t.numel() * t.element_size() for layer in layers for t in layer if t is not None)
            q = torch.randn(1, a.n_heads, 1, a.head_dim, generator=g).to(dtype)
            setups[(qd, cache)] = (q, torch.zeros(1, 1, 1, keys, dtype=dtype), layers, nbytes)
        if args.avx2_int8:  # the int8 kinds again with the AVX2 form of the kernel (A/B where VNNI runs)
            setups |= {(qd, "int8 AVX2"): setups[(qd, cache)] for qd, cache in list(setups) if cache == "int8"}
        times = {kind: [] for kind in setups}
        for r in range(args.rounds + 2):
            for kind, (q, bias, layers, _) in setups.items():
                t = step(q, bias, layers, vnni=kind[1] != "int8 AVX2")
                if r >= 2:  # two warm-up rounds
                    times[kind].append(t)
        for (qd, cache), ts in times.items():
            s, ref = statistics.median(ts), statistics.median(times[(qd, qd)])
            results["rows"].append(dict(keys=keys, query=qd, cache=cache, ms=s * 1e3,
                                        cache_MB=setups[(qd, cache)][3] / 2**20,
                                        GBps=setups[(qd, cache)][3] / s / 1e9, speed=ref / s))
    print(common.table(results["rows"], [("keys", "keys", "d"), ("query", "query", "s"), ("cache", "cache", "s"),
                                         ("cache_MB", "cache MB read", ".1f"), ("ms", "ms / step", ".3f"),
                                         ("GBps", "GB/s", ".1f"), ("speed", "speed vs model-dtype cache", ".2f")]))
    return results


def main(argv: list[str] | None = None) -> int:
    p = common.side_by_side_parser(__doc__, "--keys", 12, "benchmarks/results/decode_attention.json")
    p.set_defaults(keys=[128, 4096])
    p.add_argument("--avx2-int8", action="store_true",
                   help="also time the int8 caches with the AVX2 kernel (AVX512-VNNI off), in the same rounds")
    return common.run_and_save(p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
