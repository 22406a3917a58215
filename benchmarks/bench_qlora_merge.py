"""What merging a QLoRA adapter keeps: validation loss of the ways to ship it.

    python benchmarks/bench_qlora_merge.py --config recipes/lora-fr-en.toml --init-from tiny-en-fr \
        --out-dir runs/qlora-merge --max-steps 300

Trains a QLoRA adapter with the recipe (NF4 base, activation checkpointing; or reuses the run's
adapter when it exists), then reports the validation loss (the recipe's held-out training pairs) of:

    fp32 base                       the model as shipped, no adapter
    NF4 base                        the frozen base QLoRA trained on, no adapter
    NF4 base + adapter              what training optimised (unmerged)
    merged into dequantized NF4     dequantize -> W + s*B*A -> fp32 (merge-lora's default for QLoRA)
    merged, requantized to NF4      the same, rounded to NF4 again (a 4-bit checkpoint)
    adapter on the fp32 base        the adapter applied to the unquantized original
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recipes/lora-fr-en.toml")
    ap.add_argument("--init-from", default="tiny-en-fr")
    ap.add_argument("--out-dir", default="runs/qlora-merge")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-batches", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=None, help="pairs file (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None)
    a = ap.parse_args()

    from mistral_torch import lora
    from mistral_torch.checkpoint import load_model
    from mistral_torch.train import TrainConfig, build_datasets, evaluate_loss, train

    cfg = TrainConfig.from_file(a.config, init_from=a.init_from, out_dir=a.out_dir, max_steps=a.max_steps,
                                eval_every=max(1, a.max_steps // 3), ckpt_every=max(1, a.max_steps // 3),
                                activation_checkpointing=True, threads=a.threads, eval_batches=a.eval_batches,
                                data=a.data, batch_size=a.batch_size)
    cfg.lora = {**(cfg.lora or {}), "qlora": True}
    adapter = Path(a.out_dir) / "adapter"
    if not adapter.is_dir():
        train(cfg)
    _, _, val = build_datasets(cfg, Path(a.out_dir), progress=False)

    def loss(model) -> float:
        return evaluate_loss(model.eval(), val, cfg)

    def nf4_base():
        return lora.quantize_base_nf4(load_model(a.init_from, dtype=torch.float32))

    rows = {"fp32 base": loss(load_model(a.init_from, dtype=torch.float32)),
            "NF4 base": loss(nf4_base())}
    m = lora.load_adapter(nf4_base(), adapter)
    rows["NF4 base + adapter (trained)"] = loss(m)
    rows["merged into dequantized NF4 (fp32)"] = loss(lora.merge_lora(m))
    rows["merged, requantized to NF4"] = loss(lora.merge_lora(lora.load_adapter(nf4_base(), adapter), requantize=True))
    rows["adapter on the fp32 base"] = loss(lora.load_adapter(load_model(a.init_from, dtype=torch.float32), adapter))
    for name, value in rows.items():
        print(f"{name:38s} {value:.4f}")
    (Path(a.out_dir) / "merge_quality.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
