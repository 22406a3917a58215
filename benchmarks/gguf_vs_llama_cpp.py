"""The shipped translator exported to GGUF: does llama.cpp translate as we do?

    python benchmarks/gguf_vs_llama_cpp.py [--model tiny-en-fr] [--limit 200] [--outtypes f32,f16,q8_0,q4_0]

For each outtype: writes the model as GGUF (`save_gguf`, tokenizer embedded), reads it back here
(bit-exact for f32; max weight / logit change otherwise), and translates the first --limit source
sentences of the dev set greedily three ways: with our model, with our model re-read from the
GGUF, and with llama.cpp (llama-cpp-python) from the prompt *text*, so llama.cpp's own tokenizer
is part of the comparison. Reports how many translations are identical and, separately, how many
llama.cpp prompt tokenizations equal ours. Needs `pip install llama-cpp-python`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-en-fr")
    ap.add_argument("--data", default=str(ROOT / "data/tatoeba/tatoeba_en_fr_dev.tsv"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--outtypes", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--dir", default=None, help="where to write the .gguf files (default: a temporary folder)")
    args = ap.parse_args()

    import llama_cpp

    from mistral_torch import gguf as G
    from mistral_torch import load_model
    from mistral_torch.data import get_template
    from mistral_torch.tokenizer import load_tokenizer
    from mistral_torch.translate import translate

    torch.set_num_threads(1)
    model = load_model(args.model, dtype="fp32")
    tok = load_tokenizer(args.model)
    sources = list(dict.fromkeys(line.split("\t")[0] for line in open(args.data, encoding="utf-8")))[: args.limit]
    template = get_template("translate-en-fr").prompt
    t0 = time.perf_counter()
    ours = translate(model, tok, sources, batch_size=32)
    print(f"{args.model}: {len(sources)} sentences translated here in {time.perf_counter() - t0:.0f} s; "
          f"window {model.args.sliding_window}, context {model.args.max_seq_len}")
    lengths = [len(tok.encode(template.format(source=s))) + len(tok.encode(o, bos=False)) + 1
               for s, o in zip(sources, ours)]
    past = sum(n > (model.args.sliding_window or 10**9) for n in lengths)
    print(f"prompt + translation: {min(lengths)}..{max(lengths)} tokens, {past} sequences longer than the window")

    out_dir = Path(args.dir or tempfile.mkdtemp(prefix="gguf-vs-llama-"))
    ids = torch.tensor([tok.encode(template.format(source=s)) for s in sources[:1]])
    with torch.no_grad():
        ref_logits = model(ids)[0]
    print(f"(logits of the first prompt: max |logit| {ref_logits.abs().max().item():.1f})")
    print("| outtype | size MB | read back here | max logit change | ours from GGUF = ours | "
          "llama.cpp = ours | llama.cpp = ours from GGUF | llama.cpp tokenization = ours |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for outtype in args.outtypes.split(","):
        path = G.save_gguf(model, out_dir / f"{args.model}-{outtype}.gguf", outtype, tok, overwrite=True)
        back = G.load_gguf(path).float()
        exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
        with torch.no_grad():
            dlogit = (back(ids)[0] - ref_logits).abs().max().item()
        # bit-exact weights and tokenizer give the same translations; otherwise translate again
        ours_back = ours if exact else translate(back, G.load_gguf_tokenizer(path), sources, batch_size=32)
        llm = llama_cpp.Llama(str(path), n_ctx=model.args.max_seq_len, n_threads=1, n_threads_batch=1,
                              verbose=False, type_k=0, type_v=0)
        theirs, same_tok = [], 0
        for s in sources:
            prompt = template.format(source=s)
            same_tok += llm.tokenize(prompt.encode(), add_bos=True, special=True) == tok.encode(prompt)
            r = llm(prompt, max_tokens=96, temperature=0.0, repeat_penalty=1.0, stop=["\n"])
            theirs.append(r["choices"][0]["text"].split("\n", 1)[0].strip())
        n = len(sources)
        print(f"| {outtype} | {path.stat().st_size / 1e6:.1f} | {'bit-exact' if exact else 'lossy'} | {dlogit:.2e} | "
              f"{sum(a == b for a, b in zip(ours_back, ours))}/{n} | {sum(a == b for a, b in zip(theirs, ours))}/{n} | "
              f"{sum(a == b for a, b in zip(theirs, ours_back))}/{n} | {same_tok}/{n} |", flush=True)
        if outtype == "f32":
            for s, a, b in [(s, a, b) for s, a, b in zip(sources, ours, theirs) if a != b][:5]:
                print(f"    differs: {s!r}\n      ours      {a!r}\n      llama.cpp {b!r}")
        del llm


if __name__ == "__main__":
    main()
