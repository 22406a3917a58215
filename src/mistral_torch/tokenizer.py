"""Tokenizers: text <-> token ids, the instruct chat template, and a streaming detokenizer.

`Tokenizer` wraps one of three on-disk formats behind the same small API:

    SentencePiece  `tokenizer.model[.vN]`  Mistral's v1 / v3 files, or one trained by us
    Tekken         `tekken.json`            (mistral-common's tiktoken-based tokenizer)
    transformers   `tokenizer.json`         (the `tokenizers` library)

The real Mistral tokenizers ship inside `mistral-common`: `Tokenizer.from_name("v1")` (32000
pieces, Mistral-7B v0.1/v0.2) and `Tokenizer.from_name("v3")` (32768 pieces, v0.3).

The chat template is written out here (`encode_chat`) and tested to give exactly the ids of
mistral-common's instruct tokenizers:

    v1 (markers are text):     <s>[INST] {sys}\\n\\n{user} [/INST]{answer}</s>[INST] {user} [/INST]
    v3 (markers are controls): <s>[INST]{user}[/INST]{answer}</s>[INST]{sys}\\n\\n{user}[/INST]

v1 puts the system prompt before the first user message, v2/v3 before the last one; v3 strips
trailing spaces from assistant answers. A tokenizer whose vocabulary has `[INST]` as a control
piece uses the v3 form, any other (v1, our own SentencePiece models) the text form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece

NAMED = {  # Tokenizer.from_name: files shipped in mistral_common/data
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}
BY_VOCAB_SIZE = {32000: "v1", 32768: "v3"}  # a checkpoint without its own tokenizer file
TOKENIZER_FILES = ("tekken.json", "tokenizer.model", "tokenizer.json")  # looked for in this order


def _data_dir() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data"


# ---------------------------------------------------------------- backends (one per file format)
class _SentencePiece:
    """A SentencePiece model through the `sentencepiece` library (Mistral's or our own)."""

    def __init__(self, path: Path) -> None:
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.version = "v3" if self.control_id("[INST]") is not None else "v1"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))  # control pieces (<s>, </s>, [INST], ...) decode to ""

    def control_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece and self.sp.IsControl(i) else None


class _Tekken:
    """Mistral's tiktoken-based `tekken.json`, through mistral-common's `Tekkenizer`."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        self.tk = Tekkenizer.from_file(str(path))
        self.vocab_size = self.tk.n_words
        self.bos_id, self.eos_id = self.tk.bos_id, self.tk.eos_id
        self.version = self.tk.version.value

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, bos=False, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids))  # special tokens are skipped

    def control_id(self, piece: str) -> int | None:
        try:
            return self.tk.get_special_token(piece)
        except Exception:  # mistral-common raises its own exception types for unknown pieces
            return None


class _HFTokenizers:
    """A transformers `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: Path) -> None:
        import tokenizers

        self.tk = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = self.control_id("<s>"), self.control_id("</s>")
        self.version = "v3" if self.control_id("[INST]") is not None else "v1"

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def control_id(self, piece: str) -> int | None:
        special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        return special.get(piece)


# ---------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Encode/decode text, build chat prompts, and detokenize a stream of ids."""

    def __init__(self, backend: _SentencePiece | _Tekken | _HFTokenizers, path: Path) -> None:
        self._backend = backend
        self.path = path
        self.vocab_size: int = backend.vocab_size
        self.version: str = backend.version  # "v1": text [INST] markers; "v3"+: control markers
        self.inst_id = backend.control_id("[INST]")
        self.end_inst_id = backend.control_id("[/INST]")

    # -------------------------------------------------------------- construction
    @classmethod
    def from_name(cls, name: str) -> "Tokenizer":
        """A Mistral tokenizer shipped in mistral-common: "v1" (32000 pieces) or "v3" (32768)."""
        if name not in NAMED:
            raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(NAMED)}")
        return cls.from_file(_data_dir() / NAMED[name])

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load `tekken.json`, a transformers `tokenizer.json`, or any SentencePiece model file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                head = json.load(f)
            is_tekken = isinstance(head, dict) and "config" in head and isinstance(head.get("vocab"), list)
            return cls(_Tekken(path) if is_tekken else _HFTokenizers(path), path)
        try:
            return cls(_SentencePiece(path), path)
        except RuntimeError as exc:  # sentencepiece's error for a file it cannot parse
            raise ValueError(f"{path} is not a SentencePiece model, tekken.json or tokenizer.json: {exc}") from None

    @property
    def bos_id(self) -> int:
        if self._backend.bos_id is None:
            raise ValueError(f"tokenizer {self.path.name} has no BOS token")
        return self._backend.bos_id

    @property
    def eos_id(self) -> int:
        if self._backend.eos_id is None:
            raise ValueError(f"tokenizer {self.path.name} has no EOS token")
        return self._backend.eos_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.path.name!r}, vocab_size={self.vocab_size}, chat template {self.template})"

    @property
    def template(self) -> str:
        """"v1" ([INST] markers as text) or "v3" ([INST] markers as control ids)."""
        return "v3" if self.inst_id is not None and self.end_inst_id is not None else "v1"

    # -------------------------------------------------------------- text
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first / EOS last when asked."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (BOS, EOS, [INST], ...) are dropped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids)

    def stream_decoder(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """A `StreamDecoder` continuing after `context` (e.g. the prompt's ids)."""
        return StreamDecoder(self, context)

    # -------------------------------------------------------------- chat
    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt ids for an OpenAI-style conversation ending with a user message.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. System
        messages are joined into one system prompt; consecutive messages of one role are merged
        (both with "\\n\\n"), as mistral-common does.
        """
        system, turns = _normalize_chat(messages)
        if system is not None and self.version not in ("v1", "v2", "v3"):
            raise ValueError(f"system prompts of tokenizer version {self.version} are not supported")
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        system_turn = users[0] if self.template == "v1" else users[-1]
        ids = [self.bos_id]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if i == system_turn and system:
                    content = system + "\n\n" + content
                if self.template == "v1":
                    ids += self.encode(f"[INST] {content} [/INST]", bos=False)
                else:
                    ids += [self.inst_id, *self.encode(content, bos=False), self.end_inst_id]
            else:
                text = content if self.template == "v1" else content.rstrip(" ")
                ids += self.encode(text, bos=False, eos=True)
        return ids


def _normalize_chat(messages: Sequence[dict[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt, [(role, content)]) with runs of one role merged, starting with a user turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation needs at least one message")
    roles = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"each message must be a dict with role system, user or assistant, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message content must be a string, got {m.get('content')!r}")
        roles.append(m["role"])
    if roles[0] == "assistant":
        raise ValueError("a conversation must start with a user or system message")
    for prev, cur in zip(roles, roles[1:]):
        if prev == "assistant" and cur == "system":
            raise ValueError("a system message cannot follow an assistant message")
    if len(messages) > 1 and roles[-1] != "user":
        raise ValueError(f"a conversation must end with a user message to be answered, not {roles[-1]}")
    system_parts = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    system = "\n\n".join(system_parts) if system_parts else None
    # Merge runs of one role (a system message breaks a run, as in mistral-common), drop system.
    runs: list[tuple[str, list[str]]] = []
    for m in messages:
        if runs and runs[-1][0] == m["role"]:
            runs[-1][1].append(m["content"])
        else:
            runs.append((m["role"], [m["content"]]))
    turns = [(role, "\n\n".join(parts)) for role, parts in runs if role != "system"]
    for role, content in turns:
        if role == "assistant" and not content:
            raise ValueError("an assistant message must have content")
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return system, turns


# ---------------------------------------------------------------- streaming detokenizer
class StreamDecoder:
    """Turns ids arriving one by one into text pieces that concatenate to the full decode.

    A piece is released only once it ends on a complete character (a byte-fallback sequence
    cut in the middle decodes to U+FFFD, which is held back). Decoding always restarts a few
    tokens back ("prefix"), so leading spaces come out as in the full decode and the work per
    token stays constant. `context` (e.g. the prompt's ids) is decoded before the first piece.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in context][-8:]
        self.prefix = 0  # start of the window decoded each time
        self.read = len(self.ids)  # ids before this are already in the emitted text

    def add(self, token: int) -> str:
        """Add one id; return the new text it completes (possibly "")."""
        self.ids.append(int(token))
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 64:  # keep the list short on long generations
            self.ids, self.read, self.prefix = self.ids[self.prefix:], self.read - self.prefix, 0
        return text[len(done):]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):] if len(text) > len(done) else ""


# ---------------------------------------------------------------- a checkpoint's tokenizer
def load_tokenizer(path_or_name: str | Path | None = None) -> Tokenizer:
    """The tokenizer that goes with a checkpoint (folder, file or shipped name; None: default).

    The folder's own `tekken.json` / `tokenizer.model[.vN]` / `tokenizer.json` when present,
    otherwise the Mistral tokenizer matching its vocabulary size (32000: v1, 32768: v3).
    "v1" and "v3" name the Mistral tokenizers directly; a tokenizer file path loads that file.
    """
    if isinstance(path_or_name, str) and path_or_name in NAMED and not Path(path_or_name).exists():
        return Tokenizer.from_name(path_or_name)
    from .checkpoint import resolve_model_path

    path = resolve_model_path(path_or_name)
    if path.is_file():
        if path.suffix == ".gguf":  # llama.cpp files embed their vocabulary
            from .gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            path = path.parent
        else:
            return Tokenizer.from_file(path)
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            return Tokenizer.from_file(path / name)
    versioned = sorted(path.glob("tokenizer.model.v*")) + sorted(path.glob("tekken*.json"))
    if versioned:
        return Tokenizer.from_file(versioned[-1])
    vocab_size = _vocab_size(path)
    if vocab_size in BY_VOCAB_SIZE:
        return Tokenizer.from_name(BY_VOCAB_SIZE[vocab_size])
    raise ValueError(
        f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)}) and its vocabulary size "
        f"{vocab_size} matches no Mistral tokenizer (32000: v1, 32768: v3)"
    )


def _vocab_size(folder: Path) -> int | None:
    """vocab_size from a checkpoint folder's params.json or config.json."""
    for name in ("params.json", "config.json"):
        if (folder / name).is_file():
            with open(folder / name, encoding="utf-8") as f:
                size = json.load(f).get("vocab_size")
            if size is not None:
                return int(size)
    return None
