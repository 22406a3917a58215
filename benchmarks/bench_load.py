"""Peak memory of `load_model` on a generated >= 1 GB sharded checkpoint.

    python benchmarks/bench_load.py                      # 1.34 GB bf16 HF folder, 500 MB shards
    python benchmarks/bench_load.py --format mistral --dtype float32

Writes a random checkpoint into a temporary folder, then loads it in a fresh subprocess and
reports peak RSS growth (VmHWM) divided by the bytes of the loaded weights. "cold" counts from
just after `import mistral_torch`; "warm" counts from after one tiny meta-device model was built,
which excludes torch's one-time import of its Python meta kernels (~70 MB, whatever the size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mistral_torch import ModelArgs, Transformer
from mistral_torch.checkpoint import save_model

# ~672M parameters: 1.34 GB in bf16, 2.7 GB in fp32.
ARGS = ModelArgs(dim=2048, n_layers=12, head_dim=128, hidden_dim=5632, n_heads=16, n_kv_heads=4,
                 vocab_size=32000, sliding_window=4096, max_seq_len=32768)

CHILD = """
import json, os, sys, time
import torch
from mistral_torch import ModelArgs, Transformer
from mistral_torch.checkpoint import load_model

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

cold = rss()
with torch.device("meta"):
    Transformer(ModelArgs.from_name("tiny"))
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
warm = rss()
t0 = time.perf_counter()
model = load_model(sys.argv[1], dtype=None if sys.argv[2] == "keep" else sys.argv[2])
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(cold=cold, warm=warm, peak=peak(), weights=weights, seconds=seconds,
                      dtype=str(model.lm_head.weight.dtype))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["hf", "mistral"], default="hf")
    ap.add_argument("--stored-dtype", default="bfloat16", help="dtype written to disk")
    ap.add_argument("--dtype", default="keep", help="dtype to load as (default: keep the stored one)")
    ap.add_argument("--max-shard-size", default="500MB")
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        with torch.device("meta"):
            model = Transformer(ARGS)
        model = model.to_empty(device="cpu").to(getattr(torch, opts.stored_dtype))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        folder = save_model(model, Path(tmp) / "ckpt", format=opts.format, max_shard_size=opts.max_shard_size)
        del model
        files = sorted(folder.iterdir())
        disk = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
        print(f"checkpoint: {opts.format}, {opts.stored_dtype}, {disk / 1e9:.2f} GB in "
              f"{sum(f.suffix == '.safetensors' for f in files)} file(s)")
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), opts.dtype],
                             capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    w = r["weights"]
    print(f"loaded as {r['dtype']}: weights {w / 1e9:.2f} GB in {r['seconds']:.1f} s")
    print(f"peak RSS growth / weight bytes: warm {(r['peak'] - r['warm']) / w:.3f}, "
          f"cold {(r['peak'] - r['cold']) / w:.3f}")


if __name__ == "__main__":
    main()
