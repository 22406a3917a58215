"""GGUF import/export (gguf.py): round trips, quantizers against ggml's reference, the embedded
tokenizer and chat template, files written the llama.cpp-converter way, clear errors, the convert
command, and (when llama-cpp-python is installed) llama.cpp itself running our files."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

from conftest import tiny_args

from mistral_torch import Transformer, load_model
from mistral_torch.checkpoint import save_model

gguf = pytest.importorskip("gguf")
from mistral_torch import gguf as G  # noqa: E402
from mistral_torch.tokenizer import Tokenizer  # noqa: E402

DEV = "data/tatoeba/tatoeba_en_fr_dev.tsv"


def model(seed: int = 0, std: float = 0.1, **overrides) -> Transformer:
    """A tiny random model whose logits are peaked enough for greedy decoding to be stable."""
    return Transformer(tiny_args(**overrides)).init_weights(std=std, seed=seed).eval()


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def texts(n: int = 200) -> list[str]:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    lines = [line.rstrip("\n").split("\t") for line in open(root / DEV, encoding="utf-8")][:n]
    return [t for en, fr in lines for t in (en, fr, f"Translate: English → French\nEnglish: {en}\nFrench:",
                                             f"  {en}  \n\n{fr} 1234 ")]


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    """A small unigram SentencePiece model trained as the shipped model's is (user-defined symbols)."""
    from mistral_torch.data import train_sentencepiece

    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_sentencepiece([t for t in texts(800) if "Translate" not in t], path, vocab_size=500)
    return Tokenizer.from_file(path)


# ---------------------------------------------------------------- names and quantizers
def test_tensor_names_match_gguf_package():
    m = model()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, m.args.n_layers)
    for key in m.state_dict():
        ours = G.gguf_name(key)
        assert ours == names.get_name(key, try_suffixes=(".weight",)), key
        assert G.hf_name(ours) == key
    assert G.hf_name("blk.0.attn_q.bias") is None and G.hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantizers_bit_exact_with_ggml_reference(qtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g) * 3
    w[0, :32] = 0                            # an all-zero block
    w[1, :32] = 0.25
    w[1, 5], w[1, 7] = 0.5, -0.5             # a tie in magnitude: the first one wins
    w[2, 40] = -7.0                          # the largest magnitude is negative
    w[3] = w[3].half().float()               # values exactly on fp16
    t = getattr(gguf.GGMLQuantizationType, qtype)
    ref = gguf.quants.quantize(w.numpy(), t)
    ours = (G.quantize_q8_0 if qtype == "Q8_0" else G.quantize_q4_0)(w).numpy()
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    deq = (G.dequantize_q8_0 if qtype == "Q8_0" else G.dequantize_q4_0)(torch.from_numpy(ref), 256)
    assert np.array_equal(deq.numpy(), gguf.quants.dequantize(ref, t))


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=True, sliding_window=None),
                                       dict(n_kv_heads=4, rope_theta=1e6, norm_eps=1e-6)])
def test_f32_round_trip_is_bit_exact(tmp_path, overrides):
    m = model(**overrides)
    path = G.save_gguf(m, tmp_path / "m.gguf", "f32")
    back = G.load_gguf(path)
    assert back.args == m.args  # sliding window, eps and theta included
    assert_same_weights(m, back)
    if m.args.tie_embeddings:
        assert back.lm_head.weight is back.model.embed_tokens.weight
        assert "output.weight" not in G.GGUFFile(path).tensors
    tokens = torch.randint(0, m.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(tokens)[0], back(tokens)[0])


@pytest.mark.parametrize("dtype,outtype", [(torch.bfloat16, "bf16"), (torch.float16, "f16")])
def test_half_models_round_trip_bit_exact(tmp_path, dtype, outtype):
    m = model().to(dtype)
    back = load_model(G.save_gguf(m, tmp_path / "m.gguf"))  # outtype follows the dtype; load_model dispatches
    assert_same_weights(m, back)
    f = G.GGUFFile(tmp_path / "m.gguf")
    assert f.type_name("blk.0.attn_q.weight") == outtype.upper() and f.type_name("output_norm.weight") == "F32"


def test_lossy_round_trips_within_bounds(tmp_path):
    """f16: |err| <= 2^-11 |w|. q8_0: |err| <= max|block|/254 + 2^-11 max|block| (round to the scale,
    scale rounded to fp16). q4_0: |err| <= |d| + 8|d| 2^-11 with d = max/8 (one step at the clipped
    top code)."""
    m = model(hidden_dim=192)
    ref = m.state_dict()
    for outtype in ("f16", "q8_0", "q4_0"):
        back = G.load_gguf(G.save_gguf(m, tmp_path / f"{outtype}.gguf", outtype)).float()
        f = G.GGUFFile(tmp_path / f"{outtype}.gguf")
        for key, w in back.state_dict().items():
            w0 = ref[key]
            if w0.dim() == 1:
                assert torch.equal(w, w0), key  # norms stay f32
                continue
            err = (w - w0).abs()
            if outtype == "f16":
                assert (err <= w0.abs() * 2**-11 + 2**-25).all(), key  # 2^-25: fp16 subnormals
                continue
            kind = f.type_name(G.gguf_name(key))
            blocks = w0.reshape(w0.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            bound = blocks / 254 + blocks * 2**-11 if kind == "Q8_0" else blocks / 8 * (1 + 2**-8)
            assert (err.reshape(blocks.shape[0], -1, 32) <= bound * (1 + 1e-6)).all(), (outtype, key)
        if outtype == "q4_0":
            assert f.type_name("output.weight") == "Q8_0" and f.type_name("blk.0.ffn_up.weight") == "Q4_0"


def test_rows_not_divisible_by_32_fall_back_to_f16(tmp_path):
    m = model(hidden_dim=144)  # down_proj rows have 144 values (not a multiple of 32)
    f = G.GGUFFile(G.save_gguf(m, tmp_path / "m.gguf", "q8_0"))
    assert f.type_name("blk.0.ffn_down.weight") == "F16" and f.type_name("blk.0.ffn_up.weight") == "Q8_0"


def test_keep_quantized_maps_q4_0_onto_int4_modules(tmp_path):
    quantize = pytest.importorskip("mistral_torch.quantize")
    m = model(hidden_dim=192)
    path = G.save_gguf(m, tmp_path / "m.gguf", "q4_0")
    plain, kept = G.load_gguf(path), G.load_gguf(path, keep_quantized=True)
    q = kept.model.layers[0].self_attn.q_proj
    assert isinstance(q, quantize.Int4Linear) and q.group_size == 32
    assert isinstance(kept.model.embed_tokens, quantize.Int4Embedding)
    assert type(kept.lm_head) is torch.nn.Linear  # output.weight is Q8_0
    for name, module in kept.named_modules():
        if isinstance(module, quantize.Int4Linear):
            w = plain.get_submodule(name).weight
            blocks = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            err = (module.dequantize(torch.float32) - w).abs().reshape(blocks.shape[0], -1, 32)
            assert (err <= blocks / 256 + 1e-12).all(), name  # only the scales' fp16 -> bf16 rounding
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(tokens)[0], kept(tokens)[0]
    assert (a - b).abs().max() < 2e-2 * a.abs().max()


# ---------------------------------------------------------------- tokenizer
def test_embedded_sentencepiece_round_trips_byte_for_byte(tmp_path, unigram):
    # v3 spells out every piece type, the unigram model has user-defined pieces (v1: read below as
    # llama.cpp's converter writes it)
    for tok in (Tokenizer.from_name("v3"), unigram):
        m = model(vocab_size=max(512, tok.vocab_size))  # 512 > 500: padded embeddings for `unigram`
        path = G.save_gguf(m, tmp_path / "m.gguf", "f16", tok, overwrite=True)
        f = G.GGUFFile(path)
        assert G.sentencepiece_bytes(f) == tok.path.read_bytes(), tok
        back = G.load_gguf_tokenizer(f)
        assert back.vocab_size == tok.vocab_size and back.template == tok.template
        for t in texts(20):
            assert back.encode(t) == tok.encode(t)
    assert f.get("tokenizer.ggml.model") == "t5"  # unigram: llama.cpp's Viterbi tokenizer
    assert len(f.get("tokenizer.ggml.tokens")) == 512 and f.get("tokenizer.ggml.tokens")[511] == "[PAD511]"
    assert f.get("tokenizer.ggml.bos_token_id") == 1 and f.get("tokenizer.ggml.add_bos_token") is True


def llama_cpp_style_ids(tok: Tokenizer, text: str) -> list[int]:
    """How llama.cpp tokenizes a rendered chat prompt: special pieces are cut out first, every text
    fragment is encoded on its own (with the leading space SentencePiece adds)."""
    sp = tok._backend.sp
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += tok.encode(part, bos=False)
    return ids


CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour !"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Sys A"}, {"role": "user", "content": "one"},
     {"role": "assistant", "content": "uno  "}, {"role": "user", "content": "two"},
     {"role": "assistant", "content": "dos"}, {"role": "user", "content": "three?"}],
]


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_chat_template_matches_encode_chat(name):
    jinja2 = pytest.importorskip("jinja2")
    tok = Tokenizer.from_name(name)
    source = G.CHAT_TEMPLATE_V3 if tok.template == "v3" else G.CHAT_TEMPLATE_V1
    template = jinja2.Environment().from_string(source)
    for messages in CONVERSATIONS:
        text = template.render(messages=messages, bos_token="<s>", eos_token="</s>")
        assert llama_cpp_style_ids(tok, text) == tok.encode_chat(messages), (name, text)


# ---------------------------------------------------------------- a GGUF written the llama.cpp way
def test_reads_a_gguf_written_like_llama_cpp_converter(tmp_path):
    """Independently of our writer: names from gguf's TensorNameMap, llama.cpp's permute, the
    vocabulary from gguf.vocab.SentencePieceVocab, no mistral_torch.* keys."""
    from gguf.vocab import SentencePieceVocab

    tok = Tokenizer.from_name("v1")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tok.path.read_bytes())
    m = model(vocab_size=32000, sliding_window=None)
    a = m.args

    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(tmp_path / "ref.gguf", "llama")
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_rope_dimension_count(a.head_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = SentencePieceVocab(tmp_path / "hf")
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types([int(t) for t in types])
    special = gguf.SpecialVocab(tmp_path / "hf", load_merges=False, n_vocab=len(tokens))
    special._set_special_token("bos", 1)
    special._set_special_token("eos", 2)
    special._set_special_token("unk", 0)
    special.add_to_gguf(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, a.n_layers)
    for key, t in m.state_dict().items():
        data = t.numpy()
        if key.endswith("q_proj.weight"):
            data = permute(data, a.n_heads)
        if key.endswith("k_proj.weight"):
            data = permute(data, a.n_kv_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    back = G.load_gguf(tmp_path / "ref.gguf")
    assert back.args == a
    assert_same_weights(m, back)
    rebuilt = G.load_gguf_tokenizer(tmp_path / "ref.gguf")  # from llama.cpp's keys alone
    for t in texts(100):
        assert rebuilt.encode(t) == tok.encode(t), t
    assert rebuilt.decode(tok.encode("Héllo wörld 123")) == "Héllo wörld 123"


# ---------------------------------------------------------------- clear errors
def _rewrite(path, out, *, arch=None, drop=(), tokens=None, extra=()):
    """Copy a GGUF with its architecture renamed, keys dropped, tokens replaced or tensors added."""
    f = G.GGUFFile(path)
    src_arch = f.arch
    w = gguf.GGUFWriter(out, arch or src_arch)
    for key, field in f.reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens" and tokens is not None:
            value = tokens
        if arch and key.startswith(src_arch + "."):
            key = arch + key[len(src_arch):]
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in f.reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, data in extra:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture
def small_gguf(tmp_path):
    return G.save_gguf(model(), tmp_path / "m.gguf", "f32")


def test_error_unsupported_architecture(tmp_path, small_gguf):
    bad = _rewrite(small_gguf, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'qwen2'"):
        load_model(bad)


def test_error_unsupported_tensor_type(tmp_path, small_gguf):
    data = bytearray(small_gguf.read_bytes())
    name = b"blk.0.attn_k.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims (u32), two dims (u64), then the type
    assert struct.unpack_from("<I", data, at)[0] == 0  # F32
    struct.pack_into("<I", data, at, 250)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_k\.weight' has ggml type id 250"):
        G.load_gguf(tmp_path / "bad.gguf")
    # a valid ggml type that is not a weight format (integers) is named too
    bad = _rewrite(small_gguf, tmp_path / "int.gguf", extra=[("blk.0.attn_q.bias", np.zeros(64, np.int32))])
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias.*biases"):
        G.load_gguf(bad)


def test_error_truncated_file(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"truncated: tensor 'output\.weight' ends at byte [\d,]+ but the file has"):
        G.load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:300])
    with pytest.raises(ValueError, match="truncated or corrupt GGUF header"):
        G.load_gguf(tmp_path / "head.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(ValueError, match="is not a GGUF file"):
        G.load_gguf(tmp_path / "not.gguf")


def test_error_vocabulary_does_not_match_tensors(tmp_path, unigram):
    m = model()
    path = G.save_gguf(m, tmp_path / "m.gguf", "f32", unigram)
    tokens = G.GGUFFile(path).get("tokenizer.ggml.tokens")[:500]
    bad = _rewrite(path, tmp_path / "bad.gguf", tokens=tokens)
    with pytest.raises(ValueError, match=r"vocabulary has 500 tokens .* token_embd\.weight has 512 rows"):
        G.load_gguf(bad)
    with pytest.raises(ValueError, match="tokenizer has 8000 pieces but the model only 512"):
        G.save_gguf(m, tmp_path / "x.gguf", "f32", Tokenizer.from_file(_trained_8000(tmp_path, unigram)))


def _trained_8000(tmp_path, unigram):
    """A SentencePiece file claiming 8000 pieces: the unigram model padded with unused pieces."""
    sp = G.SentencePieceModel.parse(unigram.path.read_bytes())
    n = len(sp.pieces)
    sp.pieces += [f"<unused{i}>" for i in range(n, 8000)]
    sp.scores += [0.0] * (8000 - n)
    sp.types += [5] * (8000 - n)
    out = tmp_path / "big.model"
    out.write_bytes(sp.serialize())
    return out


def test_error_missing_tensor_and_bad_shape(tmp_path, small_gguf):
    f = G.GGUFFile(small_gguf)
    w = gguf.GGUFWriter(tmp_path / "miss.gguf", "llama")
    for key, field in f.reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1]
                            if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in f.reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"missing tensor\(s\): blk\.1\.ffn_up\.weight"):
        G.load_gguf(tmp_path / "miss.gguf")


# ---------------------------------------------------------------- the convert command
def test_convert_command_to_gguf_and_back(tmp_path, unigram, capsys):
    from mistral_torch import lora
    from mistral_torch.cli import main

    m = model()
    save_model(m, tmp_path / "hf", extra_files=[unigram.path])
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
    assert "tokenizer and chat template embedded" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert_same_weights(m, load_model(tmp_path / "back"))
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == unigram.path.read_bytes()
    # DST exists: refused without --force (exit status 2, one line)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "hf", "--outtype", "q8_0"]) == 2

    # --adapter: merged before writing
    adapted = model()
    lora.apply_lora(adapted, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for _, mod in lora.lora_modules(adapted):
            mod.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    lora.save_adapter(adapted, tmp_path / "adapter")
    merged = lora.merge_lora(adapted)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "q.gguf"), "--to", "gguf", "--outtype", "q8_0",
                 "--adapter", str(tmp_path / "adapter")]) == 0
    back = G.load_gguf(tmp_path / "q.gguf")
    want = G.dequantize_q8_0(G.quantize_q8_0(merged.model.layers[1].self_attn.v_proj.weight), 64)
    assert torch.equal(back.model.layers[1].self_attn.v_proj.weight, want)
    assert not torch.equal(want, m.model.layers[1].self_attn.v_proj.weight)


# ---------------------------------------------------------------- llama.cpp itself (optional)
def _llama(path, n_ctx=256):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
                           type_k=0, type_v=0, seed=0)  # f32 KV cache, as ours; one thread (2 spin on a busy machine)


def _greedy_llama(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, np.array(llm.scores[: len(prompt)])


def _greedy_ours(m: Transformer, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    ids = list(prompt)
    with torch.no_grad():
        logits, cache = m(torch.tensor([ids]))
        first = logits[0].numpy()
        for _ in range(n):
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            logits, cache = m(torch.tensor([[nxt]]), cache=cache)
    return ids[len(prompt):], first


def test_llama_cpp_greedy_continuation_equals_ours_at_f32(tmp_path, unigram):
    m = model(seed=3, std=0.15, sliding_window=None)  # llama.cpp's "llama" arch has no sliding window
    path = G.save_gguf(m, tmp_path / "m.gguf", "f32", unigram)
    llm = _llama(path)
    for prompt in ("Translate: English → French\nEnglish: Good morning.\nFrench:", "I have to answer the phone.",
                   "Je veux vraiment résoudre ça."):
        ids = unigram.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids  # same tokenizer
        theirs, their_logits = _greedy_llama(llm, ids, 40)
        ours, our_logits = _greedy_ours(m, ids, 40)
        assert theirs == ours, prompt
        assert np.abs(their_logits - our_logits).max() < 1e-4 * np.abs(our_logits).max()


def test_llama_cpp_ignores_the_sliding_window(tmp_path):
    """llama.cpp's "llama" architecture has no sliding window: past the window it computes what our
    model does with the window switched off (and within it, what ours does with it)."""
    m = model(seed=6, std=0.15, sliding_window=8)
    llm = _llama(G.save_gguf(m, tmp_path / "w.gguf", "f32"))
    ids = list(range(1, 30))
    _, theirs = _greedy_llama(llm, ids, 0)
    _, windowed = _greedy_ours(m, ids, 0)
    full = Transformer(tiny_args(sliding_window=None)).eval()
    full.load_state_dict(m.state_dict())
    _, unwindowed = _greedy_ours(full, ids, 0)
    scale = np.abs(unwindowed).max()
    assert np.abs(theirs - unwindowed).max() < 1e-4 * scale
    assert np.abs(theirs[:8] - windowed[:8]).max() < 1e-4 * scale
    assert np.abs(theirs[8:] - windowed[8:]).max() > 1e-2 * scale


def test_llama_cpp_runs_our_quantized_files(tmp_path):
    m = model(seed=4, std=0.15, sliding_window=None, hidden_dim=192)
    ids = list(range(1, 40))
    for outtype, tol in (("f16", 0.01), ("q8_0", 0.03), ("q4_0", 0.05)):
        path = G.save_gguf(m, tmp_path / f"{outtype}.gguf", outtype)
        same_weights = G.load_gguf(path).float()  # the file's exact values, run by us
        _, theirs = _greedy_llama(_llama(path), ids, 0)
        _, ours = _greedy_ours(same_weights, ids, 0)
        assert np.abs(theirs - ours).max() < tol * np.abs(ours).max(), outtype


def test_llama_cpp_tokenizes_like_sentencepiece(tmp_path, unigram):
    for tok in (Tokenizer.from_name("v1"), unigram):
        path = G.save_gguf(model(vocab_size=max(512, tok.vocab_size)), tmp_path / "m.gguf", "f16", tok,
                           overwrite=True)
        llm = _llama(path)
        sample = texts(100)
        same = sum(llm.tokenize(t.encode(), add_bos=True, special=False) == tok.encode(t) for t in sample)
        assert same == len(sample), f"{tok}: {same}/{len(sample)}"


def test_llama_cpp_applies_the_chat_template(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    for name in ("v1", "v3"):
        tok = Tokenizer.from_name(name)
        path = G.save_gguf(model(vocab_size=tok.vocab_size), tmp_path / f"{name}.gguf", "f16", tok)
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        template = llm.metadata["tokenizer.chat_template"]
        formatter = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
        for messages in CONVERSATIONS:
            text = formatter(messages=messages).prompt
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode_chat(messages)


def _ggml_c():
    """ggml's own C quantizer and dequantizer, from the libggml-base that llama-cpp-python ships."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    import os

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))

    class Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def quantize(w: np.ndarray, qtype: int) -> np.ndarray:
        tr = lib.ggml_get_type_traits(qtype).contents
        rows, cols = w.shape
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = np.zeros((rows, cols // tr.blck_size * tr.type_size), np.uint8)
        lib.ggml_quantize_init(qtype)
        lib.ggml_quantize_chunk(qtype, w.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        return out

    def dequantize(raw: np.ndarray, qtype: int, cols: int) -> np.ndarray:
        tr = lib.ggml_get_type_traits(qtype).contents
        raw = np.ascontiguousarray(raw)
        out = np.zeros((raw.shape[0], cols), np.float32)
        to_float_t(tr.to_float)(raw.ctypes.data, out.ctypes.data, out.size)
        return out

    return quantize, dequantize


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_import_dequantizes_bit_exact_with_ggml_c(tmp_path, qtype):
    """Blocks quantized by ggml's C code read back here exactly as ggml dequantizes them; our Q8_0 /
    Q4_0 writers produce ggml's C bytes."""
    quantize, dequantize = _ggml_c()
    t = int(getattr(gguf.GGMLQuantizationType, qtype))
    w = (np.random.default_rng(0).standard_normal((16, 512)) * 0.1).astype(np.float32)
    raw = quantize(w, t)
    f = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(f, "llama")
    writer.add_tensor("blk.0.attn_v.weight", raw, raw_dtype=gguf.GGMLQuantizationType(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = G.GGUFFile(f).tensor("blk.0.attn_v.weight").numpy()
    assert ours.shape == w.shape and np.array_equal(ours, dequantize(raw, t, 512))
    if qtype in ("Q8_0", "Q4_0"):
        write = G.quantize_q8_0 if qtype == "Q8_0" else G.quantize_q4_0
        assert np.array_equal(write(torch.from_numpy(w)).numpy(), raw)


@pytest.mark.slow
def test_k_quants_from_llama_quantize_load(tmp_path):
    """A Q4_K_M file made by llama.cpp's own llama-quantize (Q4_K and Q6_K tensors) loads here,
    close to the original weights. (llama.cpp's logits on such a file are not compared: its K-quant
    matmuls round the activations to 8 bits as well.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    m = model(seed=5, std=0.1, dim=256, head_dim=32, n_heads=8, n_kv_heads=4, hidden_dim=512,
              vocab_size=512, sliding_window=None)
    src = G.save_gguf(m, tmp_path / "f32.gguf", "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_path / "k.gguf").encode(),
                                          ctypes.byref(params)) == 0
    f = G.GGUFFile(tmp_path / "k.gguf")
    assert {"Q4_K", "Q6_K"} <= {f.type_name(n) for n in f.tensors}
    back = G.load_gguf(tmp_path / "k.gguf")
    assert back.args == m.args
    for key, w0 in m.state_dict().items():
        err = (back.state_dict()[key] - w0).abs().max()
        assert err <= (0.02 if f.type_name(G.gguf_name(key)) == "Q6_K" else 0.1) * w0.abs().max(), key


# ---------------------------------------------------------------- the shipped translator
def _shipped():
    from mistral_torch.checkpoint import shipped_models

    if "tiny-en-fr" not in shipped_models():
        pytest.skip("the shipped model tiny-en-fr is not in this checkout")
    from mistral_torch.tokenizer import load_tokenizer

    return load_model("tiny-en-fr"), load_tokenizer("tiny-en-fr")


def test_shipped_model_round_trips_bit_exact(tmp_path):
    m, tok = _shipped()
    path = G.save_gguf(m, tmp_path / "tiny-en-fr.gguf", "f32", tok)
    back = load_model(path)
    assert back.args == m.args and back.args.sliding_window == 64
    assert_same_weights(m, back)
    assert G.sentencepiece_bytes(path) == tok.path.read_bytes()


@pytest.mark.slow
def test_shipped_model_translates_the_same_in_llama_cpp(tmp_path):
    """The README's two commands: llama.cpp, from the prompt text, gives our greedy translations
    (the full comparison: python benchmarks/gguf_vs_llama_cpp.py)."""
    from mistral_torch.data import get_template
    from mistral_torch.translate import translate

    m, tok = _shipped()
    llm = _llama(G.save_gguf(m, tmp_path / "tiny-en-fr.gguf", "f32", tok))
    sources = [t for t in texts(8)][::4]  # the English sentences
    template = get_template("translate-en-fr").prompt
    theirs = [llm(template.format(source=s), max_tokens=96, temperature=0.0, repeat_penalty=1.0,
                  stop=["\n"])["choices"][0]["text"].strip() for s in sources]
    assert theirs == translate(m, tok, sources)


def test_load_tokenizer_reads_the_vocabulary_embedded_in_a_gguf(tmp_path):
    """`load_tokenizer("x.gguf")` (used by generate/translate/serve --model x.gguf) gives the
    tokenizer the file was written with."""
    from mistral_torch import load_model, load_tokenizer
    from mistral_torch.gguf import save_gguf

    model, tok = load_model("tiny-en-fr"), load_tokenizer("tiny-en-fr")
    path = tmp_path / "t.gguf"
    save_gguf(model, path, outtype="f32", tokenizer=tok)
    again = load_tokenizer(str(path))
    text = "Translate: English → French\nEnglish: I like cats, naïvely.\nFrench:"
    assert again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size
