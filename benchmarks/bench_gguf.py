"""GGUF load/export: peak RSS growth ÷ weight bytes, and seconds, each case in a fresh process.

    python benchmarks/bench_gguf.py [--preset bench-125m] [--dir /tmp/bench-gguf]

Writes a random model of the preset as GGUF (f32, f16, q8_0), then loads each file in a new
process (`load_model("x.gguf")`, tensor by tensor from the mapped file) and reports the peak RSS
growth over the weights' bytes in the loaded dtype (torch, gguf and the meta kernels imported first;
the peak is reset through /proc/self/clear_refs just before loading).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch, gguf
from mistral_torch import ModelArgs, Transformer, load_model
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
with torch.device('meta'):
    Transformer(ModelArgs.from_name('tiny'))  # one-time meta-kernel import, as bench_load.py
open('/proc/self/clear_refs', 'w').write('5')  # peak RSS (VmHWM) := current RSS
base = status('VmRSS')
t0 = time.perf_counter()
m = load_model(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] != 'none' else None)
dt = time.perf_counter() - t0
peak = status('VmHWM')
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"seconds": dt, "growth": peak - base, "weights": weights}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-125m")
    ap.add_argument("--dir", default="/tmp/bench-gguf")
    args = ap.parse_args()
    import torch

    from mistral_torch import ModelArgs, Transformer
    from mistral_torch.gguf import save_gguf

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    model = Transformer(ModelArgs.from_name(args.preset)).init_weights(seed=0).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n:,} parameters")
    print("| file | write s | size MB | loaded as | load s | peak RSS growth ÷ weights |")
    print("|---|---:|---:|---|---:|---:|")
    for outtype, dtype in (("f32", "none"), ("f16", "none"), ("q8_0", "none"), ("q8_0", "bf16")):
        path = out / f"{args.preset}-{outtype}.gguf"
        t0 = time.perf_counter()
        if not path.exists():
            save_gguf(model, path, outtype, overwrite=True)
        wt = time.perf_counter() - t0
        r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], check=True,
                                      capture_output=True, text=True).stdout)
        loaded = "bf16" if dtype == "bf16" else ("f16" if outtype == "f16" else "f32")
        print(f"| {outtype} | {wt:.1f} | {path.stat().st_size / 1e6:,.0f} | {loaded} | {r['seconds']:.1f} | "
              f"{r['growth'] / r['weights']:.2f} |", flush=True)
    del torch


if __name__ == "__main__":
    main()
