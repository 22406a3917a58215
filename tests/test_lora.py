"""LoRA / QLoRA: exact parameter counts, zero-init identity, training touches only adapters,
merge == unmerged forward, PEFT interop both ways, quantized bases, the memory planner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import hf_twin, tiny_model
from mistral_torch import ModelArgs, Transformer, fast, lora
from mistral_torch.lora import (
    LoRALinear, apply_lora, load_adapter, merge_adapter, merge_lora, plan_memory, print_trainable_parameters,
    save_adapter, unmerge_adapter,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is ~10x faster than two on a busy 2-core machine
    (the trainer's `threads=1` also sets it process-wide; restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toks(model: Transformer, n: int = 20, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def fwd(model: Transformer, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(t, use_cache=False)[0]


def randomize_b(model: nn.Module, std: float = 0.05, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, m in lora.lora_modules(model):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def train_steps(model: Transformer, steps: int = 5, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """A few AdamW steps of next-token loss on one fixed random batch (train mode, dropout on)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t = torch.randint(0, model.args.vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        logits, _ = model(t[:, :-1], use_cache=False)
        loss = F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- counts (Mistral-7B on meta)
@pytest.mark.parametrize("r, targets, expected", [
    (8, ["q_proj", "v_proj"], 3_407_872),
    (32, ["q_proj", "k_proj", "v_proj", "o_proj"], 27_262_976),
])
def test_mistral_7b_trainable_parameters_exact(r, targets, expected, capsys):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("mistral-7b-v0.1"))
    apply_lora(model, r=r, alpha=2 * r, target_modules=targets)
    line = print_trainable_parameters(model)
    total = 7_241_732_096 + expected
    assert line == f"trainable params: {expected:,d} || all params: {total:,d} || trainable%: {100 * expected / total:.4f}"
    assert capsys.readouterr().out.strip() == line
    # why not 33.5M: k_proj/v_proj map 4096 -> 1024 (GQA, 8 kv heads), so each costs r*(4096+1024)
    out = {"q_proj": 4096, "k_proj": 1024, "v_proj": 1024, "o_proj": 4096}
    assert expected == 32 * r * sum(4096 + out[t] for t in targets)


def test_counts_agree_with_peft_on_meta():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.MistralConfig(**{k: v for k, v in ModelArgs.from_name("mistral-7b-v0.1").to_hf_config().items()
                                        if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        hf = transformers.MistralForCausalLM(cfg)
        ours = Transformer(ModelArgs.from_name("mistral-7b-v0.1"))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    apply_lora(ours, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    assert lora.get_nb_trainable_parameters(ours) == pm.get_nb_trainable_parameters()


def test_targets_and_errors():
    m = tiny_model()
    apply_lora(m, r=2, target_modules="all-linear")
    names = [n for n, _ in lora.lora_modules(m)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    m = tiny_model()
    apply_lora(m, r=2, target_modules="gate_proj, down_proj")
    assert sorted({n.rsplit(".", 1)[1] for n, _ in lora.lora_modules(m)}) == ["down_proj", "gate_proj"]
    m = tiny_model()
    apply_lora(m, r=2, target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj")  # PEFT regex: full match
    assert [n for n, _ in lora.lora_modules(m)] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match="no module matches"):
        apply_lora(tiny_model(), target_modules=["qproj"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_model(), r=0)
    with pytest.raises(ValueError, match="unknown LoRA config key"):
        lora.LoRAConfig.from_dict({"rank": 8})


# ---------------------------------------------------------------- identity, training, merging
def test_zero_b_gives_exactly_the_base_logits(monkeypatch):
    base = tiny_model(seed=1)
    t = toks(base)
    fused = fwd(base, t)  # where oneDNN runs the plain model, its SwiGLU and residual adds are fused
    monkeypatch.setattr(fast, "plain_onednn", lambda *args: False)  # the same kernels with and without adapters
    ref = fwd(base, t)
    keys = list(base.state_dict())
    apply_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear", seed=0)
    assert torch.equal(fwd(base, t), ref)
    monkeypatch.undo()
    assert (fwd(base, t) - fused).abs().max() <= 1e-5
    base.train()  # dropout active on the adapter path: still exact, B = 0
    assert torch.equal(base(t, use_cache=False)[0].detach(), ref)
    sd = base.state_dict()
    assert [k for k in sd if "lora_" not in k] == keys  # base keys unchanged (HF names)
    assert "model.layers.0.self_attn.q_proj.lora_A" in sd


def test_only_lora_parameters_get_gradients_and_change():
    model = tiny_model(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"], seed=0)
    model.train()
    t = toks(model, 17, 4)
    logits, _ = model(t[:, :-1], use_cache=False)
    F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B = 0 at init: A gets no gradient signal yet, B does
    assert all(float(m.lora_B.grad.abs().sum()) > 0 for _, m in lora.lora_modules(model))
    model.zero_grad(set_to_none=True)
    losses = train_steps(model, steps=6)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed"
    for name, m in lora.lora_modules(model):
        assert float(m.lora_B.detach().abs().max()) > 0, name


def test_merged_forward_equals_unmerged_after_training():
    model = tiny_model(seed=3)
    apply_lora(model, r=4, alpha=16, dropout=0.05, target_modules="all-linear", seed=0)
    train_steps(model, steps=8, lr=3e-2)
    model.eval()
    t = toks(model, 24)
    unmerged = fwd(model, t)
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    merge_adapter(model)
    assert all(m.merged for _, m in lora.lora_modules(model))
    merged = fwd(model, t)
    # fp32: W + s·B·A rounds once per weight; logits (|x| ~ 1) agree to 1e-5 absolute
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0), (merged - unmerged).abs().max()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)
    unmerge_adapter(model)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-7, rtol=0)
    assert torch.allclose(fwd(model, t), unmerged, atol=1e-5, rtol=0)
    # merge_lora: plain nn.Linear layers again, same logits, no LoRA keys
    merge_lora(model)
    assert not list(lora.lora_modules(model))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora_" in k for k in model.state_dict())
    assert torch.allclose(fwd(model, t), unmerged, atol=1e-5, rtol=0)


def test_rslora_scaling_and_bf16_base():
    m = tiny_model(seed=4)
    apply_lora(m, r=16, alpha=8, target_modules=["q_proj"], use_rslora=True)
    assert m.model.layers[0].self_attn.q_proj.scaling == pytest.approx(8 / 4)
    m = tiny_model(seed=4).to(torch.bfloat16)
    apply_lora(m, r=4, alpha=8, target_modules=["q_proj"])
    q = m.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32  # fp32 adapters, as PEFT
    out = fwd(m, toks(m))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------- PEFT format and interop
def test_save_load_roundtrip_and_peft_file_layout(tmp_path):
    from safetensors.torch import load_file

    m = tiny_model(seed=5)
    apply_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0)
    randomize_b(m)
    t = toks(m)
    ref = fwd(m, t)
    save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    keys = sorted(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 8
    fresh = tiny_model(seed=5)
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fwd(fresh, t), ref)
    # into a model that already has matching LoRA layers
    again = apply_lora(tiny_model(seed=5), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert torch.equal(fwd(load_adapter(again, tmp_path / "ad"), t), ref)
    wrong = apply_lora(tiny_model(seed=5), r=2, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(wrong, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)


def test_trained_adapter_loads_in_peft_on_exported_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mistral_torch.checkpoint import save_model

    base = tiny_model(seed=6)
    save_model(base, tmp_path / "base")
    apply_lora(base, r=4, alpha=16, dropout=0.05, target_modules="all-linear", use_rslora=True, seed=0)
    train_steps(base, steps=4, lr=3e-2)
    base.eval()
    save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    t = toks(base, 24)
    with torch.no_grad():
        theirs = pm(t).logits
    ours = fwd(base, t)
    assert (theirs - ours).abs().max() < 1e-5


def test_peft_adapter_loads_here_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    ours = tiny_model(seed=8)
    hf = hf_twin(ours)
    pm = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.1,
        rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3}, task_type="CAUSAL_LM"))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    assert ours.model.layers[0].mlp.up_proj.r == 2 and ours.model.layers[1].self_attn.o_proj.alpha == 3
    t = toks(ours, 24)
    pm.eval()
    with torch.no_grad():
        theirs = pm(t).logits
    assert (fwd(ours, t) - theirs).abs().max() < 1e-5


# ---------------------------------------------------------------- quantized bases (QLoRA path)
class ToyInt8Linear(nn.Module):
    """A stand-in quantized linear (per-row int8): buffers + dequantize(), like quantize.py's."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "ToyInt8Linear":
        return cls(lin)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))


def quantize_toy(model: Transformer) -> Transformer:
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ToyInt8Linear(mod))
    return model


def test_lora_over_a_quantized_base_generic():
    model = quantize_toy(tiny_model(seed=9))
    t = toks(model)
    ref = fwd(model, t)
    keys = list(model.state_dict())
    apply_lora(model, r=4, alpha=8, target_modules="all-linear", seed=0)
    assert torch.equal(fwd(model, t), ref)
    assert [k for k in model.state_dict() if "lora_" not in k] == keys  # qweight/scale keys kept
    q = model.model.layers[0].self_attn.q_proj
    assert q.quantized and "ToyInt8Linear" in repr(q)
    # the custom backward (re-dequantize, nothing saved) gives the float linear's input gradient
    x = torch.randn(3, 64, requires_grad=True, dtype=torch.float64)
    q64 = LoRALinear(ToyInt8Linear(nn.Linear(64, 64, bias=False)), r=2, alpha=2)
    q64.lora_A.data = q64.lora_A.data.double()
    q64.lora_B.data = torch.randn(64, 2, dtype=torch.float64)
    q64._base.register_buffer("scale", q64._base.scale.double())
    q64.register_buffer("scale", q64._base.scale)
    assert torch.autograd.gradcheck(lambda x: q64(x), (x,))
    with pytest.raises(ValueError, match="merge_lora"):
        q.merge()
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    train_steps(model, steps=5, lr=3e-2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.eval()
    adapted = fwd(model, t)
    merge_lora(model)  # dequantize → merge → fp32 nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(fwd(model, t), adapted, atol=1e-5, rtol=0)


def nf4_available() -> bool:
    try:
        from mistral_torch import quantize  # noqa: F401

        return hasattr(quantize, "NF4Linear")
    except ImportError:
        return False


@pytest.mark.skipif(not nf4_available(), reason="quantize.NF4Linear not available")
def test_qlora_nf4_train_merge_requantize(tmp_path):
    from mistral_torch import quantize

    torch.manual_seed(0)
    fp = tiny_model(seed=10)
    model = tiny_model(seed=10)
    lora.prepare_model(model, lora.LoRAConfig(r=8, alpha=16, dropout=0.0, targets="all-linear", qlora=True), seed=0)
    q = model.model.layers[0].self_attn.q_proj
    assert q.quantized and isinstance(q._base, quantize.NF4Linear)
    sd = model.state_dict()  # NF4's own buffers under the HF names, + the adapter
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert {"model.layers.0.self_attn.q_proj.absmax_scale", "model.layers.0.self_attn.q_proj.lora_A"} <= set(sd)
    twin = lora.prepare_model(tiny_model(seed=99), lora.LoRAConfig(r=8, alpha=16, targets="all-linear", qlora=True))
    twin.load_state_dict(sd, strict=True)
    t = toks(model, 12)
    assert torch.equal(fwd(twin, t), fwd(model, t))
    twin.to(torch.bfloat16)  # quantization buffers keep their dtypes, as quantize.py's modules do
    assert twin.state_dict()["model.layers.0.self_attn.q_proj.absmax_scale"].dtype == torch.float32
    model.activation_checkpointing = True
    losses = train_steps(model, steps=6, lr=2e-2)
    assert losses[-1] < losses[0]
    model.eval()
    t = toks(model, 24)
    adapted = fwd(model, t)
    save_adapter(model, tmp_path / "ad")
    merged = merge_lora(model)  # dequantize → merge → fp32
    assert torch.allclose(fwd(merged, t), adapted, atol=1e-4, rtol=0)
    requant = lora.prepare_model(tiny_model(seed=10), lora.LoRAConfig(r=8, alpha=16, targets="all-linear", qlora=True))
    load_adapter(requant, tmp_path / "ad")
    merge_lora(requant, requantize=True)
    assert isinstance(requant.model.layers[0].self_attn.q_proj, quantize.NF4Linear)
    # quality kept: requantizing the merged weights moves the logits about as much as NF4 moves the fp base
    err_requant = (fwd(requant, t) - adapted).abs().mean()
    nf4_base = lora.quantize_base_nf4(tiny_model(seed=10))
    err_nf4 = (fwd(nf4_base, t) - fwd(fp, t)).abs().mean()
    assert err_requant < 2 * err_nf4


# ---------------------------------------------------------------- memory planner
def test_planner_components():
    args = ModelArgs.from_name("bench-125m")
    full = plan_memory(args, "full", 4, 256)
    lo = plan_memory(args, "lora", 4, 256, r=8, targets=["q_proj", "v_proj"])
    ql = plan_memory(args, "qlora", 4, 256, r=8, targets=["q_proj", "v_proj"])
    assert full.trainable == args.n_params and full.optimizer == 8 * args.n_params
    # peak at the start of the backward pass (activations + cross-entropy buffers, no grads yet)
    assert full.peak_at == "backward start" and full.gradients == 0
    # Mistral-7B, short sequences: the optimizer step (all grads + AdamW states) is the peak
    big = plan_memory(ModelArgs.from_name("mistral-7b-v0.1"), "full", 1, 128)
    assert big.peak_at == "optimizer step" and big.gradients == 4 * 7_241_732_096
    assert lo.trainable == 12 * 8 * ((768 + 768) + (768 + 256))
    assert lo.adapters == 4 * lo.trainable and lo.optimizer == 8 * lo.trainable
    assert full.total > lo.total > ql.total
    assert ql.weights < lo.weights / 2
    assert lo.activations < full.activations  # frozen projections keep no inputs for weight grads
    assert plan_memory(args, "lora", 8, 256).activations == pytest.approx(2 * lo.activations, rel=0.01)
    assert plan_memory(args, "qlora", 4, 256, dtype="bf16").activations < ql.activations
    # the planner's trainable count is apply_lora's, lm_head included when targeted
    targets = ["q_proj", "down_proj", "lm_head"]
    tiny = apply_lora(tiny_model(), r=4, target_modules=targets)
    assert plan_memory(tiny.args, "lora", 1, 8, r=4, targets=targets).trainable == \
        lora.get_nb_trainable_parameters(tiny)[0]
    with pytest.raises(ValueError, match="method"):
        plan_memory(args, "adapter", 1, 1)
    text = lora.format_plans([full, lo, ql], {"full": full.total})
    assert "activations" in text and "+0.0%" in text and "backward start" in text


@pytest.mark.slow
def test_planner_within_15_percent_of_measured_peak():
    """bench-125m, batch 4 × 256: planner vs peak RSS of real training steps (minutes on CPU)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_lora_memory.py"), "--steps", "2",
                          "--methods", "full,lora" + (",qlora" if nf4_available() else "")],
                         capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [l.split() for l in out.stdout.splitlines() if l.startswith(("full ", "lora ", "qlora "))]
    assert [r[0] for r in rows] == ["full", "lora"] + ["qlora"] * nf4_available(), out.stdout + out.stderr
    for row in rows:
        assert abs(float(row[-1].rstrip("%"))) <= 15, out.stdout


# ---------------------------------------------------------------- through the trainer
def folder_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny random base checkpoint with its own SentencePiece tokenizer, a French→English pairs file)."""
    from mistral_torch.checkpoint import save_model
    from mistral_torch.data import read_pairs, train_sentencepiece

    root = tmp_path_factory.mktemp("lora_base")
    dev = Path(__file__).resolve().parents[1] / "data" / "tatoeba" / "tatoeba_en_fr_dev.tsv"
    pairs = read_pairs(dev)[:300]
    (root / "pairs.tsv").write_text("".join(f"{en}\t{fr}\n" for en, fr in pairs), encoding="utf-8")
    tok = train_sentencepiece([t for p in pairs for t in p], root / "tokenizer.model", vocab_size=500)
    save_model(tiny_model(seed=11, vocab_size=512, max_seq_len=128), root / "base", extra_files=[tok])
    return root / "base", root / "pairs.tsv"


def lora_train_config(out_dir: Path, base: Path, data: Path, **overrides):
    from mistral_torch.train import TrainConfig

    raw = dict(out_dir=str(out_dir), init_from=str(base), data=str(data), template="translate-fr-en",
               reverse_pairs=True, val_fraction=0.1, seq_len=64, batch_size=8, max_steps=6, lr=1e-2,
               warmup_steps=2, eval_every=3, eval_batches=2, ckpt_every=3, log_every=1, weight_decay=0.0,
               threads=1, lora={"r": 4, "alpha": 8, "dropout": 0.05, "targets": "all-linear"})
    raw.update(overrides)
    return TrainConfig.from_dict(raw)


def test_trainer_lora_resume_adapter_and_untouched_base(tiny_base, tmp_path):
    from mistral_torch.checkpoint import load_model
    from mistral_torch.train import train

    base, data = tiny_base
    digest = folder_digest(base)
    whole = train(lora_train_config(tmp_path / "a", base, data), progress=False)
    train(lora_train_config(tmp_path / "b", base, data), progress=False, stop_after=3)  # interrupted...
    resumed = train(lora_train_config(tmp_path / "b", base, data), progress=False)  # ...and resumed
    assert folder_digest(base) == digest  # the base checkpoint on disk is untouched
    for run in ("a", "b"):
        assert (tmp_path / run / "adapter" / "adapter_config.json").is_file()
        assert (tmp_path / run / "loss.png").is_file()
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    # the saved adapter on a freshly loaded base reproduces the trained model
    model = whole["model"].eval()
    t = toks(model, 16)
    fresh = load_adapter(load_model(base), tmp_path / "a" / "adapter")
    assert torch.equal(fwd(fresh, t), fwd(model, t))
    cfg = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and cfg["r"] == 4
    with pytest.raises(ValueError, match="unknown LoRA config key"):
        lora_train_config(tmp_path / "c", base, data, lora={"rank": 4})


def test_merge_lora_cli(tiny_base, tmp_path, capsys):
    from mistral_torch.checkpoint import load_model
    from mistral_torch.cli import main

    base, _ = tiny_base
    digest = folder_digest(base)
    model = apply_lora(load_model(base), r=4, alpha=8, target_modules="all-linear", seed=0)
    randomize_b(model)
    save_adapter(model, tmp_path / "ad")
    assert main(["merge-lora", str(base), str(tmp_path / "ad"), str(tmp_path / "merged")]) == 0
    assert "merged 14 LoRA layers" in capsys.readouterr().out
    merged = load_model(tmp_path / "merged")
    t = toks(model, 16)
    assert torch.allclose(fwd(merged, t), fwd(model, t), atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    assert folder_digest(base) == digest
    assert main(["merge-lora", str(base), str(tmp_path / "ad"), str(tmp_path / "merged")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["merge-lora", str(base), str(tmp_path), str(tmp_path / "m2")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_plans_for_config(tiny_base, tmp_path):
    base, data = tiny_base
    cfg = lora_train_config(tmp_path, base, data)
    assert lora.config_method(cfg) == "lora"
    assert lora.config_method(lora_train_config(tmp_path, base, data, lora=None)) == "full"
    assert lora.config_method(lora_train_config(tmp_path, base, data, lora={"qlora": True})) == "qlora"
    full, lo, ql = lora.plans_for_config(cfg)
    assert lo.trainable == 2 * 4 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64),
                                                             (64, 160), (64, 160), (160, 64)])
    assert full.weights == 4 * ModelArgs.from_name("tiny").n_params


def test_finetune_lora_flags_and_dry_run(tiny_base, tmp_path, capsys):
    import argparse

    from mistral_torch import cli

    p = argparse.ArgumentParser()
    cli.add_lora_flags(p)
    assert cli.lora_table(p.parse_args([]), None) is None  # full fine-tuning
    t = cli.lora_table(p.parse_args(["--lora", "--r", "4", "--targets", "all-linear"]), None)
    assert t["r"] == 4 and t["targets"] == "all-linear" and t["qlora"] is False
    t = cli.lora_table(p.parse_args(["--qlora", "--alpha", "8"]), {"r": 16, "dropout": 0.1})
    assert t["qlora"] and t["r"] == 16 and t["alpha"] == 8 and t["dropout"] == 0.1
    with pytest.raises(ValueError, match="dropout"):
        cli.lora_table(p.parse_args(["--lora", "--dropout", "1.5"]), None)
    base, data = tiny_base
    cli.print_memory_plan(lora_train_config(tmp_path, base, data))
    out = capsys.readouterr().out
    assert "this run: lora" in out and all(m in out for m in ("full", "lora", "qlora", "activations"))


def test_quantized_base_with_checkpointing_and_bf16_autocast():
    def grads(checkpointing: bool, autocast: bool) -> dict[str, torch.Tensor]:
        model = quantize_toy(tiny_model(seed=12))
        apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0)
        randomize_b(model)
        model.activation_checkpointing = checkpointing
        model.train()
        t = toks(model, 17, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(t[:, :-1], use_cache=False)
        F.cross_entropy(logits.flatten(0, 1).float(), t[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False, False), grads(True, False)
    assert plain.keys() == ckpt.keys() and all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
    bf16 = grads(True, True)
    for k in plain:  # bf16 compute: same gradients to bf16 precision
        assert bf16[k].dtype == torch.float32
        assert torch.allclose(bf16[k], plain[k], atol=5e-2 * float(plain[k].abs().max()) + 1e-6), k


def test_finetune_lora_cli_then_generate_with_adapter(tiny_base, tmp_path, capsys):
    from mistral_torch.cli import main

    base, data = tiny_base
    digest = folder_digest(base)
    run = tmp_path / "run"
    common = ["finetune", "--init-from", str(base), "--data", str(data), "--template", "translate-fr-en",
              "--set", "reverse_pairs=true", "--set", "val_fraction=0.1", "--out-dir", str(run), "--seq-len", "64",
              "--batch-size", "8", "--max-steps", "4", "--eval-every", "2", "--ckpt-every", "2", "--threads", "1",
              "--lr", "1e-2", "--warmup-steps", "1", "--quiet", "--lora", "--r", "4", "--alpha", "8",
              "--targets", "all-linear"]
    assert main(common + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "this run: lora" in out and "peak" in out and not run.exists()
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "peak memory (lora): measured" in out and "planned" in out
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and folder_digest(base) == digest
    assert main(["merge-lora", str(base), str(run / "adapter"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    prompt = "Translate: French → English\nFrench: Bonjour.\nEnglish:"
    gen = ["generate", prompt, "--max-new-tokens", "6", "--quiet", "--threads", "1"]
    assert main(gen + ["--model", str(base), "--adapter", str(run / "adapter")]) == 0
    with_adapter = capsys.readouterr().out
    assert main(gen + ["--model", str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(["finetune", "--full", "--lora", "--data", str(data), "--init-from", str(base)]) == 2
    assert "cannot be combined" in capsys.readouterr().err
