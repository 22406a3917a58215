"""The training loop: pre-training and full fine-tuning, with exact resume.

    config ─► model + tokenizer + data ─► for step: accumulate grads ─► clip ─► AdamW ─► schedule
          └─► every `eval_every`: validation loss; every `ckpt_every`: atomic checkpoint

Checkpoints hold the model, optimizer, scheduler, data position and RNG states, written to a
temp dir then renamed, so a run killed at any moment resumes from the last complete one and
reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .args import ModelArgs
from .data import IGNORE_INDEX, PackedDataset, PairDataset, get_template, read_pairs, split_train_val
from .model import Transformer


@dataclass
class TrainConfig:
    """Everything a run needs; read from a TOML file and/or flags, saved with each checkpoint."""

    out_dir: str = "runs/default"
    # model: a preset name, a dict of ModelArgs fields, or a checkpoint to start from (init_from)
    model: str | dict[str, Any] = "tiny"
    init_from: str | None = None
    tokenizer: str | None = None  # path/name; "sentencepiece:<vocab>" trains one on the training data
    # data
    data: str = ""
    data_format: str = "pairs"  # pairs | text
    template: str = "translate-en-fr"
    reverse_pairs: bool = False
    val_fraction: float = 0.01
    val_data: str | None = None
    seq_len: int = 256
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "fp32"  # autocast: fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    compile: bool = False
    # bookkeeping
    seed: int = 1234
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    threads: int | None = None
    # LoRA / QLoRA (lora.LoRAConfig fields: r, alpha, dropout, targets, use_rslora, qlora; a
    # [lora] table in TOML): the base is frozen (NF4-quantized for QLoRA) and adapters trained;
    # the finished run writes a PEFT-format adapter to <out_dir>/adapter.
    lora: dict[str, Any] | None = None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown training config key(s): {', '.join(unknown)}")
        if "betas" in raw:
            raw = {**raw, "betas": tuple(raw["betas"])}
        cfg = cls(**raw)
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
        if cfg.data_format not in ("pairs", "text"):
            raise ValueError(f"data_format must be 'pairs' or 'text', got {cfg.data_format!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "seq_len", "eval_every", "ckpt_every", "keep_last"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.lora is not None:
            from .lora import LoRAConfig

            LoRAConfig.from_dict(cfg.lora)  # unknown keys and bad values fail before the run starts
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- optimiser and schedule
def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (none on norms and embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed_tokens" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over targets != -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(out_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], cfg: TrainConfig, keep_last: int) -> Path:
    """Write `checkpoints/step_XXXXXXX` atomically (temp dir + rename) and prune old ones."""
    from safetensors.torch import save_file

    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    (tmp / "config.json").write_text(json.dumps(model.args.to_hf_config(), indent=1))
    (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of interrupted writes are ignored)."""
    done = [p for p in sorted((out_dir / "checkpoints").glob("step_*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    if model.args.tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True)
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    _set_rng_state(trainer["rng"])
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------- building blocks of a run
def build_model(cfg: TrainConfig) -> Transformer:
    if cfg.init_from:
        from .checkpoint import load_model

        return load_model(cfg.init_from, dtype=torch.float32)
    args = ModelArgs.from_name(cfg.model) if isinstance(cfg.model, str) else ModelArgs.from_dict(cfg.model)
    return Transformer(args).init_weights(seed=cfg.seed)


def build_tokenizer(cfg: TrainConfig, out_dir: Path, texts: list[str] | None):
    from .tokenizer import Tokenizer, load_tokenizer

    spec = cfg.tokenizer or cfg.init_from
    if spec and spec.startswith("sentencepiece:"):
        path = out_dir / "tokenizer.model"
        if not path.is_file():
            from .data import train_sentencepiece

            if texts is None:
                raise ValueError("tokenizer 'sentencepiece:N' needs training texts")
            train_sentencepiece(texts, path, vocab_size=int(spec.split(":", 1)[1]))
        return Tokenizer.from_file(path)
    return load_tokenizer(spec)


def build_datasets(cfg: TrainConfig, out_dir: Path, progress: bool):
    """(tokenizer, train dataset, validation dataset)."""
    if cfg.data_format == "pairs":
        pairs = read_pairs(cfg.data, reverse=cfg.reverse_pairs)
        if cfg.val_data:
            train_pairs, val_pairs = pairs, read_pairs(cfg.val_data, reverse=cfg.reverse_pairs)
        else:
            train_pairs, val_pairs = split_train_val(pairs, cfg.val_fraction, cfg.seed)
        tok = build_tokenizer(cfg, out_dir, [t for p in train_pairs for t in p])
        cache = out_dir / "data_cache.pt"
        template = get_template(cfg.template)
        if cache.is_file():
            blob = torch.load(cache, weights_only=True)
            train, val = PairDataset(blob["train"], tok.eos_id), PairDataset(blob["val"], tok.eos_id)
        else:
            train = PairDataset.from_pairs(tok, train_pairs, template, cfg.seq_len, progress)
            val = PairDataset.from_pairs(tok, val_pairs, template, cfg.seq_len, progress)
            tmp = cache.with_suffix(".tmp")
            torch.save({"train": train.examples, "val": val.examples}, tmp)
            os.replace(tmp, cache)
        return tok, train, val
    from .data import read_documents, tokenize_to_bin

    bin_path = out_dir / "tokens.bin"
    docs = list(read_documents(cfg.data.split(",")))
    tok = build_tokenizer(cfg, out_dir, docs)
    if not bin_path.is_file():
        tokenize_to_bin(tok, docs, bin_path, progress)
    split = 1.0 - cfg.val_fraction
    return tok, PackedDataset(bin_path, cfg.seq_len, 0.0, split), PackedDataset(bin_path, cfg.seq_len, split, 1.0)


def _autocast(dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast("cpu", dtype=DTYPES[dtype])


@torch.no_grad()
def evaluate_loss(model: Transformer, dataset, cfg: TrainConfig) -> float:
    """Mean target-token loss over the first `eval_batches` validation batches (fixed order)."""
    model.eval()
    total, count = 0.0, 0
    for indices in dataset.batch_order(cfg.batch_size, seed=0, epoch=0)[: cfg.eval_batches]:
        inputs, targets = dataset.collate(indices)
        with _autocast(cfg.dtype):
            logits, _ = model(inputs, use_cache=False)
        n = int((targets != IGNORE_INDEX).sum())
        total += float(loss_fn(logits, targets)) * n
        count += n
    model.train()
    return total / max(count, 1)


# ---------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool = True, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training. `stop_after` ends early after that many steps of this call
    (for tests and time-boxed sessions); the schedule still follows `max_steps`."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    tok, train_set, val_set = build_datasets(cfg, out_dir, progress)
    model = build_model(cfg)
    if model.args.vocab_size < tok.vocab_size:
        raise ValueError(f"model vocab_size {model.args.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    if cfg.lora is not None:  # LoRA / QLoRA hook (lora.py)
        from .lora import prepare_model

        prepare_model(model, cfg.lora, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    optimizer = make_optimizer(model, cfg)
    step, epoch, batch_in_epoch, tokens_seen = 0, 0, 0, 0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        tokens_seen = state.get("tokens_seen", 0)
        if progress:
            print(f"resuming from {ckpt} (step {step})")
    forward = torch.compile(model) if cfg.compile else model

    metrics_path = out_dir / "metrics.jsonl"
    if ckpt is None and metrics_path.exists():
        metrics_path.unlink()
    elif ckpt is not None and metrics_path.exists():  # drop lines logged after the checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= step]
        metrics_path.write_text("".join(l + "\n" for l in kept))

    order = train_set.batch_order(cfg.batch_size, cfg.seed, epoch)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    t_last, tok_last, steps_this_call = time.perf_counter(), tokens_seen, 0
    last_loss = float("nan")
    while step < cfg.max_steps and (stop_after is None or steps_this_call < stop_after):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = []
        for _ in range(cfg.grad_accum):
            if batch_in_epoch >= len(order):
                epoch, batch_in_epoch = epoch + 1, 0
                order = train_set.batch_order(cfg.batch_size, cfg.seed, epoch)
            micro.append(train_set.collate(order[batch_in_epoch]))
            batch_in_epoch += 1
        n_targets = sum(int((t != IGNORE_INDEX).sum()) for _, t in micro)
        loss_sum = 0.0
        for inputs, targets in micro:
            with _autocast(cfg.dtype):
                logits, _ = forward(inputs, use_cache=False)
            n = int((targets != IGNORE_INDEX).sum())
            loss = loss_fn(logits, targets) * (n / max(n_targets, 1))  # token-weighted over micro-batches
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += inputs.numel()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_this_call += 1
        last_loss = loss_sum
        record: dict[str, Any] = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                                  "tokens": tokens_seen, "epoch": epoch}
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            record["tokens_per_s"] = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens_seen
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            record["val_loss"] = evaluate_loss(model, val_set, cfg)
            bar.write(f"step {step}: train loss {loss_sum:.4f}, val loss {record['val_loss']:.4f}")
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "tokens_seen": tokens_seen}
            save_checkpoint(out_dir, step, model, optimizer, state, cfg, cfg.keep_last)
    bar.close()
    if step >= cfg.max_steps:
        plot_metrics(metrics_path, out_dir / "loss.png")
        if cfg.lora is not None:
            from .lora import save_adapter

            save_adapter(model, out_dir / "adapter", base_model_name_or_path=cfg.init_from)
    return {"step": step, "loss": last_loss, "model": model, "tokenizer": tok}


def plot_metrics(metrics_path: Path, out_png: Path) -> Path | None:
    """Train (smoothed) and validation loss against step, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in rows]
    loss = np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps[k - 1:], smooth, label=f"train (mean of {k})")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
