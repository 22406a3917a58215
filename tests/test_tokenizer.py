"""Tokenizers: known ids, lossless round trips, streaming detokenization, and the chat template
giving exactly mistral-common's ids."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_torch.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Any text but lone surrogates (not encodable) and U+2581 "▁", which SentencePiece itself uses
# for spaces and so decodes as " " (a limitation of the format, not of this code).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=60)
CORPUS = [
    "The cat sits on the mat. Le chat est assis sur le tapis.",
    "Hello, how are you? Bonjour, comment allez-vous ?",
    "I like green tea and café au lait. J'aime le thé vert et le café.",
] * 40


def train_sentencepiece(path: Path, vocab_size: int = 300) -> Path:
    """A small SentencePiece model of our own (bos=1, eos=2, unk=0, no pad, byte fallback)."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def v1() -> Tokenizer:
    return Tokenizer.from_name("v1")


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_name("v3")


@pytest.fixture(scope="module")
def tekken() -> Tokenizer:
    from mistral_torch.tokenizer import _data_dir

    return Tokenizer.from_file(_data_dir() / "tekken_240718.json")


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_file(train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model"))


# ---------------------------------------------------------------- known ids
def test_known_ids_v1(v1):
    assert (v1.vocab_size, v1.bos_id, v1.eos_id, v1.template) == (32000, 1, 2, "v1")
    assert v1.encode("Hello world") == [1, 22557, 1526]
    assert v1.encode("Hello world", bos=False, eos=True) == [22557, 1526, 2]
    assert v1.encode("[INST]", bos=False) == [733, 16289, 28793]  # plain text in v1
    assert v1.encode(" Hello", bos=False) == [28705, 22557]
    assert v1.encode("€😀", bos=False) == [17416, 30575]
    assert v1.decode([1, 22557, 1526, 2]) == "Hello world"


def test_known_ids_v3(v3):
    assert (v3.vocab_size, v3.bos_id, v3.eos_id, v3.template) == (32768, 1, 2, "v3")
    assert (v3.inst_id, v3.end_inst_id) == (3, 4)
    assert v3.encode("Hello world") == [1, 23325, 2294]
    assert v3.encode("Hello world", bos=False, eos=True) == [23325, 2294, 2]
    assert v3.encode(" Hello", bos=False) == [29473, 23325]
    assert v3.encode("€😀", bos=False) == [18184, 31343]
    assert v3.decode([1, 3, 23325, 2294, 4, 2]) == "Hello world"  # control ids decode to ""


def test_ids_equal_mistral_common(v1, v3):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    texts = ["Hello world", "  leading and trailing  ", "Tab\tnew\nline", "naïve café — 日本語 🙂", "1234567"]
    for ours, ref in ((v1, MistralTokenizer.v1()), (v3, MistralTokenizer.v3())):
        inner = ref.instruct_tokenizer.tokenizer
        for text in texts:
            assert ours.encode(text, bos=True, eos=True) == inner.encode(text, bos=True, eos=True)
            assert ours.decode(ours.encode(text)) == inner.decode(inner.encode(text, bos=True, eos=False))


def test_bad_inputs(v1, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Tokenizer.from_name("v9")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="expects a str"):
        v1.encode(123)
    with pytest.raises(ValueError, match=r"token id 32000 is outside the tokenizer's vocabulary \[0, 32000\)"):
        v1.decode([5, 32000])


# ---------------------------------------------------------------- round trips
@SETTINGS
@given(text=TEXT)
def test_roundtrip_v1_v3_tekken(v1, v3, tekken, text):
    for tok in (v1, v3, tekken):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, bos=False, eos=True)) == text


@SETTINGS
@given(text=TEXT)
def test_roundtrip_own_sentencepiece(own, text):
    """Our own model: most of this text is outside its 300 pieces, so byte fallback does the work."""
    assert own.decode(own.encode(text)) == text


def test_own_sentencepiece_model(own):
    assert (own.vocab_size, own.bos_id, own.eos_id, own.template) == (300, 1, 2, "v1")
    ids = own.encode("Le chat", eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    chat = own.encode_chat([{"role": "system", "content": "Translate."}, {"role": "user", "content": "cat"}])
    assert chat == [1] + own.encode("[INST] Translate.\n\ncat [/INST]", bos=False)


# ---------------------------------------------------------------- streaming
def stream_text(tok: Tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    dec = tok.stream_decoder(context)
    pieces = [dec.add(i) for i in ids]
    return pieces + [dec.flush()]


@SETTINGS
@given(text=TEXT, prefix=st.sampled_from(["", "Hello", "Le chat ", "日本"]))
def test_stream_pieces_concatenate_to_decode(v1, v3, tekken, own, text, prefix):
    for tok in (v1, v3, tekken, own):
        ids = tok.encode(text, bos=False)
        pieces = stream_text(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # never half a character
        # Continuing after a context keeps the leading space the full decode has.
        context = tok.encode(prefix)
        full = tok.decode(context + ids)
        assert "".join(stream_text(tok, ids, context)) == full[len(tok.decode(context)):]


@SETTINGS
@given(ids=st.lists(st.integers(0, 31999), max_size=40))
def test_stream_of_arbitrary_ids(v1, ids):
    """Any id sequence, with byte pieces cut anywhere: the pieces still add up to the decode."""
    assert "".join(stream_text(v1, ids)) == v1.decode(ids)


def test_stream_holds_incomplete_characters(v1):
    ids = v1.encode("a🦜b", bos=False)  # the parrot is four byte-fallback pieces in v1
    dec = StreamDecoder(v1)
    pieces = [dec.add(i) for i in ids]
    assert pieces == ["a", "", "", "", "🦜", "b"]
    assert v1.stream_decoder(v1.encode("The capital is")).add(v1.encode("Paris", bos=False)[0]) == " Paris"


# ---------------------------------------------------------------- chat template
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How can I help? "}, {"role": "user", "content": "Translate: cat"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}, {"role": "system", "content": "s1"},
     {"role": "user", "content": "f"}],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "system", "content": "sys"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "€ 😀 日本"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
     {"role": "user", "content": "  spaced  "}],
]


@functools.lru_cache(maxsize=None)
def mistral_common_chat(version: str):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ref = {"v1": MistralTokenizer.v1(), "v3": MistralTokenizer.v3(),
           "tekken": MistralTokenizer.v3(is_tekken=True)}[version]
    return lambda messages: ref.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


@pytest.mark.parametrize("version", ["v1", "v3", "tekken"])
def test_chat_template_equals_mistral_common(version, v1, v3, tekken):
    tok = {"v1": v1, "v3": v3, "tekken": tekken}[version]
    ref = mistral_common_chat(version)
    for conversation in CONVERSATIONS:
        assert tok.encode_chat(conversation) == ref(conversation), conversation


WORDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.none() | WORDS, turns=st.lists(st.tuples(WORDS, WORDS), min_size=0, max_size=3), last=WORDS)
def test_chat_template_property(v1, v3, system, turns, last):
    conversation = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    conversation.append({"role": "user", "content": last})
    for version, tok in (("v1", v1), ("v3", v3)):
        assert tok.encode_chat(conversation) == mistral_common_chat(version)(conversation)


def test_chat_template_shape(v1, v3):
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    text = lambda s: v3.encode(s, bos=False)  # noqa: E731
    assert v3.encode_chat(conversation) == [1, 3, *text("Q1"), 4, *text("A1"), 2, 3, *text("S\n\nQ2"), 4]
    text = lambda s: v1.encode(s, bos=False)  # noqa: E731
    assert v1.encode_chat(conversation) == [1, *text("[INST] S\n\nQ1 [/INST]"), *text("A1"), 2,
                                            *text("[INST] Q2 [/INST]")]


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "assistant", "content": "x"}], "start with a user or system"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "end with a user message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "user", "content": "q"}], "cannot follow an assistant"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "q"}],
     "assistant message must have content"),
])
def test_chat_errors(v3, messages, match):
    with pytest.raises(ValueError, match=match):
        v3.encode_chat(messages)


# ---------------------------------------------------------------- tokenizer.json and load_tokenizer
def train_tokenizer_json(path: Path) -> Path:
    """A small Llama-style BPE `tokenizer.json` (Metaspace, byte fallback) made with `tokenizers`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                    decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials[:3],
                                                       initial_alphabet=[], show_progress=False))
    tk.add_tokens(specials[3:])  # byte pieces, so byte fallback has something to fall back to
    tk.save(str(path))
    return path


def test_tokenizer_json(tmp_path):
    tok = Tokenizer.from_file(train_tokenizer_json(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.template) == (1, 2, "v1")
    for text in ["Le chat est assis.", "Hello, how are you?", "café"]:
        ids = tok.encode(text, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == text
        assert "".join(stream_text(tok, ids)) == text


def write_config(folder: Path, name: str, vocab_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"vocab_size": vocab_size}))
    return folder


def test_load_tokenizer_picks_the_folders_own_file(tmp_path, own):
    folder = write_config(tmp_path / "model", "config.json", 32000)
    (folder / "tokenizer.model").write_bytes(own.path.read_bytes())
    assert load_tokenizer(folder).vocab_size == 300  # its own file wins over the vocab size
    assert load_tokenizer(folder / "tokenizer.model").vocab_size == 300
    json_folder = write_config(tmp_path / "hf", "config.json", 32000)
    train_tokenizer_json(json_folder / "tokenizer.json")
    assert load_tokenizer(json_folder).path.name == "tokenizer.json"


def test_load_tokenizer_by_vocab_size(tmp_path):
    assert load_tokenizer(write_config(tmp_path / "a", "config.json", 32000)).vocab_size == 32000
    assert load_tokenizer(write_config(tmp_path / "b", "params.json", 32768)).vocab_size == 32768
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(write_config(tmp_path / "c", "config.json", 512))
    assert load_tokenizer("v1").vocab_size == 32000 and load_tokenizer("v3").vocab_size == 32768
    with pytest.raises(ValueError, match="unknown model"):
        load_tokenizer("no-such-model")
