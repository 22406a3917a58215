"""Load and save checkpoints: transformers (HF) folders, Mistral native folders, shipped models.

Formats read by `load_model`:

    HF       config.json + model.safetensors, or model-0000i-of-0000N.safetensors shards with
             model.safetensors.index.json; pytorch_model*.bin only as plain tensors
             (torch.load(weights_only=True)).
    native   params.json + consolidated.safetensors (Mistral's own layout: `layers.0.attention.wq`,
             `feed_forward.w1`, `tok_embeddings`, `output`, ...), or a single consolidated*.pth.
    name     a model shipped inside the package (`models/<name>/`, an HF folder).

The model is built on the `meta` device and its parameters are then set one tensor at a time
from memory-mapped safetensors, each cast to the target dtype as it arrives. Every tensor is read
through its own short-lived mapping, so the file pages it touched leave the process's RSS as soon
as the tensor is copied: peak memory is one copy of the weights plus one tensor.

HF's q_proj/k_proj rows are ordered for the half-split RoPE layout (rotate x[:d/2] with x[d/2:]),
Mistral's wq/wk for the interleaved layout (rotate x[2i] with x[2i+1]); `native_to_hf` and
`hf_to_native` permute them, exactly as transformers' convert_mistral_weights_to_hf.py does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .args import ModelArgs
from .model import Transformer

DEFAULT_MODEL = "tiny-en-fr"
MODELS_DIR = Path(__file__).resolve().parent / "models"

HF_CONFIG, NATIVE_PARAMS = "config.json", "params.json"
HF_SINGLE, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
NATIVE_WEIGHTS = "consolidated.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# A later quantization module registers a loader per method name here; `load_model` hands a
# checkpoint whose config declares `quantization` / `quantization_config` to it.
#   loader(folder, config: dict, args: ModelArgs, dtype: torch.dtype | None, device) -> Transformer
QUANTIZED_LOADERS: dict[str, Callable[..., Transformer]] = {}


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model path or name that does not exist (catchable as either error type)."""


# ---------------------------------------------------------------- names and paths
def shipped_models() -> list[str]:
    """Names of the models shipped inside the package (folders under `models/`)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def resolve_model_path(path_or_name: str | Path | None = None) -> Path:
    """A model folder (or file) from a path or a shipped model's name; None means the default model.

    An existing path wins; otherwise the name is looked up under the package's `models/` folder.
    Raises `ModelNotFoundError` (a ValueError and a FileNotFoundError) naming what was tried.
    """
    if path_or_name is None:
        path_or_name = DEFAULT_MODEL
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    looks_like_path = any(c in name for c in "/\\") or name.startswith((".", "~"))
    if not looks_like_path and name and (MODELS_DIR / name).is_dir():
        return MODELS_DIR / name
    if looks_like_path:
        raise ModelNotFoundError(f"model folder {path} does not exist")
    known = ", ".join(shipped_models()) or "none shipped yet"
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a folder or file, and not a shipped model (known: {known})"
    )


# ---------------------------------------------------------------- dtypes and sizes
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch.bfloat16, "bf16", "bfloat16", "torch.bfloat16", ... -> torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of: float32/fp32, bfloat16/bf16, float16/fp16)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "200MB", "64KiB" (KB/MB/GB are powers of 10)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot read size {size!r} (examples: 5GB, 200MB, 64KiB, 1000000)")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------- native <-> HF names and RoPE rows
_NATIVE_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_NATIVE_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_HF_LAYER = {v: k for k, v in _NATIVE_LAYER.items()}
_HF_TOP = {v: k for k, v in _NATIVE_TOP.items()}


def native_key_to_hf(key: str) -> str | None:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight` (None if unknown)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in _NATIVE_LAYER:
        return f"model.layers.{m.group(1)}.{_NATIVE_LAYER[m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", key)
    if m and m.group(1) in _NATIVE_TOP:
        return f"{_NATIVE_TOP[m.group(1)]}.weight"
    return None


def hf_key_to_native(key: str) -> str | None:
    """The inverse of `native_key_to_hf`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"
    m = re.fullmatch(r"(.+)\.weight", key)
    if m and m.group(1) in _HF_TOP:
        return f"{_HF_TOP[m.group(1)]}.weight"
    return None


def native_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows, interleaved-RoPE order -> q_proj/k_proj rows, half-split order (per head)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_native(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows, half-split order -> wq/wk rows, interleaved order (inverse of the above)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(hf_key: str, args: ModelArgs) -> int | None:
    """Number of heads whose rows must be permuted for this HF key (None: no permutation)."""
    if hf_key.endswith("self_attn.q_proj.weight"):
        return args.n_heads
    if hf_key.endswith("self_attn.k_proj.weight"):
        return args.n_kv_heads
    return None


# ---------------------------------------------------------------- reading files
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as exc:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def _safetensors_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor, memory-mapped; the mapping is released when the tensor is dropped."""
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)
    except SafetensorError as exc:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(key, tensor, file) over all shards, one tensor mapped at a time."""
    for file in files:
        for key in _safetensors_keys(file):
            yield key, _safetensors_tensor(file, key), file


def _torch_load_plain(file: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint, accepted only if it holds plain tensors (never runs arbitrary code)."""
    import pickle

    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load {file}: it is not a plain-tensor checkpoint, and unpickling it could run "
            f"arbitrary code (torch.load(weights_only=True) said: {reason}). "
            "Convert it to safetensors with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{file}: corrupt or truncated checkpoint ({exc})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{file} does not hold a flat dict of tensors (got {type(sd).__name__})")
    return sd


def _iter_pickles(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for file in files:
        sd = _torch_load_plain(file)
        for key in list(sd):
            yield key, sd.pop(key), file
        del sd


def _shard_files(folder: Path) -> list[Path] | None:
    """HF safetensors weight files in load order, or None if the folder has none."""
    index = folder / HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index} is missing from {folder}")
        return files
    if (folder / HF_SINGLE).is_file():
        return [folder / HF_SINGLE]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        m = re.fullmatch(r"model-\d+-of-(\d+)\.safetensors", shards[0].name)
        total = int(m.group(1)) if m else len(shards)
        width = len(m.group(1)) if m else 5
        for i in range(1, total + 1):
            name = f"model-{i:0{width}d}-of-{total:0{width}d}.safetensors"
            if not (folder / name).is_file():
                raise FileNotFoundError(f"shard {name} is missing from {folder}")
        return shards
    return None


def _pickle_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def detect_format(folder: Path) -> tuple[str, Path, list[Path]]:
    """("hf" | "native", config file, weight files) for a checkpoint folder, or a ValueError."""
    if not folder.exists():
        raise ModelNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a checkpoint folder")
    has_hf, has_native = (folder / HF_CONFIG).is_file(), (folder / NATIVE_PARAMS).is_file()
    if has_hf:
        files = _shard_files(folder) or _pickle_files(folder, "pytorch_model*.bin")
        if files:
            return "hf", folder / HF_CONFIG, files
    if has_native:
        if (folder / NATIVE_WEIGHTS).is_file():
            return "native", folder / NATIVE_PARAMS, [folder / NATIVE_WEIGHTS]
        pth = _pickle_files(folder, "consolidated*.pth")
        if len(pth) > 1:
            raise ValueError(
                f"{folder} holds {len(pth)} consolidated*.pth files: tensor-parallel native checkpoints "
                "are not supported (merge them into one file first)"
            )
        if pth:
            return "native", folder / NATIVE_PARAMS, pth
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    if has_hf or has_native:
        cfg = HF_CONFIG if has_hf else NATIVE_PARAMS
        raise FileNotFoundError(
            f"{folder} has {cfg} but no weights: expected model.safetensors, model-0000i-of-0000N.safetensors "
            f"(+ {HF_INDEX}), pytorch_model.bin, or {NATIVE_WEIGHTS} (found: {found})"
        )
    raise ValueError(
        f"unknown checkpoint format in {folder}: expected {HF_CONFIG} + model*.safetensors (transformers) "
        f"or {NATIVE_PARAMS} + {NATIVE_WEIGHTS} (Mistral native); found: {found}"
    )


# ---------------------------------------------------------------- load
def _check_quantization(config: dict[str, Any], config_file: Path) -> str | None:
    """The quantization method a config declares (None if none); unknown methods are refused."""
    for field in ("quantization", "quantization_config"):
        q = config.get(field)
        if not q:
            continue
        from . import quantize  # noqa: F401  (registers its loaders in QUANTIZED_LOADERS)

        method = q
        if isinstance(q, dict):
            method = q.get("method") or q.get("quant_method")
        if method in QUANTIZED_LOADERS:
            return method
        known = ", ".join(sorted(QUANTIZED_LOADERS)) or "none"
        raise ValueError(
            f"{config_file} declares '{field}' (method {method!r}), which this version cannot load "
            f"(known quantization methods: {known})"
        )
    return None


def _listing(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _set_param(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, name, nn.Parameter(value, requires_grad=getattr(module, name).requires_grad))


def load_model(path_or_name: str | Path | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> Transformer:
    """A `Transformer` (eval mode) from an HF or Mistral-native folder, or a shipped model's name.

    dtype:  target dtype ("bf16", torch.float32, ...); None keeps the checkpoint's own dtype
            (config.json's `torch_dtype`/`dtype`, else the dtype the weights are stored in).
    device: where the parameters live; each tensor goes there straight from its mapping.
    """
    folder = resolve_model_path(path_or_name)
    if folder.is_file() and folder.suffix.lower() == ".gguf":  # llama.cpp's format: gguf.py
        from .gguf import load_gguf

        return load_gguf(folder, dtype=dtype, device=device)
    if folder.is_file():
        folder = folder.parent
    fmt, config_file, files = detect_format(folder)
    config = _read_json(config_file)
    target = parse_dtype(dtype)
    try:
        args = ModelArgs.from_hf_config(config) if fmt == "hf" else ModelArgs.from_params_json(config)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{config_file} is missing or has a bad field: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{config_file}: {exc}") from None
    method = _check_quantization(config, config_file)
    if method is not None:
        return QUANTIZED_LOADERS[method](folder, config, args, target, device)
    if target is None and fmt == "hf":
        stored = config.get("torch_dtype") or config.get("dtype")
        target = parse_dtype(stored) if isinstance(stored, str) and stored != "auto" else None

    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}  # tied lm_head listed once
    if args.tie_embeddings:
        expected.pop("lm_head.weight", None)
    tensors = _iter_safetensors(files) if files[0].suffix == ".safetensors" else _iter_pickles(files)
    unexpected: list[str] = []
    loaded: set[str] = set()
    for key, tensor, file in tensors:
        hf_key = key if fmt == "hf" else native_key_to_hf(key)
        if hf_key is None or hf_key not in expected:
            if key.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and hf_key == "lm_head.weight"):
                continue  # recomputed / tied: not stored as parameters here
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[hf_key]:
            raise ValueError(
                f"shape mismatch for {key!r} in {file.name}: expected {expected[hf_key]} from "
                f"{config_file.name}, got {tuple(tensor.shape)} ({config_file.name} disagrees with the weights?)"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{key!r} in {file.name} has dtype {tensor.dtype}; expected floating-point weights")
        if target is None:
            target = tensor.dtype  # no dtype recorded: keep the stored one
        value = tensor.to(device=device, dtype=target, copy=True)  # owns its memory; mapping dropped
        del tensor
        heads = _rope_heads(hf_key, args) if fmt == "native" else None
        if heads is not None:
            value = native_to_hf(value, heads)
        _set_param(model, hf_key, value)
        loaded.add(hf_key)
    _check_keys(expected, loaded, unexpected, args, fmt, folder, config_file)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _check_keys(expected: dict[str, tuple[int, ...]], loaded: set[str], unexpected: list[str],
                args: ModelArgs, fmt: str, folder: Path, config_file: Path) -> None:
    """Missing/unexpected keys, explained as a layer-count disagreement when that is the cause."""
    missing = set(expected) - loaded
    if not missing and not unexpected:
        return
    layer_re = r"(?:model\.)?layers\.(\d+)\."
    layers_in_file = {int(m.group(1)) for k in [*loaded, *unexpected] if (m := re.match(layer_re, k))}
    if layers_in_file and max(layers_in_file) + 1 != args.n_layers:
        field = "num_hidden_layers" if fmt == "hf" else "n_layers"
        raise ValueError(
            f"{config_file.name} disagrees with the weights: it says {args.n_layers} layers ({field}), "
            f"the weights in {folder} hold {max(layers_in_file) + 1}"
        )
    problems = []
    if missing:
        names = [hf_key_to_native(k) or k for k in missing] if fmt == "native" else missing
        problems.append(f"missing key(s): {_listing(names)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_listing(unexpected)}")
    raise ValueError(f"checkpoint in {folder} does not match the model: {'; '.join(problems)}")


# ---------------------------------------------------------------- save
def _export_state(model: Transformer, fmt: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in the target format and dtype, tied lm_head written once (as embeddings)."""
    args = model.args
    for key, tensor in model.state_dict().items():
        if args.tie_embeddings and key == "lm_head.weight":
            continue
        tensor = tensor.detach().to(device="cpu", dtype=dtype)
        if fmt == "hf":
            yield key, tensor.contiguous()
            continue
        native = hf_key_to_native(key)
        if native is None:
            raise ValueError(f"cannot write {key!r} in Mistral native format (no native name for it)")
        heads = _rope_heads(key, args)
        yield native, (hf_to_native(tensor, heads) if heads is not None else tensor).contiguous()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dst`; on success it is fsynced and renamed to `dst`.

    On error the temporary folder is removed, so `dst` is never left half-written.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True, or --force, to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a saved model is an ordinary folder
        for p in tmp.iterdir():
            if p.is_file():
                os.chmod(p, 0o666 & ~umask)
            fsync_path(p)
        fsync_path(tmp)
        if dst.exists():  # overwrite: move the old one aside, swap in the new one, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old / dst.name, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: Transformer, path: str | Path, format: str = "hf",
               dtype: str | torch.dtype | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, *, overwrite: bool = False,
               extra_files: Iterable[str | Path] = (), extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model` as an HF folder (config.json + safetensors shards) or a Mistral native folder.

    dtype:          dtype of the written weights (default: the model's), recorded in config.json.
    max_shard_size: HF only; shards stay under it (a larger single tensor gets a shard of its own).
    extra_files:    files copied into the folder (e.g. the tokenizer).
    extra_config:   keys merged into config.json / params.json (e.g. a quantization record).
    The folder appears atomically (written beside it, then renamed); an existing one is refused
    unless `overwrite`.
    """
    if format not in ("hf", "mistral", "native"):
        raise ValueError(f"unknown format {format!r} (use 'hf' or 'mistral')")
    fmt = "hf" if format == "hf" else "native"
    quantized = next((k for k, t in model.state_dict().items() if not t.is_floating_point()), None)
    if quantized is not None:
        raise ValueError(f"{quantized!r} holds quantized (integer) weights: write a quantized model with "
                         "mistral_torch.quantize.save_quantized (or `mistral-torch quantize`)")
    dtype = parse_dtype(dtype) or model.dtype
    limit = parse_size(max_shard_size)
    extra = [Path(f) for f in extra_files]
    for f in extra:
        if not f.is_file():
            raise FileNotFoundError(f"extra file {f} does not exist")
    path = Path(path)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        if fmt == "hf":
            config = model.args.to_hf_config(torch_dtype=dtype_name(dtype))
            config["dtype"] = dtype_name(dtype)  # transformers >= 5 spelling
            _write_hf_shards(_export_state(model, "hf", dtype), tmp, limit)
        else:
            config = model.args.to_params_json()
            save_file(dict(_export_state(model, "native", dtype)), tmp / NATIVE_WEIGHTS)
        config.update(extra_config or {})
        (tmp / (HF_CONFIG if fmt == "hf" else NATIVE_PARAMS)).write_text(json.dumps(config, indent=2) + "\n")
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
    return path


def _write_hf_shards(state: Iterator[tuple[str, torch.Tensor]], folder: Path, limit: int) -> None:
    """Greedy shards of at most `limit` bytes, named and indexed as transformers does."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        name = folder / f"shard-{len(written):05d}.tmp"
        save_file(shard, name, metadata={"format": "pt"})
        written.append((name, list(shard)))

    for key, tensor in state:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            flush()
            shard, size = {}, 0
        shard[key], size, total = tensor, size + nbytes, total + nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        written[0][0].rename(folder / HF_SINGLE)
        return
    n = len(written)
    weight_map = {}
    for i, (file, keys) in enumerate(written, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        file.rename(folder / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def tokenizer_files(folder: Path) -> list[Path]:
    """Files of a checkpoint folder that travel with it on conversion (tokenizer and friends)."""
    keep = ("tokenizer", "special_tokens_map.json", "generation_config.json")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(keep))
