"""Load and save checkpoints: transformers (HF) folders, Mistral native folders, shipped models."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "tiny-en-fr"
MODELS_DIR = Path(__file__).resolve().parent / "models"


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package (folders under `models/`)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def resolve_model_path(path_or_name: str | Path | None = None) -> Path:
    """A model folder (or file) from a path or a shipped model's name; None means the default model.

    An existing path wins; otherwise the name is looked up under the package's `models/` folder.
    """
    if path_or_name is None:
        path_or_name = DEFAULT_MODEL
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if name and "/" not in name and "\\" not in name and (MODELS_DIR / name).is_dir():
        return MODELS_DIR / name
    known = ", ".join(shipped_models()) or "none shipped yet"
    raise ValueError(f"unknown model {name!r}: not a folder or file, and not a shipped model (known: {known})")
