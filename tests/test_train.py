"""The trainer: overfitting, schedule, exact resume, SIGKILL survival, export, config files, and
2-process FSDP2 / DDP on CPU (gloo) against 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mistral_torch import ModelArgs, Transformer
from mistral_torch.train import (TrainConfig, latest_checkpoint, load_checkpoint_model, loss_fn, lr_at,
                                 make_optimizer, param_groups, train)

REPO = Path(__file__).resolve().parents[1]
# 2-process runs agree with 1 process up to float summation order (FSDP reduce-scatters and DDP
# all-reduces gradients in fp32): losses within this relative tolerance over 6 steps.
DIST_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(a 40 kB excerpt of Tiny Shakespeare, a 512-piece SentencePiece tokenizer trained on it)."""
    from mistral_torch.data import sample_lines, train_sentencepiece

    root = tmp_path_factory.mktemp("corpus")
    text = (REPO / "data" / "shakespeare" / "tiny_shakespeare.txt").read_text()[:40_000]
    (root / "shakespeare.txt").write_text(text)
    tok = train_sentencepiece(list(sample_lines([root / "shakespeare.txt"])), root / "tokenizer.model", 512)
    return root / "shakespeare.txt", tok


def small_config(out_dir: Path, corpus, **overrides) -> dict:
    data, tok = corpus
    raw = dict(out_dir=str(out_dir), model="tiny", tokenizer=str(tok), data=str(data), data_format="text",
               val_fraction=0.1, seq_len=32, batch_size=8, grad_accum=2, max_steps=6, lr=3e-3, min_lr=3e-4,
               warmup_steps=2, eval_every=3, eval_batches=2, ckpt_every=3, keep_last=5, log_every=1, threads=1)
    raw.update(overrides)
    return raw


def losses(out_dir: Path) -> list[tuple[int, float, float | None]]:
    rows = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows]


def close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(1.0, abs(b))


# ---------------------------------------------------------------- optimisation
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Transformer(ModelArgs.from_name("tiny")).init_weights(seed=0).train()
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0)
    opt = make_optimizer(model, cfg)
    batch = torch.randint(3, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    first = None
    for _ in range(150):
        logits, _ = model(inputs, use_cache=False)
        loss = loss_fn(logits, targets)
        first = first if first is not None else loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert first > 6.0  # ~ln(512) at the start
    assert loss.item() < 0.05


def test_schedule_and_weight_decay_groups():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))
    model = Transformer(ModelArgs.from_name("tiny"))
    decay, no_decay = param_groups(model)
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert all("layernorm" in n for n in no_decay if n.startswith("model.layers"))
    assert "lm_head.weight" in decay and "model.layers.0.mlp.gate_proj.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


# ---------------------------------------------------------------- checkpoints, resume, export
def test_stopped_and_resumed_run_reproduces_the_loss_curve_exactly(corpus, tmp_path):
    from mistral_torch.checkpoint import load_model
    from mistral_torch.cli import main

    whole = train(TrainConfig.from_dict(small_config(tmp_path / "a", corpus)), progress=False)
    cfg = TrainConfig.from_dict(small_config(tmp_path / "b", corpus))
    part = train(cfg, progress=False, stop_after=4)  # checkpoint at 3, stopped after 4
    assert part["step"] == 4 and not (tmp_path / "b" / "final").exists()
    resumed = train(cfg, progress=False)  # from step 3; step 4 is redone and its log line rewritten
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bit-identical, validation included
    assert len(losses(tmp_path / "a")) == 6
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_0000006"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "trainer.pt", "state.json", "config.json",
                                                "train_config.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert set(state) == {"step", "epoch", "batch_in_epoch", "tokens_seen"} and state["step"] == 6
    assert json.loads((ckpt / "train_config.json").read_text())["grad_accum"] == 2
    # the finished run is a model folder, and export-run makes the same from any checkpoint
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = whole["model"].eval()(tokens, use_cache=False)[0]
    final = load_model(tmp_path / "a" / "final")
    torch.testing.assert_close(final(tokens, use_cache=False)[0], expected, rtol=0, atol=0)
    assert main(["export-run", str(tmp_path / "b"), str(tmp_path / "exp")]) == 0
    exported = load_model(tmp_path / "exp")
    torch.testing.assert_close(exported(tokens, use_cache=False)[0], expected, rtol=0, atol=0)
    assert (tmp_path / "exp" / "tokenizer.model").read_bytes() == corpus[1].read_bytes()
    assert main(["export-run", str(tmp_path / "b"), str(tmp_path / "exp")]) == 2  # exists: refused
    assert main(["export-run", str(tmp_path / "b"), str(tmp_path / "exp3"), "--step", "3"]) == 0
    assert main(["export-run", str(tmp_path / "b"), str(tmp_path / "exp2"), "--step", "2"]) == 2
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000


def test_sigkill_mid_checkpoint_never_corrupts_latest(corpus, tmp_path):
    """A training process killed with SIGKILL while a checkpoint is being written leaves the last
    complete checkpoint as `latest`, and resuming from it reproduces the uninterrupted curve."""
    data, tok = corpus
    out = tmp_path / "killed"
    flags = ["--model", "tiny", "--tokenizer", str(tok), "--data", str(data), "--seq-len", "32",
             "--batch-size", "8", "--max-steps", "12", "--ckpt-every", "1", "--eval-every", "100",
             "--warmup-steps", "2", "--lr", "3e-3", "--threads", "1", "--quiet",
             "--set", "keep_last=2", "--set", "val_fraction=0.1", "--set", "eval_batches=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mistral_torch.cli", "pretrain", "--out-dir", str(out), *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts, mid_write, deadline = out / "checkpoints", False, time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            tmps = list(ckpts.glob(".tmp_step_*")) if ckpts.is_dir() else []
            if tmps and len(list(ckpts.glob("step_*"))) >= 2 and any(tmps[0].glob("*")):
                mid_write = True  # a checkpoint directory is half-written right now
                break
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert mid_write, "the writer was never caught mid-checkpoint"
    latest = latest_checkpoint(out)
    step = json.loads((latest / "state.json").read_text())["step"]
    assert step < 12
    load_checkpoint_model(latest)  # complete and loadable
    # resume (a fresh process would do the same) and compare with a run never interrupted
    raw = small_config(out, corpus, grad_accum=1, max_steps=12, ckpt_every=1, keep_last=2, eval_every=100)
    train(TrainConfig.from_dict(raw), progress=False)
    assert not list(ckpts.glob(".tmp_step_*"))  # the half-written one was cleaned up
    train(TrainConfig.from_dict({**raw, "out_dir": str(tmp_path / "whole")}), progress=False)
    assert losses(out) == losses(tmp_path / "whole")


# ---------------------------------------------------------------- configs and the command line
def test_config_files_flags_and_errors(corpus, tmp_path):
    from mistral_torch.cli import build_parser, train_config

    (tmp_path / "run.yaml").write_text("model: tiny\nlr: 0.002\nbetas: [0.9, 0.99]\ndata: corpus.txt\n")
    (tmp_path / "run.toml").write_text('lr = 0.002\ndata = "corpus.txt"\n[model]\ndim = 32\nn_layers = 1\n')
    parse = build_parser().parse_args
    cfg = train_config(parse(["pretrain", "--config", str(tmp_path / "run.yaml"), "--lr", "0.01",
                              "--set", "eval_batches=7", "--set", "template=plain", "--ddp"]), {"data_format": "text"})
    assert (cfg.lr, cfg.betas, cfg.eval_batches, cfg.template, cfg.parallel, cfg.data_format) == \
        (0.01, (0.9, 0.99), 7, "plain", "ddp", "text")
    cfg = train_config(parse(["finetune", "--full", "--config", str(tmp_path / "run.toml")]), {"data_format": "pairs"})
    assert cfg.model == {"dim": 32, "n_layers": 1} and cfg.data_format == "pairs"
    assert TrainConfig.from_toml(tmp_path / "run.toml").lr == 0.002
    with pytest.raises(ValueError, match="unknown training config key"):
        train_config(parse(["pretrain", "--data", "x", "--set", "learning_rate=1"]), {})
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig.from_dict({"parallel": "zero3"})
    # the shipped recipes parse
    for recipe in ("tiny-en-fr.toml", "shakespeare.toml"):
        TrainConfig.from_file(REPO / "recipes" / recipe)


def test_finetune_full_on_pairs_with_bf16_autocast_and_activation_checkpointing(corpus, tmp_path):
    from mistral_torch.cli import main
    from mistral_torch.data import read_pairs

    pairs = read_pairs(REPO / "data" / "tatoeba" / "tatoeba_en_fr_dev.tsv")[:120]
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    args = ["finetune", "--out-dir", str(tmp_path / "ft"), "--model", "tiny", "--tokenizer", str(corpus[1]),
            "--data", str(tmp_path / "pairs.tsv"), "--seq-len", "64", "--batch-size", "8", "--max-steps", "3",
            "--eval-every", "3", "--ckpt-every", "3", "--threads", "1", "--quiet", "--set", "eval_batches=2",
            "--set", "val_fraction=0.1"]
    assert main(args) == 2  # neither --full nor LoRA
    assert main([*args, "--full", "--dtype", "bf16", "--activation-checkpointing"]) == 0
    rows = losses(tmp_path / "ft")
    assert len(rows) == 3 and all(5.0 < loss < 7.5 for _, loss, _ in rows) and rows[-1][2] is not None
    assert (tmp_path / "ft" / "final" / "config.json").is_file()


# ---------------------------------------------------------------- 2 processes (torchrun, gloo on CPU)
def torchrun(out_dir: Path, corpus, *extra: str, nproc: int = 2) -> None:
    cfg = small_config(out_dir, corpus)
    cfg_file = out_dir.parent / f"{out_dir.name}.json.toml"
    import tomllib  # (written as TOML by hand: flat keys, strings and numbers only)

    cfg_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    tomllib.loads(cfg_file.read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mistral_torch.cli", "pretrain", "--config", str(cfg_file), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def single_process_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig.from_dict(small_config(out, corpus)), progress=False)
    return out


def assert_same_curve(run: Path, reference: Path, steps=None) -> None:
    got, want = losses(run), losses(reference)
    if steps is not None:
        want = [r for r in want if r[0] in steps]
    assert [r[0] for r in got] == [r[0] for r in want]
    for (s, loss, val), (_, loss_ref, val_ref) in zip(got, want):
        assert close(loss, loss_ref, DIST_RTOL), (s, loss, loss_ref)
        assert (val is None) == (val_ref is None) and (val is None or close(val, val_ref, DIST_RTOL))


def test_fsdp2_two_processes_match_one_and_sharded_checkpoint_reloads_on_one(corpus, single_process_run, tmp_path):
    out = tmp_path / "fsdp"
    torchrun(out, corpus)  # FSDP2 is the default under torchrun
    assert_same_curve(out, single_process_run)
    ckpt = out / "checkpoints" / "step_0000003"
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"] and not (ckpt / "model.safetensors").exists()
    # the sharded step-3 checkpoint, saved by 2 ranks, continues in 1 process with the same losses
    cont = tmp_path / "continued"
    train(TrainConfig.from_dict(small_config(cont, corpus)), progress=False, resume=ckpt)
    assert_same_curve(cont, single_process_run, steps={4, 5, 6})
    # the gathered final model equals the sharded last checkpoint
    from mistral_torch.checkpoint import load_model

    final, last = load_model(out / "final"), load_checkpoint_model(latest_checkpoint(out))
    assert all(torch.equal(final.state_dict()[k], v) for k, v in last.state_dict().items())


def test_ddp_two_processes_match_one(corpus, single_process_run, tmp_path):
    out = tmp_path / "ddp"
    torchrun(out, corpus, "--ddp")
    assert_same_curve(out, single_process_run)
    assert (out / "checkpoints" / "step_0000006" / "model.safetensors").is_file()  # DDP: full checkpoints


@pytest.mark.slow
def test_full_checkpoint_continues_under_fsdp2(corpus, single_process_run, tmp_path):
    """The other direction: a 1-process (full) checkpoint resumed by 2 FSDP2 ranks."""
    out = tmp_path / "fsdp_from_full"
    torchrun(out, corpus, "--resume", str(single_process_run / "checkpoints" / "step_0000003"))
    assert_same_curve(out, single_process_run, steps={4, 5, 6})
