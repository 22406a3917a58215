"""Training throughput: our trainer's step against transformers' MistralForCausalLM in a plain loop.

    python benchmarks/bench_train.py                       # bench-125m, batch 4 x 256, 3 timed steps each
    python benchmarks/bench_train.py --preset tiny --batch 8 --seq 64 --steps 5 --json /tmp/b.json

Both models hold the same random weights and see the same batch; both compute the same loss
(mean token cross-entropy, fp32), clip gradients at 1.0 and take one AdamW step (lr 1e-4, weight
decay 0.1), so the numerics are the same. Ours is the step `train.py` runs: our `Transformer`,
`make_optimizer` (decay on matrices only, fused AdamW) and `loss_fn`. The baseline is what a
plain loop over transformers does: `MistralForCausalLM` (its default sdpa attention) and
`torch.optim.AdamW(model.parameters())` with the defaults. The steps alternate (ours, theirs,
ours, ...) so both see the same machine load. On a shared machine other processes only ever
slow a step down, so the table reports each one's fastest timed step (the least disturbed; the
JSON also has the medians), split into forward + backward and optimizer (clip + step + zero_grad).

MFU = model FLOPs per second / the fp32 matmul throughput measured in the same run (a 2048^3
matmul, best of several), with model FLOPs per token = 6 x (non-embedding parameters, lm_head
included) + 12 x layers x heads x head_dim x seq (attention scores and values, PaLM's count).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mistral_torch import ModelArgs, Transformer
from mistral_torch.train import TrainConfig, loss_fn, make_optimizer


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul throughput (FLOP/s) of a few n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_per_token(args: ModelArgs, seq: int) -> float:
    embed = args.vocab_size * args.dim  # a lookup, not a matmul (unless tied: then it is the lm_head)
    norms = args.dim * (2 * args.n_layers + 1)
    matmul_params = args.n_params - embed - norms + (embed if args.tie_embeddings else 0)
    return 6 * matmul_params + 12 * args.n_layers * args.n_heads * args.head_dim * seq


def hf_twin(model: Transformer):
    import transformers

    cfg = {k: v for k, v in model.args.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-125m", help="ModelArgs preset (default: bench-125m)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--json", default="benchmarks/results/bench_train.json", help="where to write the results")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    args = ModelArgs.from_name(a.preset)
    ours = Transformer(args).init_weights(seed=0).train()
    theirs = hf_twin(ours)
    cfg = TrainConfig(lr=1e-4, weight_decay=0.1, grad_clip=1.0)
    opt_ours = make_optimizer(ours, cfg)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    batch = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step_ours() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        logits, _ = ours(inputs, use_cache=False)
        loss = loss_fn(logits, targets)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), cfg.grad_clip)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item(), t1 - t0, time.perf_counter() - t1

    def step_theirs() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        logits = theirs(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.grad_clip)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.item(), t1 - t0, time.perf_counter() - t1

    peak_before = matmul_flops()
    runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "transformers": []}
    for _ in range(1 + a.steps):  # alternate, so both see the same load; the first is a warm-up
        runs["ours"].append(step_ours())
        runs["transformers"].append(step_theirs())
    peak = max(peak_before, matmul_flops())

    tokens = a.batch * a.seq
    per_token = model_flops_per_token(args, a.seq)
    rows = {}
    for name, r in runs.items():
        timed = r[1:]
        _, fb, opt = min(timed, key=lambda x: x[1] + x[2])  # the fastest step, and its two parts
        total = fb + opt
        median = statistics.median(x[1] + x[2] for x in timed)
        rows[name] = dict(losses=[x[0] for x in r], fwd_bwd_s=fb, optimizer_s=opt, step_s=total,
                          tokens_per_s=tokens / total, mfu=per_token * tokens / total / peak,
                          median_step_s=median, median_tokens_per_s=tokens / median,
                          steps_s=[[x[1], x[2]] for x in timed])
    loss_gap = max(abs(x - y) for x, y in zip(rows["ours"]["losses"], rows["transformers"]["losses"]))
    speedup = rows["ours"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    result = dict(preset=a.preset, params=args.n_params, batch=a.batch, seq=a.seq, steps=a.steps,
                  threads=torch.get_num_threads(), versions={"torch": torch.__version__, "transformers": transformers.__version__},
                  cpu=platform.processor() or platform.machine(), matmul_gflops=peak / 1e9,
                  model_gflops_per_token=per_token / 1e9, max_loss_gap=loss_gap, speedup=speedup, **rows)

    print(f"{a.preset} ({args.n_params / 1e6:.0f}M parameters), batch {a.batch} x {a.seq} = {tokens} tokens, "
          f"fp32, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"fastest of {a.steps} timed steps each:")
    print(f"{'':14} {'tokens/s':>9} {'step s':>8} {'fwd+bwd s':>10} {'optim s':>8} {'MFU':>6}")
    for name, r in rows.items():
        print(f"{name:14} {r['tokens_per_s']:9.1f} {r['step_s']:8.2f} {r['fwd_bwd_s']:10.2f} "
              f"{r['optimizer_s']:8.2f} {r['mfu']:6.1%}")
    median_speedup = rows["transformers"]["median_step_s"] / rows["ours"]["median_step_s"]
    result["median_speedup"] = median_speedup
    print(f"speedup {speedup:.2f}x (fastest steps; medians: {median_speedup:.2f}x); losses of the two agree within {loss_gap:.1e} over {a.steps + 1} steps")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
