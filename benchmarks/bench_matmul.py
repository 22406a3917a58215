"""Multi-row matmuls of a model's weight shapes: the BLAS (`F.linear`) against oneDNN on the plain
weight (what the plain model's eager forwards run, `fast.plain_onednn`) and oneDNN on its packed copy (what
`compile_decode()` keeps on AVX-512 CPUs), side by side in one process.

    python benchmarks/bench_matmul.py                       # bench-125m's FFN and LM-head shapes, 1-512 rows
    python benchmarks/bench_matmul.py --rows 16,512 --dtypes fp32 --rounds 20

For each dtype, weight shape and row count: ms a call (median of `--rounds`, the three kernels
interleaved) and each kernel's speed relative to the BLAS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mistral_torch import ModelArgs  # noqa: E402


def timed(fn, calls: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def run(args: argparse.Namespace) -> dict:
    a = ModelArgs.from_name(args.preset)
    onednn = torch.ops.mkldnn._linear_pointwise
    rows_out = []
    for dtype in args.dtypes:
        dt = common.DTYPES[dtype]
        for n, k in ((a.hidden_dim, a.dim), (a.vocab_size, a.dim)):
            w = (torch.randn(n, k) * 0.02).to(dt)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            for rows in args.rows:
                x = torch.randn(1, rows, k).to(dt)
                kernels = {"BLAS F.linear": lambda: F.linear(x, w),
                           "oneDNN plain weight": lambda: onednn(x, w, None, "none", [], ""),
                           "oneDNN packed weight": lambda: onednn(x, packed, None, "none", [], "")}
                times: dict[str, list[float]] = {name: [] for name in kernels}
                with torch.inference_mode():
                    for _ in range(args.rounds):
                        for name, fn in kernels.items():
                            times[name].append(timed(fn))
                med = {name: statistics.median(t) for name, t in times.items()}
                for name, s in med.items():
                    rows_out.append(dict(dtype=dtype, weight=f"{n}x{k}", rows=rows, kernel=name, ms=1e3 * s,
                                         GFLOPs=2 * rows * n * k / s / 1e9, vs_blas=med["BLAS F.linear"] / s))
                print(f"{dtype} {n}x{k} rows {rows}: " + ", ".join(f"{m} {1e3 * s:.3f} ms" for m, s in med.items()),
                      file=sys.stderr, flush=True)
    print(common.table(rows_out, [("dtype", "dtype", ""), ("weight", "weight", ""), ("rows", "rows", ""),
                                  ("kernel", "kernel", ""), ("ms", "ms a call", ".3f"),
                                  ("GFLOPs", "GFLOP/s", ".0f"), ("vs_blas", "÷ BLAS time", ".2f")]))
    return {"machine": common.machine(), "config": vars(args).copy(), "rows": rows_out}


def main(argv: list[str] | None = None) -> int:
    p = common.side_by_side_parser(__doc__, "--rows", 7, "benchmarks/results/matmul.json")
    p.set_defaults(rows=[1, 2, 4, 8, 16, 64, 128, 512])
    return common.run_and_save(p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
