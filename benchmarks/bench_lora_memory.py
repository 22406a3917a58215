"""Planned vs measured peak memory of full / LoRA / QLoRA fine-tuning steps (CPU, peak RSS).

    python benchmarks/bench_lora_memory.py [--model bench-125m] [--batch 4] [--seq 256] [--steps 3]

Each method runs in a fresh process: the model is built, prepared (LoRA: adapters on q/v;
QLoRA: NF4 base + adapters + activation checkpointing), and `--steps` AdamW steps run on random
tokens through the trainer's loss and optimizer. "measured" is the peak resident set size
(ru_maxrss) minus the RSS just before the model was built, i.e. what the run adds to the process,
with glibc told to return freed blocks to the OS (`lora.return_freed_memory_to_os`, as the
finetune command does); `--default-malloc` measures glibc's default behaviour instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(method: str, model: str, batch: int, seq: int, steps: int, r: int, targets: str, threads: int,
          default_malloc: bool) -> None:
    import torch

    from mistral_torch import ModelArgs, Transformer
    from mistral_torch.lora import LoRAConfig, peak_rss_bytes, prepare_model, return_freed_memory_to_os, rss_bytes
    from mistral_torch.train import TrainConfig, loss_fn, make_optimizer

    if not default_malloc:
        return_freed_memory_to_os()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    args = ModelArgs.from_name(model)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
    inputs, targets_ = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    base = rss_bytes()
    m = Transformer(args).init_weights(seed=0)
    if method != "full":
        prepare_model(m, LoRAConfig(r=r, alpha=2 * r, dropout=0.05, targets=targets, qlora=method == "qlora"), seed=0)
    m.activation_checkpointing = method == "qlora"
    m.train()
    opt = make_optimizer(m, TrainConfig(lr=1e-4))
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, _ = m(inputs, use_cache=False)
        loss = loss_fn(logits, targets_)
        loss.backward()  # like the trainer, `logits` stays alive through the backward
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = (time.perf_counter() - t0) / steps
    print(json.dumps({"method": method, "measured": peak_rss_bytes() - base, "s_per_step": dt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-125m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is (peak RSS then includes heap it keeps after frees)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model, a.batch, a.seq, a.steps, a.r, a.targets, a.threads, a.default_malloc)
        return

    from mistral_torch import ModelArgs
    from mistral_torch.lora import format_plans, plan_memory

    args = ModelArgs.from_name(a.model)
    plans, measured = [], {}
    for method in a.methods.split(","):
        plans.append(plan_memory(args, method, a.batch, a.seq, r=a.r, targets=a.targets))
        out = subprocess.run([sys.executable, __file__, "--child", method, "--model", a.model, "--batch", str(a.batch),
                              "--seq", str(a.seq), "--steps", str(a.steps), "--r", str(a.r), "--targets", a.targets,
                              "--threads", str(a.threads)] + ["--default-malloc"] * a.default_malloc,
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        measured[method] = res["measured"]
        print(f"{method}: measured {res['measured'] / 2**20:,.0f} MiB, {res['s_per_step']:.1f} s/step", flush=True)
    print(f"\n{a.model}, batch {a.batch} × seq {a.seq}, AdamW, r={a.r} on {a.targets}")
    print(format_plans(plans, measured))


if __name__ == "__main__":
    main()
