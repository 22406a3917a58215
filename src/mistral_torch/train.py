"""The training loop: pre-training and full fine-tuning, with exact resume, on 1 or N processes.

    config ─► model + tokenizer + data ─► for step: accumulate grads ─► clip ─► AdamW ─► schedule
          └─► every `eval_every`: validation loss; every `ckpt_every`: atomic checkpoint

Checkpoints hold the model, optimizer, scheduler, data position and RNG states, written to a
temp dir then renamed, so a run killed at any moment resumes from the last complete one and
reproduces the uninterrupted loss curve.

The same code runs under `torchrun --nproc_per_node N`: each process takes its own slice of every
global batch, and the model is sharded with FSDP2 (`fully_shard` per decoder layer, then the root)
or replicated with DDP. The loss is the token mean over the *global* batch, so N processes follow
the curve one process would. FSDP checkpoints are sharded (`torch.distributed.checkpoint`) and
reload on any number of processes, a single one included.
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
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .args import ModelArgs
from .checkpoint import fsync_path
from .data import (IGNORE_INDEX, PackedDataset, PairDataset, get_template, read_pairs, shard_batch,
                   split_train_val)
from .model import Transformer


@dataclass
class TrainConfig:
    """Everything a run needs; read from a TOML/YAML file and/or flags, saved with each checkpoint."""

    out_dir: str = "runs/default"
    # model: a preset name, a dict of ModelArgs fields, or a checkpoint to start from (init_from)
    model: str | dict[str, Any] = "tiny"
    init_from: str | None = None
    tokenizer: str | None = None  # path/name; "sentencepiece:<vocab>" trains one on the training data
    # data
    data: str = ""  # a file, or several separated by commas
    data_format: str = "pairs"  # pairs | text
    template: str = "translate-en-fr"
    reverse_pairs: bool = False
    length_bucketing: bool = True  # pairs: batch examples of similar length (less padding)
    val_fraction: float = 0.01
    val_data: str | None = None
    seq_len: int = 256
    # optimisation; batch_size is the GLOBAL batch (sequences per micro-step over all processes)
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    fused_adamw: bool = True  # one fused kernel per step (much faster on CPU than the for-loop)
    dtype: str = "fp32"  # compute: fp32 | bf16 | fp16 (autocast, or FSDP's mixed-precision policy)
    activation_checkpointing: bool = False
    compile: bool = False
    # where: device auto = CUDA when available; under torchrun, parallel = fsdp (FSDP2) | ddp
    device: str = "auto"
    parallel: str = "fsdp"
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
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """From a `.toml` or `.yaml`/`.yml` file; `overrides` that are not None win."""
        raw = read_config_file(path)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)

    from_toml = from_file  # the historical name

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
        if cfg.parallel not in ("fsdp", "ddp"):
            raise ValueError(f"parallel must be 'fsdp' or 'ddp', got {cfg.parallel!r}")
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}")
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML or YAML (`.yaml`/`.yml`) run config, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".yaml", ".yml"):
        return tomllib.loads(text)
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from None
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return raw


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- processes and devices
@dataclass
class Runtime:
    """Where this process runs: rank `rank` of `world_size`, on `device`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we started torch.distributed (and end it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Sums over all processes (float64, so token counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, on rank 0 (others get [])."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out or []


def init_runtime(cfg: TrainConfig) -> Runtime:
    """Join torch.distributed when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world == 1:
        return Runtime(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), device, owns)


def wrap_model(model: Transformer, cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    """FSDP2 (each decoder layer, then the root) or DDP across processes; as is for one."""
    if not rt.distributed:
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.dtype], reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: torch.nn.Module) -> Transformer:
    """The Transformer inside a DDP wrapper (an FSDP2 model is the Transformer itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _grad_sync(model: torch.nn.Module, sync: bool):
    """Gradient accumulation: reduce gradients over processes only on the last micro-batch."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


# ---------------------------------------------------------------- optimiser and schedule
def param_groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters with weight decay (matrices) and without (norms,
    embeddings, vectors), in the optimizer's order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed_tokens" in name or "norm" in name else decay).append(name)
    return decay, no_decay


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (none on norms and embeddings)."""
    params = dict(model.named_parameters())
    decay, no_decay = param_groups(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=cfg.fused_adamw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy over targets != -100 (prompt and padding positions carry no loss)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


# ---------------------------------------------------------------- checkpoints
#   checkpoints/step_0000200/
#       model.safetensors   full weights (1 process, DDP)   | sharded/  DCP model + optimizer (FSDP)
#       trainer.pt          optimizer (unless sharded), RNG states of every rank, grad scaler
#       state.json          step, epoch, batch_in_epoch, tokens_seen
#       config.json         the model's transformers config; train_config.json: the resolved config
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")) + [root]:
        fsync_path(p)


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], cfg: TrainConfig, keep_last: int, rt: Runtime | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write `checkpoints/step_<7-digit step>` atomically (temp dir, fsync, rename) and prune old ones.
    Collective under torch.distributed: every process calls it."""
    rt = rt or Runtime()
    ckpt_root = Path(out_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    if rt.main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    rt.barrier()
    rngs = rt.gather(_rng_state())
    trainer: dict[str, Any] = {"rng": rngs[0] if rngs else None,
                               "scaler": scaler.state_dict() if scaler is not None else {}}
    if rt.distributed:
        trainer["rng_ranks"] = rngs
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / "sharded")
    elif rt.main:
        from safetensors.torch import save_file

        base = unwrap(model)
        weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in base.state_dict().items()}
        if base.args.tie_embeddings:
            weights.pop("lm_head.weight", None)
        save_file(weights, str(tmp / "model.safetensors"))
        trainer["optimizer"] = optimizer.state_dict()
    if rt.main:
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        (tmp / "config.json").write_text(json.dumps(unwrap(model).args.to_hf_config(), indent=1))
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)  # the rename itself is durable
        for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of interrupted writes are ignored)."""
    done = [p for p in sorted((Path(out_dir) / "checkpoints").glob("step_*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


@contextmanager
def _single_process_dcp():
    """DCP warns when it reads without torch.distributed; one process reading a sharded
    checkpoint is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _named_optimizer_state(model: torch.nn.Module, plain: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters numbered) → the same keyed by parameter name."""
    decay, no_decay = param_groups(model)
    names = decay + no_decay
    return {"state": {names[i]: s for i, s in plain["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in plain["param_groups"]]}


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rt: Runtime | None = None, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Restore model, optimizer, RNG and scaler from a checkpoint written on any number of processes."""
    rt = rt or Runtime()
    path = Path(path)
    if (path / "sharded").is_dir():  # DCP: resharded to this run's processes (or none)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
        with _single_process_dcp():
            dcp.load(sd, checkpoint_id=path / "sharded")
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        trainer = torch.load(path / "trainer.pt", weights_only=True)
    else:
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        if unwrap(model).args.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        if is_sharded(model):  # full checkpoint into a sharded model
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, weights, options=full)
            set_optimizer_state_dict(model, optimizer, _named_optimizer_state(model, trainer["optimizer"]),
                                     options=full)
        else:
            unwrap(model).load_state_dict(weights, strict=True)
            optimizer.load_state_dict(trainer["optimizer"])
    ranks = trainer.get("rng_ranks")
    _set_rng_state(ranks[rt.rank] if ranks and len(ranks) == rt.world_size else trainer["rng"])
    if scaler is not None and trainer.get("scaler"):
        scaler.load_state_dict(trainer["scaler"])
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------- export
def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """A run's checkpoint: the latest complete one, or that of `step`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}")
        return ckpt
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    if not (ckpt / "state.json").is_file():
        have = ", ".join(p.name.removeprefix("step_").lstrip("0") or "0"
                         for p in sorted((run_dir / "checkpoints").glob("step_*"))) or "none"
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {run_dir} (steps kept: {have})")
    return ckpt


def load_checkpoint_model(ckpt: str | Path) -> Transformer:
    """The weights of a training checkpoint (full or sharded) as a plain fp32 `Transformer`."""
    ckpt = Path(ckpt)
    args = ModelArgs.from_hf_config(json.loads((ckpt / "config.json").read_text()))
    train_cfg = json.loads((ckpt / "train_config.json").read_text()) if (ckpt / "train_config.json").is_file() else {}
    if train_cfg.get("lora"):
        raise ValueError(f"{ckpt} is a LoRA run: its adapter is in <out_dir>/adapter (see the lora module)")
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("lm_head.weight")
    if (ckpt / "sharded").is_dir():
        import torch.distributed.checkpoint as dcp

        weights = {k: torch.empty(s) for k, s in shapes.items()}
        with _single_process_dcp():
            dcp.load({"model": weights}, checkpoint_id=ckpt / "sharded")
    else:
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / "model.safetensors"))
    if args.tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def run_tokenizer_file(run_dir: str | Path, train_cfg: dict[str, Any]) -> Path:
    """The tokenizer file a run trained with (its own `tokenizer.model`, or the configured one)."""
    own = Path(run_dir) / "tokenizer.model"
    if own.is_file():
        return own
    from .tokenizer import load_tokenizer

    return Path(load_tokenizer(train_cfg.get("tokenizer") or train_cfg.get("init_from")).path)


def export_run(run_dir: str | Path, dst: str | Path, step: int | None = None, dtype: str | None = None,
               overwrite: bool = False) -> Path:
    """Turn a run's checkpoint (latest by default) into a model folder `load_model(dst)` reads:
    config.json + model.safetensors (transformers format) with the tokenizer file beside them."""
    from .checkpoint import save_model

    ckpt = find_checkpoint(run_dir, step)
    model = load_checkpoint_model(ckpt)
    tok_file = run_tokenizer_file(run_dir, json.loads((ckpt / "train_config.json").read_text()))
    return save_model(model, dst, dtype=dtype, overwrite=overwrite, extra_files=[tok_file])


def _export_final(model: torch.nn.Module, tok_file: Path, dst: Path, rt: Runtime) -> None:
    """Write the finished model to `dst` (collective under FSDP: the shards are gathered to rank 0)."""
    from .checkpoint import save_model

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rt.main:
            with torch.device("meta"):
                plain = Transformer(model.args)
            plain.load_state_dict(sd, strict=True, assign=True)
            if model.args.tie_embeddings:
                plain.lm_head.weight = plain.model.embed_tokens.weight
            save_model(plain, dst, overwrite=True, extra_files=[tok_file])
    elif rt.main:
        save_model(unwrap(model), dst, dtype=torch.float32, overwrite=True, extra_files=[tok_file])
    rt.barrier()


# ---------------------------------------------------------------- building blocks of a run
def build_model(cfg: TrainConfig) -> Transformer:
    if cfg.init_from:
        from .checkpoint import load_model

        return load_model(cfg.init_from, dtype=torch.float32)
    args = ModelArgs.from_name(cfg.model) if isinstance(cfg.model, str) else ModelArgs.from_dict(cfg.model)
    return Transformer(args).init_weights(seed=cfg.seed)


def build_tokenizer(cfg: TrainConfig, out_dir: Path, texts=None):
    """The run's tokenizer; "sentencepiece:N" trains one on `texts` (an iterable of strings) once."""
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
    """(tokenizer, train dataset, validation dataset). Tokenized data is cached in `out_dir`."""
    if cfg.data_format == "pairs":
        pairs = read_pairs(cfg.data, reverse=cfg.reverse_pairs)
        if cfg.val_data:
            train_pairs, val_pairs = pairs, read_pairs(cfg.val_data, reverse=cfg.reverse_pairs)
        else:
            train_pairs, val_pairs = split_train_val(pairs, cfg.val_fraction, cfg.seed)
        tok = build_tokenizer(cfg, out_dir, [t for p in train_pairs for t in p])
        cache = out_dir / "data_cache.pt"
        template = get_template(cfg.template)
        key = [cfg.data, cfg.val_data, cfg.template, cfg.reverse_pairs, cfg.seq_len, cfg.val_fraction,
               cfg.seed, str(tok.path)]
        blob = torch.load(cache, weights_only=True) if cache.is_file() else None
        if blob is not None and blob.get("key", key) == key:  # (caches of older runs have no key)
            train, val = PairDataset(blob["train"], tok.eos_id), PairDataset(blob["val"], tok.eos_id)
        else:
            train = PairDataset.from_pairs(tok, train_pairs, template, cfg.seq_len, progress)
            val = PairDataset.from_pairs(tok, val_pairs, template, cfg.seq_len, progress)
            tmp = cache.with_suffix(".tmp")
            torch.save({"train": train.examples, "val": val.examples, "key": key}, tmp)
            os.replace(tmp, cache)
        return tok, train, val
    from .data import bin_meta, corpus_signature, iter_text_pieces, sample_lines, tokenize_to_bin

    files = [f.strip() for f in cfg.data.split(",") if f.strip()]
    if not files:
        raise ValueError("data_format 'text' needs `data`: one or more corpus files, comma-separated")
    tok = build_tokenizer(cfg, out_dir, sample_lines(files))
    bin_path = out_dir / "tokens.bin"
    sources = {"sources": corpus_signature(files), "tokenizer": str(tok.path)}
    meta = bin_meta(bin_path)
    if meta is None or any(meta.get(k) != v for k, v in sources.items()):
        total = sum(Path(f).stat().st_size for f in files)
        tokenize_to_bin(tok, iter_text_pieces(files), bin_path, progress, total_bytes=total, meta=sources)
    split = 1.0 - cfg.val_fraction
    return tok, PackedDataset(bin_path, cfg.seq_len, 0.0, split), PackedDataset(bin_path, cfg.seq_len, split, 1.0)


def _autocast(cfg: TrainConfig, device: torch.device, model: torch.nn.Module | None = None):
    if cfg.dtype == "fp32" or (model is not None and is_sharded(model)):  # FSDP casts by its policy
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype])


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataset, cfg: TrainConfig, rt: Runtime | None = None) -> float:
    """Mean target-token loss over the first `eval_batches` validation batches (fixed order),
    each split over the processes like a training batch."""
    rt = rt or Runtime()
    model.eval()
    total, count = 0.0, 0
    for indices in dataset.batch_order(cfg.batch_size, seed=0, epoch=0)[: cfg.eval_batches]:
        if len(indices) < rt.world_size:
            continue
        inputs, targets = dataset.collate(shard_batch(indices, rt.rank, rt.world_size))
        inputs, targets = inputs.to(rt.device), targets.to(rt.device)
        with _autocast(cfg, rt.device, model):
            logits, _ = model(inputs, use_cache=False)
        total += float(loss_fn(logits, targets, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    model.train()
    total, count = rt.all_sum(total, count)
    return total / max(count, 1)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics logged up to `step` (a resumed run rewrites the rest); a last line cut
    short by a kill is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, path)


def _resolve_resume(resume: bool | str | Path, out_dir: Path) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a complete checkpoint (no state.json)")
    return path


# ---------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool | str | Path = True, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training.

    resume:     True / "latest": from the newest checkpoint in `out_dir` if any; a path: from
                that checkpoint (of this or another run, on any number of processes); False: fresh.
    stop_after: end early after that many steps of this call (tests, time-boxed sessions); the
                schedule still follows `max_steps`.
    Under torchrun every process calls this; rank 0 logs, plots and writes files.
    """
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = init_runtime(cfg)
    out_dir = Path(cfg.out_dir)
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in (out_dir / "checkpoints").glob(".tmp_step_*"):  # from a killed write
            shutil.rmtree(leftover, ignore_errors=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # rank 0 trains the tokenizer and tokenizes the data once; the others then read its caches
    if rt.main:
        tok, train_set, val_set = build_datasets(cfg, out_dir, progress)
    rt.barrier()
    if not rt.main:
        tok, train_set, val_set = build_datasets(cfg, out_dir, False)
    model = build_model(cfg)
    if model.args.vocab_size < tok.vocab_size:
        raise ValueError(f"model vocab_size {model.args.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    if cfg.lora is not None:  # LoRA / QLoRA hook (lora.py)
        from .lora import prepare_model

        prepare_model(model, cfg.lora, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.to(rt.device).train()
    model = wrap_model(model, cfg, rt)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.dtype == "fp16")
    step, epoch, batch_in_epoch, tokens_seen = 0, 0, 0, 0
    ckpt = _resolve_resume(resume, out_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, rt, scaler)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        tokens_seen = state.get("tokens_seen", 0)
        if progress and rt.main:
            print(f"resuming from {ckpt} (step {step})")
    forward = torch.compile(model) if cfg.compile else model

    metrics_path = out_dir / "metrics.jsonl"
    if rt.main and metrics_path.exists():
        if ckpt is None:
            metrics_path.unlink()
        else:  # drop lines logged after the checkpoint
            _trim_metrics(metrics_path, step)

    def order_of(epoch: int) -> list[list[int]]:
        if isinstance(train_set, PairDataset):
            return train_set.batch_order(cfg.batch_size, cfg.seed, epoch, bucket=cfg.length_bucketing)
        return train_set.batch_order(cfg.batch_size, cfg.seed, epoch)

    order = order_of(epoch)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step",
               disable=not (progress and rt.main), dynamic_ncols=True)
    t_last, tok_last, steps_this_call = time.perf_counter(), tokens_seen, 0
    last_loss = float("nan")
    while step < cfg.max_steps and (stop_after is None or steps_this_call < stop_after):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = []  # this process's slice of each of the step's global batches
        for _ in range(cfg.grad_accum):
            while True:
                if batch_in_epoch >= len(order):
                    epoch, batch_in_epoch = epoch + 1, 0
                    order = order_of(epoch)
                batch = order[batch_in_epoch]
                batch_in_epoch += 1
                if len(batch) >= rt.world_size:  # (a last batch too small to split is skipped)
                    break
            inputs, targets = train_set.collate(shard_batch(batch, rt.rank, rt.world_size))
            micro.append((inputs.to(rt.device), targets.to(rt.device)))
        # the loss is the mean over every target token of the global step: each process divides its
        # token sum by the global count, times world_size because DDP/FSDP average the gradients
        local_targets = sum(int((t != IGNORE_INDEX).sum()) for _, t in micro)
        n_targets, n_tokens = rt.all_sum(local_targets, sum(i.numel() for i, _ in micro))
        scale = rt.world_size / max(n_targets, 1)
        loss_sum = torch.zeros((), device=rt.device)
        for i, (inputs, targets) in enumerate(micro):
            with _grad_sync(model, sync=i == len(micro) - 1):
                with _autocast(cfg, rt.device, model):
                    logits, _ = forward(inputs, use_cache=False)
                ce = loss_fn(logits, targets, reduction="sum")
                scaler.scale(ce * scale).backward()
            loss_sum += ce.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = rt.all_sum(float(loss_sum))[0] / max(n_targets, 1)
        step += 1
        steps_this_call += 1
        tokens_seen += int(n_tokens)
        last_loss = loss
        record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens": tokens_seen, "epoch": epoch}
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            record["tokens_per_s"] = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens_seen
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            record["val_loss"] = evaluate_loss(forward, val_set, cfg, rt)
            if rt.main:
                bar.write(f"step {step}: train loss {loss:.4f}, val loss {record['val_loss']:.4f}")
        if rt.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "tokens_seen": tokens_seen}
            save_checkpoint(out_dir, step, model, optimizer, state, cfg, cfg.keep_last, rt, scaler)
    bar.close()
    if step >= cfg.max_steps:
        if rt.main:
            plot_metrics(metrics_path, out_dir / "loss.png")
        if cfg.lora is not None:
            from .lora import save_adapter

            if rt.main:
                save_adapter(unwrap(model), out_dir / "adapter", base_model_name_or_path=cfg.init_from)
        else:  # a model folder that load_model / generate / chat read directly
            _export_final(model, Path(tok.path), out_dir / "final", rt)
    if rt.owns_group:
        dist.destroy_process_group()
    return {"step": step, "loss": last_loss, "model": unwrap(model), "tokenizer": tok}


def plot_metrics(metrics_path: Path, out_png: Path) -> Path | None:
    """Train (smoothed) and validation loss against step, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
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
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_title(f"{out_png.parent.name}: {len(rows)} steps, {rows[-1].get('tokens', 0):,} tokens", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
