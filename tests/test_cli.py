"""`mistral-torch generate` and `mistral-torch chat` end to end (subprocesses on a saved tiny
model with its own SentencePiece tokenizer), and their errors (one line, exit status 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from test_tokenizer import train_sentencepiece

from mistral_torch import Transformer
from mistral_torch.cli import _unescape, main
from mistral_torch.generate import complete, generate
from mistral_torch.tokenizer import Tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Same thread count as the subprocesses (--threads 1), and no thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny(folder: Path, **overrides) -> tuple[Path, Transformer, Tokenizer]:
    from mistral_torch.checkpoint import save_model

    (folder.parent / f"{folder.name}-tokenizer").mkdir()
    sp = train_sentencepiece(folder.parent / f"{folder.name}-tokenizer" / "tokenizer.model")
    tok = Tokenizer.from_file(sp)
    model = Transformer(tiny_args(vocab_size=tok.vocab_size, **overrides)).init_weights(seed=11).eval()
    save_model(model, folder, extra_files=[sp])
    return folder, model, tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Transformer, Tokenizer]:
    return save_tiny(tmp_path_factory.mktemp("cli") / "model")


def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The CLI in a subprocess; output decoded as UTF-8 with no newline translation (a random
    model writes stray \r characters that text mode would turn into \n)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "mistral_torch.cli", *argv], input=stdin.encode(),
                       capture_output=True, timeout=240, env=env)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def test_generate_end_to_end(saved, capsys):
    folder, model, tok = saved
    prompt = "Le chat\\nest"  # an escaped newline, as typed in a shell
    expected = generate(model, tok, "Le chat\nest", max_new_tokens=12)[0]
    r = run("generate", "--model", str(folder), prompt, "--max-new-tokens", "12", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "tokens/s" in r.stderr and "time to first token" in r.stderr
    # Sampling flags with a seed: the same as the library with the same options; --quiet: no stats.
    sampled = generate(model, tok, "Hello", max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50,
                       min_p=0.05, repetition_penalty=1.2, seed=3)[0]
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "Hello", "--max-new-tokens", "10", "--temperature", "0.8",
                 "--top-p", "0.9", "--top-k", "50", "--min-p", "0.05", "--repetition-penalty", "1.2",
                 "--seed", "3", "--no-stream", "--quiet", "--dtype", "fp32"]) == 0  # in-process: saves a start
    assert capsys.readouterr() == (sampled + "\n", "")


def test_generate_batch_file_and_stdin(saved, tmp_path):
    folder, model, tok = saved
    prompts = ["Le chat", "Bonjour, comment\\nallez-vous", "I like green tea"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    expected = complete(model, tok, [_unescape(p) for p in prompts], max_new_tokens=9)
    r = run("generate", "--model", str(folder), "--batch-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "9", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 4  # one output line per prompt
    assert [_unescape(line) for line in lines[:3]] == [c.text for c in expected]
    assert "batch of 3" in r.stderr
    # The prompt from stdin (real newlines, no escaping).
    r = run("generate", "--model", str(folder), "--max-new-tokens", "9", "--threads", "1", "--quiet",
            stdin="Bonjour, comment\nallez-vous\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected[1].text + "\n"


def test_generate_compile_and_quantize_flags(saved, tmp_path):
    """--compile (inductor, packed linears) gives the plain greedy output for a batch (rows finish
    at different steps, so the batch shrinks); --quantize int8 runs and says so in the model."""
    folder, model, tok = saved
    prompts = ["Le chat", "Bonjour, comment allez-vous", "I like green tea"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    expected = complete(model, tok, prompts, max_new_tokens=9)
    r = run("generate", "--model", str(folder), "--batch-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "9", "--threads", "1", "--compile")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == [c.text.replace("\\", "\\\\").replace("\n", "\\n") for c in expected]
    assert "compiling the decode step" in r.stderr
    r = run("generate", "--model", str(folder), "Le chat", "--max-new-tokens", "5", "--threads", "1",
            "--quantize", "int8", "--dtype", "bf16", "--quiet")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_generate_with_an_int8_kv_cache(saved, capsys):
    """--kv-cache int8: the library's greedy output through an int8 cache (`kv_cache_dtype`)."""
    folder, model, tok = saved
    model.kv_cache_dtype = torch.int8
    try:
        expected = generate(model, tok, "Le chat", max_new_tokens=12)[0]
    finally:
        model.kv_cache_dtype = None
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "Le chat", "--max-new-tokens", "12", "--no-stream",
                 "--quiet", "--kv-cache", "int8"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_takes_the_fused_step_without_compile_once_the_kernels_are_built(saved, capsys, monkeypatch):
    """Without --compile, `generate` runs the fused C++ step (no compiler: `compile_decode(backend=None)`)
    where the kernels are already built, with the library's greedy output; where they are not, plain
    eager decoding and a one-line tip; --eager: plain decoding, no tip."""
    from mistral_torch import fast

    folder, model, tok = saved
    expected = generate(model, tok, "Le chat", max_new_tokens=12)[0]
    calls = []
    original = Transformer.compile_decode
    monkeypatch.setattr(Transformer, "compile_decode",
                        lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    argv = ["generate", "--model", str(folder), "Le chat", "--max-new-tokens", "12", "--no-stream"]
    capsys.readouterr()
    if fast.kernels_supported() and fast.cpp_kernels():
        assert fast.kernels_ready()
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert out == expected + "\n" and "tip" not in err
        assert calls == [dict(backend=None, pack=False)]
    calls.clear()
    monkeypatch.setattr(fast, "kernels_ready", lambda: False)
    monkeypatch.setattr(fast, "kernels_supported", lambda: True)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "--compile builds this CPU's fast decode kernels" in err and calls == []
    assert main([*argv, "--eager"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "tip" not in err and calls == []


@pytest.mark.slow
def test_generate_aot(saved, capsys):
    """--aot: the one-prompt step compiled ahead of time gives the library's greedy output."""
    folder, model, tok = saved
    expected = generate(model, tok, "Le chat", max_new_tokens=12)[0]
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "Le chat", "--max-new-tokens", "12", "--no-stream",
                 "--quiet", "--aot", "--threads", "1"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_scripted_multi_turn(saved):
    folder, model, tok = saved
    system = {"role": "system", "content": "Translate to French."}

    def reply(history: list[dict]) -> str:
        return generate(model, tok, [tok.encode_chat([system, *history])], max_new_tokens=10)[0]

    h = [{"role": "user", "content": "The cat"}]
    r1 = reply(h)
    h += [{"role": "assistant", "content": r1}, {"role": "user", "content": "Green tea"}]
    r2 = reply(h)
    r3 = reply([{"role": "user", "content": "Hello"}])  # after /reset
    script = "The cat\nGreen tea\n/reset\nHello\n/exit\nnever read\n"
    r = run("chat", "--model", str(folder), "--system", system["content"], "--max-new-tokens", "10",
            "--threads", "1", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{r1}\n{r2}\n{r3}\n"
    assert r.stderr.count("tokens/s") == 3 and "[conversation reset]" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_history_is_trimmed_to_the_context(tmp_path, capsys, monkeypatch):
    import io

    folder, _, _ = save_tiny(tmp_path / "small", sliding_window=None, max_seq_len=64)
    turns = ["Le chat est assis sur le tapis"] * 6 + ["word " * 80]  # grows past 64; the last never fits
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns + ["Bonjour"]) + "\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "8", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "but the model's context is 64 tokens" in err and "Traceback" not in err
    assert err.count("error") == 1


@pytest.mark.parametrize("argv, message", [
    (["generate", ""], "empty prompt"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--top-k", "-2"], "top_k must be an integer >= 0"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["generate", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["generate", "--batch-file", "/nonexistent/prompts.txt"], "No such file"),
    (["chat", "--top-k", "-1"], "top_k must be an integer >= 0"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith(f"mistral-torch {argv[0]}: error:")


def test_prompt_longer_than_the_context(saved, capsys):
    folder, model, tok = saved
    long = "Le chat est assis sur le tapis. " * 60
    n = len(tok.encode(long))
    assert main(["generate", "--model", str(folder), long]) == 2
    err = capsys.readouterr().err
    assert f"prompt is {n} tokens long, but the model's context is 256 tokens" in err


def test_unescape():
    assert _unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    assert _unescape("English → French\\nFrench:") == "English → French\nFrench:"
