"""The C++ `small_linear` alone: one decode step's linears of a model, read once per call.

    python benchmarks/bench_small_linear.py                  # bench-125m, fp32 + bf16, 1 and 8 rows
    python benchmarks/bench_small_linear.py --rows 1,2,4,8 --rounds 20

For each dtype and row count: ms to multiply x by every linear weight of the model one call at a
time (q/k/v and gate/up stacked, as the compiled step calls them), GB/s of weights read, GFLOP/s,
for the weights where `make_model` allocated them (4 KB pages) and after
`fast.huge_page_weights` (2 MB pages) — both copies in one process, measured alternately,
medians of `--rounds`.
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

from mistral_torch import ModelArgs, Transformer, fast  # noqa: E402


def calls(model: Transformer) -> list[list[torch.Tensor]]:
    """The weight groups one decode step multiplies, in order."""
    out = []
    for layer in model.model.layers:
        a, f = layer.self_attn, layer.mlp
        out += [[a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], [a.o_proj.weight],
                [f.gate_proj.weight, f.up_proj.weight], [f.down_proj.weight]]
    return out + [[model.lm_head.weight]]


def step(groups: list[list[torch.Tensor]], xs: dict[int, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for ws in groups:
        fast.small_linear(xs[ws[0].shape[1]], *ws)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    if not fast.cpp_kernels():
        raise SystemExit("the C++ kernels are unavailable here (x86 with AVX2 or AVX-512 only)")
    results = {"machine": common.machine(), "config": vars(args).copy(), "rows": []}
    for dtype in args.dtypes:
        plain = common.make_model(ModelArgs.from_name(args.preset), common.DTYPES[dtype], "cpu")
        huge = common.twin(plain)
        fast.pack_linears(huge, onednn=False)
        moved = fast.huge_page_weights(huge)
        layouts = {"4 KB pages": calls(plain), "2 MB pages" if moved else "2 MB pages (not moved)": calls(huge)}
        nbytes = sum(w.numel() * w.element_size() for ws in layouts["4 KB pages"] for w in ws)
        for rows in args.rows:
            xs = {k: torch.randn(rows, k).to(common.DTYPES[dtype]) for k in {ws[0].shape[1] for ws in calls(plain)}}
            times = {name: [] for name in layouts}
            for r in range(args.rounds + 2):
                for name, groups in layouts.items():
                    t = step(groups, xs)
                    if r >= 2:  # two warm-up rounds
                        times[name].append(t)
            for name, ts in times.items():
                s = statistics.median(ts)
                results["rows"].append(dict(dtype=dtype, rows=rows, weights=name, ms=s * 1e3, GBps=nbytes / s / 1e9,
                                            GFLOPs=2 * rows * nbytes / plain.lm_head.weight.element_size() / s / 1e9))
    print(common.table(results["rows"], [("dtype", "dtype", "s"), ("rows", "rows", "d"), ("weights", "weights", "s"),
                                         ("ms", "ms", ".2f"), ("GBps", "GB/s", ".1f"), ("GFLOPs", "GFLOP/s", ".1f")]))
    return results


def main(argv: list[str] | None = None) -> int:
    p = common.side_by_side_parser(__doc__, "--rows", 12, "benchmarks/results/small_linear.json")
    return common.run_and_save(p.parse_args(argv), run)

if __name__ == "__main__":
    sys.exit(main())
