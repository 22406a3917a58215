"""The quantization study: fp32, bf16, int8, int4 (g=32, g=128) and nf4 side by side.

    python benchmarks/quant_report.py                      # everything, writes docs/quantization/
    python benchmarks/quant_report.py --model /path/ckpt   # accuracy on another translator checkpoint
    python benchmarks/quant_report.py --skip-accuracy      # speed, bytes and logit error only

Speed (bench-125m, random weights, CPU, batch 1): every variant is built in ONE process and
timed round-robin (variant A, B, C, ..., A, B, C, ...), so machine load hits all of them alike;
the median of the rounds is reported, and ratios against the fastest unquantized dtype.
Decode: `--decode-tokens` one-token steps after a 16-token prompt. Prefill: one `--prefill`-token
prompt. Logit error: max and mean |logits - fp32 logits| over a 128-token random sequence.

Accuracy (the shipped translator `tiny-en-fr`, skipped with a message if it is not there):
perplexity of the French targets of the dev split (data/tatoeba/tatoeba_en_fr_dev.tsv) given
their prompts (the trained template), BLEU of greedy translations of the dev sources (sacrebleu,
all references of a source), and the logit error against the fp32 model on the same prompts.

Memory: peak RSS of loading the bench-125m fp32 checkpoint as it is vs. streaming it through
`quantize.load_and_quantize` (each in a fresh subprocess; RSS after `import torch` subtracted).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mistral_torch import ModelArgs, Transformer  # noqa: E402
from mistral_torch import quantize as Q  # noqa: E402

VARIANTS = [("fp32", None, None), ("bf16", None, None), ("int8", "int8", None), ("int4-g32", "int4", 32),
            ("int4-g128", "int4", 128), ("nf4", "nf4", None)]
UNQUANTIZED = ("fp32", "bf16")


def build_variants(base: Transformer, names: list[str]) -> dict[str, Transformer]:
    out = {}
    for name, method, group in VARIANTS:
        if name not in names:
            continue
        m = copy.deepcopy(base)
        if name == "bf16":
            m = m.to(torch.bfloat16)
        elif method is not None:
            Q.quantize_model(m, method, group)
        out[name] = m.eval()
    return out


# ---------------------------------------------------------------- speed
def decode_tps(model: Transformer, prompt: torch.Tensor, n: int) -> float:
    with torch.inference_mode():
        logits, cache = model(prompt, last_logits_only=True)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n):
            logits, cache = model(tok, cache=cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        return n / (time.perf_counter() - t0)


def prefill_tps(model: Transformer, prompt: torch.Tensor) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(prompt, last_logits_only=True)
        return prompt.numel() / (time.perf_counter() - t0)


def logit_error(model: Transformer, ref_logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    with torch.inference_mode():
        got = model(tokens, use_cache=False)[0].float()
    d = (got - ref_logits).abs()
    return d.max().item(), d.mean().item()


def speed_study(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    margs = ModelArgs.from_name("bench-125m")
    base = Transformer(margs).init_weights(seed=0).eval()
    models = build_variants(base, [v[0] for v in VARIANTS])
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, margs.vocab_size, (1, 16), generator=g)
    long_prompt = torch.randint(0, margs.vocab_size, (1, args.prefill), generator=g)
    probe = torch.randint(0, margs.vocab_size, (1, 128), generator=g)
    with torch.inference_mode():
        ref = base(probe, use_cache=False)[0].float()
    rows = {name: {"weight_bytes": Q.weight_bytes(m), "decode": [], "prefill": []} for name, m in models.items()}
    for name, m in models.items():  # warm-up (kernel build, caches)
        decode_tps(m, prompt, 2)
        rows[name]["logit_max_err"], rows[name]["logit_mean_err"] = logit_error(m, ref, probe)
    for r in range(args.rounds):
        for name, m in models.items():
            rows[name]["decode"].append(decode_tps(m, prompt, args.decode_tokens))
            rows[name]["prefill"].append(prefill_tps(m, long_prompt))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rows[n]['decode'][-1]:.1f}" for n in rows),
              flush=True)
    for row in rows.values():
        row["decode_tps"] = statistics.median(row["decode"])
        row["prefill_tps"] = statistics.median(row["prefill"])
    best = max(UNQUANTIZED, key=lambda n: rows[n]["decode_tps"])
    for row in rows.values():
        row["decode_vs_best_unquantized"] = row["decode_tps"] / rows[best]["decode_tps"]
        row["bytes_vs_bf16"] = row["weight_bytes"] / rows["bf16"]["weight_bytes"]
    return {"model": "bench-125m (random weights)", "params": margs.n_params, "fastest_unquantized": best,
            "rows": rows}


# ---------------------------------------------------------------- accuracy on the translator
def target_perplexity(model: Transformer, examples: list[tuple[list[int], list[int]]], batch: int = 32) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for k in range(0, len(examples), batch):
            chunk = examples[k:k + batch]
            T = max(len(ids) for ids, _ in chunk)
            tokens = torch.zeros(len(chunk), T, dtype=torch.long)
            labels = torch.full((len(chunk), T), -100, dtype=torch.long)
            for i, (ids, lab) in enumerate(chunk):  # right padding: causal attention never sees it
                tokens[i, :len(ids)] = torch.tensor(ids)
                labels[i, :len(lab)] = torch.tensor(lab)
            logits = model(tokens, use_cache=False)[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
            nll += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    return float(torch.exp(torch.tensor(nll / count)))


def accuracy_study(args: argparse.Namespace) -> dict | None:
    from mistral_torch.checkpoint import load_model, resolve_model_path
    from mistral_torch.data import encode_pair, get_template
    from mistral_torch.evaluate import read_translation_pairs, translation_scores
    from mistral_torch.tokenizer import load_tokenizer
    from mistral_torch.translate import translate

    try:
        path = resolve_model_path(args.model)
    except (FileNotFoundError, ValueError) as exc:
        print(f"accuracy study skipped: the translator {args.model!r} is not available ({exc})")
        return None
    base = load_model(path, dtype="fp32")
    tok = load_tokenizer(path)
    dev = ROOT / "data" / "tatoeba" / "tatoeba_en_fr_dev.tsv"
    grouped = read_translation_pairs(dev, limit=args.bleu_sentences)
    sources, refs = [s for s, _ in grouped], [r for _, r in grouped]
    template = get_template("translate-en-fr")
    pairs = read_translation_pairs(dev, group_references=False, limit=args.ppl_sentences)
    examples = [encode_pair(tok, template, s, r[0], base.args.max_seq_len) for s, r in pairs]
    probe_ids = [ids for ids, _ in examples[:32]]
    models = build_variants(base, [v[0] for v in VARIANTS])
    rows = {}
    ref_logits = None
    for name, m in models.items():
        t0 = time.perf_counter()
        row = {"weight_bytes": Q.weight_bytes(m), "perplexity": target_perplexity(m, examples)}
        hyps = translate(m, tok, sources, to="fr", batch_size=32)
        row.update({k: v for k, v in translation_scores(hyps, refs).items() if k in ("bleu", "chrf", "sentences")})
        with torch.inference_mode():
            logits = [m(torch.tensor([ids]), use_cache=False)[0].float()[0] for ids in probe_ids]
        if ref_logits is None:
            ref_logits = logits
        diffs = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(logits, ref_logits)])
        row["logit_max_err"], row["logit_mean_err"] = diffs.max().item(), diffs.mean().item()
        row["examples"] = hyps[:3]
        rows[name] = row
        print(f"  {name}: ppl {row['perplexity']:.3f}, BLEU {row['bleu']:.2f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    for row in rows.values():
        row["ppl_vs_fp32"] = row["perplexity"] / rows["fp32"]["perplexity"] - 1
        row["bleu_vs_fp32"] = row["bleu"] - rows["fp32"]["bleu"]
        row["bytes_vs_bf16"] = row["weight_bytes"] / rows["bf16"]["weight_bytes"]
    return {"model": str(args.model), "path": str(path), "ppl_pairs": len(examples), "bleu_sources": len(sources),
            "rows": rows}


# ---------------------------------------------------------------- peak memory of loading
# VmHWM (this process's own high-water mark; ru_maxrss would carry the parent's over exec)
_CHILD = """
import sys, torch
sys.path.insert(0, {src!r})
from mistral_torch.checkpoint import load_model
from mistral_torch.quantize import load_and_quantize, weight_bytes
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
torch.set_num_threads(1)
base = hwm()
m = load_model({path!r}) if {method!r} == "none" else load_and_quantize({path!r}, {method!r}, {group!r})
print(base, hwm(), weight_bytes(m))
"""


def memory_study(args: argparse.Namespace) -> dict:
    from mistral_torch.checkpoint import save_model

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer(ModelArgs.from_name("bench-125m")).init_weights(seed=0)
        save_model(model, Path(tmp) / "fp32", max_shard_size="100MB")
        del model
        for name, method, group in [("fp32 (load_model)", "none", None), ("int8", "int8", None),
                                    ("int4-g32", "int4", 32), ("nf4", "nf4", None)]:
            code = _CHILD.format(src=str(ROOT / "src"), path=str(Path(tmp) / "fp32"), method=method, group=group)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            base, peak, wbytes = map(int, out.stdout.split()[-3:])
            rows[name] = {"peak_rss_above_import": peak - base, "weight_bytes": wbytes}
            print(f"  {name}: peak +{(peak - base) / 2**20:.0f} MiB for {wbytes / 2**20:.0f} MiB of weights", flush=True)
    return {"checkpoint": "bench-125m fp32, 100MB shards", "rows": rows}


# ---------------------------------------------------------------- report
def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def markdown(results: dict) -> str:
    lines = []
    s = results.get("speed")
    if s:
        lines += [f"**Speed, bytes, logit error** — {s['model']}, {s['params'] / 1e6:.0f}M parameters, CPU, batch 1, "
                  f"{results['conditions']['threads']} thread(s); ratios against the fastest unquantized dtype "
                  f"({s['fastest_unquantized']}), all variants timed round-robin in one process.", "",
                  "| variant | weights MiB | vs bf16 | decode tok/s | vs fastest unquantized | prefill tok/s "
                  "| max \\|Δlogit\\| | mean \\|Δlogit\\| |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            lines.append(f"| {name} | {mib(r['weight_bytes'])} | {r['bytes_vs_bf16']:.1%} | {r['decode_tps']:.1f} | "
                         f"{r['decode_vs_best_unquantized']:.2f}x | {r['prefill_tps']:.0f} | "
                         f"{r['logit_max_err']:.2e} | {r['logit_mean_err']:.2e} |")
        lines.append("")
    a = results.get("accuracy")
    if a:
        lines += [f"**Accuracy** — translator `{a['model']}`: perplexity of {a['ppl_pairs']} dev targets, BLEU on "
                  f"{a['bleu_sources']} dev sources (greedy), logit error vs fp32 on 32 dev prompts.", "",
                  "| variant | weights MiB | vs bf16 | perplexity | Δ ppl | BLEU | Δ BLEU | chrF | max \\|Δlogit\\| "
                  "| mean \\|Δlogit\\| |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in a["rows"].items():
            lines.append(f"| {name} | {mib(r['weight_bytes'])} | {r['bytes_vs_bf16']:.1%} | {r['perplexity']:.3f} | "
                         f"{r['ppl_vs_fp32']:+.2%} | {r['bleu']:.2f} | {r['bleu_vs_fp32']:+.2f} | {r['chrf']:.1f} | "
                         f"{r['logit_max_err']:.2e} | {r['logit_mean_err']:.2e} |")
        lines.append("")
    elif "accuracy_skipped" in results:
        lines += [f"**Accuracy**: skipped — {results['accuracy_skipped']}", ""]
    m = results.get("memory")
    if m:
        lines += [f"**Peak memory of loading** — {m['checkpoint']}; peak RSS above `import torch`, fresh process each.",
                  "", "| load | weights MiB | peak RSS MiB |", "|---|---:|---:|"]
        for name, r in m["rows"].items():
            lines.append(f"| {name} | {mib(r['weight_bytes'])} | {mib(r['peak_rss_above_import'])} |")
        lines.append("")
    c = results["conditions"]
    lines.append(f"Conditions: {c['cpu']}, torch {c['torch']}, {c['threads']} thread(s), load average "
                 f"{c['loadavg_start']} at the start and {c['loadavg_end']} at the end ({c['note']}).")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, a = results.get("speed"), results.get("accuracy")
    fig, axes = plt.subplots(1, 2 if a else 1, figsize=(11 if a else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    if s:
        for name, r in s["rows"].items():
            ax.scatter(r["weight_bytes"] / 2**20, r["decode_tps"], s=60)
            ax.annotate(name, (r["weight_bytes"] / 2**20, r["decode_tps"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("weight MiB")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"bench-125m on CPU ({results['conditions']['threads']} thread)")
        ax.grid(alpha=0.3)
    if a:
        ax2 = axes[0][1]
        names = list(a["rows"])
        ppl = [a["rows"][n]["perplexity"] for n in names]
        bleu = [a["rows"][n]["bleu"] for n in names]
        ax2.bar(names, ppl, color="tab:blue", alpha=0.7)
        ax2.set_ylabel("dev perplexity", color="tab:blue")
        ax2.set_ylim(min(ppl) * 0.95, max(ppl) * 1.03)
        ax3 = ax2.twinx()
        ax3.plot(names, bleu, "o-", color="tab:red")
        ax3.set_ylabel("dev BLEU", color="tab:red")
        ax2.set_title(f"translator {Path(a['model']).name}: Tatoeba dev")
        ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-en-fr", help="translator for the accuracy study (default: tiny-en-fr)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--rounds", type=int, default=7, help="round-robin timing rounds (default: 7)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps per timing (default: 32)")
    p.add_argument("--prefill", type=int, default=128, help="prefill prompt length (default: 128)")
    p.add_argument("--bleu-sentences", type=int, default=None, help="dev sources for BLEU (default: all)")
    p.add_argument("--ppl-sentences", type=int, default=None, help="dev pairs for perplexity (default: all)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "quantization"), help="output folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results: dict = {"conditions": {"cpu": f"{cpu} ({os.cpu_count()} cores, torch capability "
                                           f"{torch.backends.cpu.get_cpu_capability()})",
                                    "torch": torch.__version__, "threads": args.threads,
                                    "loadavg_start": f"{os.getloadavg()[0]:.1f}",
                                    "note": "shared machine: absolute tokens/s are depressed by other jobs; "
                                            "compare ratios within a run"}}
    if not args.skip_speed:
        print("speed study (bench-125m)...", flush=True)
        results["speed"] = speed_study(args)
    if not args.skip_accuracy:
        print("accuracy study (translator)...", flush=True)
        acc = accuracy_study(args)
        if acc is None:
            results["accuracy_skipped"] = f"the translator {args.model!r} is not available yet"
        else:
            results["accuracy"] = acc
    if not args.skip_memory:
        print("memory study (loading bench-125m)...", flush=True)
        results["memory"] = memory_study(args)
    results["conditions"]["loadavg_end"] = f"{os.getloadavg()[0]:.1f}"
    results["conditions"]["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(markdown(results))
    plot(results, out / "quant_report.png")
    print(markdown(results))
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'quant_report.png'}")


if __name__ == "__main__":
    main()
