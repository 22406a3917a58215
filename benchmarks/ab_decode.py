"""A/B of the compiled decode step's choices, in one process: each contender a twin of one model.

    python benchmarks/ab_decode.py                     # bench-125m, fp32 + bf16, batch 1 and 8
    python benchmarks/ab_decode.py --dtypes bf16 --rounds 12

Contenders (all `compile_decode()`, C++ kernels on where they build):
- "default": steps of up to 8 rows through the fused C++ step (`fused.py`), larger batches
  through the compiled step; linear weights on 2 MB huge pages;
- "AOT, not fused": batch 1 through the AOTInductor step instead (`compile_decode(aot=True,
  fused=False)`), batches through torch.compile's step;
- "compiled, not fused": every step through torch.compile's step (`fused=False`), q/k/v and
  gate/up in one kernel call each;
- "compiled, separate projections": the same with every linear its own call (`fast.project` off
  for that twin);
- "4 KB pages": the weights left where they were allocated (`fast.HUGE_PAGES = False` for that
  twin's compile_decode).
Greedy steps after a 64-token prompt, `--steps` steps per measurement, the contenders interleaved
round by round (a machine whose pace drifts slows them alike), medians reported: ms per step and
each contender's speed relative to "default". Between processes this machine's speed moved
±15 %, so effects of a few percent are only visible side by side like this.
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

_project = fast.project


def project(x: torch.Tensor, *linears: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """`fast.project`, but one call per linear for the twin whose linears are marked `_separate`."""
    if getattr(linears[0], "_separate", False):
        return tuple(m(x) for m in linears)
    return _project(x, *linears)


def step_ms(model: Transformer, batch: int, steps: int) -> float:
    prompt = torch.randint(0, model.args.vocab_size, (batch, 64), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        logits, cache = model(prompt, last_logits_only=True)
        tok = common.greedy(logits)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = model(tok, cache=cache)
            tok = common.greedy(logits)
        return (time.perf_counter() - t0) / steps * 1e3


def run(args: argparse.Namespace) -> dict:
    fast.project = project  # model.py looks it up at trace time
    results = {"machine": common.machine(), "config": vars(args).copy(), "rows": []}
    for dtype in args.dtypes:
        base = common.make_model(ModelArgs.from_name(args.preset), common.DTYPES[dtype], "cpu")
        twins = {}
        for name in ("default", "AOT, not fused", "compiled, not fused", "compiled, separate projections", "4 KB pages"):
            fast.HUGE_PAGES = name != "4 KB pages"
            aot = name == "AOT, not fused"
            twins[name] = common.twin(base).compile_decode(aot=aot, fused=name in ("default", "4 KB pages"))
            for m in twins[name].modules():
                m._separate = name == "compiled, separate projections"
        fast.HUGE_PAGES = True
        for name, model in twins.items():  # compile every shape first (batch 1, then dynamic)
            for b in args.batches:
                step_ms(model, b, 2)
            print(f"  {dtype} {name}: compiled", file=sys.stderr, flush=True)
        for b in args.batches:
            times = {name: [] for name in twins}
            for r in range(args.rounds):
                for name, model in twins.items():
                    times[name].append(step_ms(model, b, args.steps))
            ref = statistics.median(times["default"])
            for name, ts in times.items():
                ms = statistics.median(ts)
                results["rows"].append(dict(dtype=dtype, batch=b, name=name, ms_per_step=ms, tok_s=b * 1e3 / ms,
                                            speed_vs_default=ref / ms, ms_all=ts))
    fast.project = _project
    print(common.table(results["rows"], [("dtype", "dtype", "s"), ("batch", "batch", "d"), ("name", "contender", "s"),
                                         ("ms_per_step", "ms / step", ".2f"), ("tok_s", "tok/s", ".1f"),
                                         ("speed_vs_default", "speed vs default", ".3f")]))
    return results


def main(argv: list[str] | None = None) -> int:
    p = common.side_by_side_parser(__doc__, "--batches", 8, "benchmarks/results/ab_decode.json")
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    return common.run_and_save(p.parse_args(argv), run)

if __name__ == "__main__":
    sys.exit(main())
