"""The README's evaluation numbers: perplexity by length (window on/off), BLEU/chrF, MC benchmarks.

    python benchmarks/bench_evaluate.py                         # the shipped model, all parts
    python benchmarks/bench_evaluate.py --model DIR --out runs_eval/ --parts ppl,bleu
    python benchmarks/bench_evaluate.py --mc-limit 100          # first 100 items per task

Perplexity text: the Tatoeba dev pairs rendered through the training template
("Translate: English → French\\nEnglish: {en}\\nFrench: {fr}"), one pair per paragraph, as one
long stream, so evaluation lengths beyond the model's window (and beyond max_seq_len) show
what the sliding window does. Everything is written under --out (JSON, PNG, hypotheses) and
printed as tables. Data defaults to shared/data (see its README).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mistral_torch import evaluate as ev
from mistral_torch.checkpoint import load_model
from mistral_torch.data import get_template
from mistral_torch.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = next((p for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if p.is_dir()), ROOT / "shared" / "data")


def ppl_text(dev_tsv: Path, limit: int) -> str:
    template = get_template("translate-en-fr")
    pairs = []
    for line in dev_tsv.read_text(encoding="utf-8").splitlines()[:limit]:
        en, fr = line.split("\t")[:2]
        prompt, target = template.render(en, fr)
        pairs.append(prompt + target)
    return "\n\n".join(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("eval_out"))
    ap.add_argument("--parts", default="ppl,bleu,mc")
    ap.add_argument("--seq-len", default="32,64,128,256,512,1024")
    ap.add_argument("--ppl-pairs", type=int, default=400, help="dev pairs in the perplexity text")
    ap.add_argument("--bleu-limit", type=int, default=None, help="dev sources to translate (default: all)")
    ap.add_argument("--mc-limit", type=int, default=None, help="items per task (MMLU: per subject)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    parts = set(args.parts.split(","))
    summary: dict = {"model": args.model or "shipped default", "args": model.args.to_dict()}
    dev = args.data / "tatoeba_en_fr_dev.tsv"

    if "ppl" in parts:
        t0 = time.time()
        ids = tok.encode(ppl_text(dev, args.ppl_pairs), bos=True)
        seq = [int(s) for s in args.seq_len.split(",")]
        res = ev.perplexity(model, ids, seq, windows=["model", "none"], batch_size=4)
        print(f"perplexity: {len(ids)} tokens, {time.time() - t0:.0f} s")
        print(ev.perplexity_table(res))
        ev.plot_perplexity(res, args.out / "perplexity.png", title="Tatoeba dev (template text): perplexity by length")
        summary["perplexity"] = {"tokens": len(ids), "results": [r.to_dict() for r in res]}

    if "bleu" in parts:
        for reverse in (False, True):
            t0 = time.time()
            pairs = ev.read_translation_pairs(dev, reverse=reverse, limit=args.bleu_limit)
            template = get_template("translate-fr-en" if reverse else "translate-en-fr").prompt
            hyps = ev.translate_eval(model, tok, [s for s, _ in pairs], template, batch_size=32)
            scores = ev.translation_scores(hyps, [r for _, r in pairs])
            name = "fr-en" if reverse else "en-fr"
            (args.out / f"hyp.{name}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
            print(f"{name}: BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f} "
                  f"({scores['sentences']} sentences, {time.time() - t0:.0f} s)")
            summary[f"translate_{name}"] = scores

    if "mc" in parts:
        t0 = time.time()
        bench = args.data / "bench"
        items = []
        for task in ev.TASKS:
            items += ev.load_task(task, ev.find_task_data(task, bench), limit=args.mc_limit)
        results = ev.evaluate_mc(model, tok, items, batch_size=16)
        print(f"multiple choice: {len(items)} items, {time.time() - t0:.0f} s")
        print(ev.results_table(results))
        summary["mc"] = [r.to_dict() for r in results]

    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}/")


if __name__ == "__main__":
    main()
