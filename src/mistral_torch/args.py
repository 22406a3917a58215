"""`ModelArgs`: the model's hyper-parameters, named as in Mistral's `params.json`.

Presets cover the released Mistral-7B checkpoints plus small configurations for tests and
benchmarks. `from_hf_config` / `to_hf_config` and `from_params_json` / `to_params_json` map the
two on-disk config formats both ways.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelArgs:
    """Hyper-parameters of a Mistral-architecture decoder (names follow `params.json`)."""

    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    norm_eps: float = 1e-5
    vocab_size: int = 32000
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # None: full causal attention
    max_seq_len: int = 32768
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ValueError(
                f"ModelArgs.sliding_window must be a positive integer or None, got {self.sliding_window!r}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelArgs.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelArgs.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelArgs.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelArgs.rope_theta must be > 0, got {self.rope_theta!r}")

    # ------------------------------------------------------------------ presets and dicts
    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """A preset by name, e.g. `mistral-7b-v0.1` or `tiny` (see `PRESETS`)."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[key])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Build from a dict, rejecting unknown keys with their names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s): {', '.join(unknown)}")
        return cls(**d)

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        layer = attn + ffn + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * layer + self.dim + head

    # ------------------------------------------------------------------ params.json (Mistral native)
    @classmethod
    def from_params_json(cls, p: dict[str, Any]) -> "ModelArgs":
        """From Mistral's `params.json` (the reference format; extra keys such as `moe` rejected)."""
        p = dict(p)
        unsupported = [k for k in ("moe", "vision_encoder", "lora") if p.get(k)]
        if unsupported:
            raise ValueError(f"params.json uses unsupported feature(s): {', '.join(unsupported)}")
        # Older releases spell the window as a list per layer or omit fields; normalise.
        window = p.get("sliding_window")
        if isinstance(window, list):
            window = window[0] if window else None
        head_dim = p.get("head_dim") or p["dim"] // p["n_heads"]
        return cls(
            dim=p["dim"], n_layers=p["n_layers"], head_dim=head_dim, hidden_dim=p["hidden_dim"],
            n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads", p["n_heads"]),
            norm_eps=p.get("norm_eps", 1e-5), vocab_size=p["vocab_size"],
            rope_theta=p.get("rope_theta", 10000.0), sliding_window=window,
            max_seq_len=p.get("max_seq_len", p.get("max_position_embeddings", 32768)),
            tie_embeddings=p.get("tied_embeddings", p.get("tie_embeddings", False)),
        )

    def to_params_json(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.sliding_window is not None:
            p["sliding_window"] = self.sliding_window
        if self.tie_embeddings:
            p["tied_embeddings"] = True
        return p

    # ------------------------------------------------------------------ config.json (transformers)
    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> "ModelArgs":
        """From a transformers `config.json` (Mistral or Llama architecture)."""
        arch = c.get("model_type")
        if arch not in (None, "mistral", "llama"):
            raise ValueError(f"config.json model_type {arch!r} is not supported (expected 'mistral' or 'llama')")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("config.json uses attention_bias/mlp_bias, which Mistral does not have")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act {act!r} is not supported (expected 'silu')")
        rope_theta = c.get("rope_theta")
        if rope_theta is None:
            rope_theta = (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        n_heads = c["num_attention_heads"]
        window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        return cls(
            dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
            hidden_dim=c["intermediate_size"], n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads, norm_eps=c.get("rms_norm_eps", 1e-6),
            vocab_size=c["vocab_size"], rope_theta=float(rope_theta), sliding_window=window,
            max_seq_len=c.get("max_position_embeddings", 32768),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        return {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": torch_dtype, "use_cache": True,
        }


_V01 = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
            norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0, sliding_window=4096,
            max_seq_len=32768)
_V02 = {**_V01, "rope_theta": 1e6, "sliding_window": None}
_V03 = {**_V02, "vocab_size": 32768}

PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b-v0.1": _V01,
    "mistral-7b-instruct-v0.1": _V01,
    "mistral-7b-v0.2": _V02,
    "mistral-7b-instruct-v0.2": _V02,
    "mistral-7b-v0.3": _V03,
    "mistral-7b-instruct-v0.3": _V03,
    # Small configurations for tests: a window of 8 is crossed after a handful of tokens.
    "tiny": dict(dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2,
                 vocab_size=512, sliding_window=8, max_seq_len=256),
    "tiny-full": dict(dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2,
                      vocab_size=512, sliding_window=None, max_seq_len=256),
    # The shipped English→French translator: GQA 8/2, a window (64) shorter than the context (256).
    "mistral-tiny-en-fr": dict(dim=256, n_layers=6, head_dim=32, hidden_dim=768, n_heads=8,
                               n_kv_heads=2, vocab_size=8000, sliding_window=64, max_seq_len=256),
    # The benchmark configuration (~125M parameters at the real vocabulary).
    "bench-125m": dict(dim=768, n_layers=12, head_dim=64, hidden_dim=2048, n_heads=12,
                       n_kv_heads=4, vocab_size=32000, sliding_window=4096, max_seq_len=32768),
}
