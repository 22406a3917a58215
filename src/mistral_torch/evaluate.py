"""Evaluation: perplexity, multiple-choice benchmarks by log-likelihood, translation quality.

    perplexity    `strided_windows` / `token_logprobs` / `perplexity`: token-level NLL of a long
                  text, window after window, each window fed through the rolling KV cache in
                  chunks (a 16k-token window needs the cache and one chunk of logits, never
                  16k x vocab logits); several lengths in one call, with the sliding window as
                  loaded, disabled, or forced (`with_window`); table, JSON and PNG plot.
    scoring       `encode_pair` / `score_tokens` / `loglikelihood`: log P(continuation | context)
                  and "is it the greedy continuation", batched (right-padded full forwards),
                  split and truncated exactly as lm-evaluation-harness does it.
    benchmarks    readers of the original files of MMLU (CSV), ARC (jsonl), HellaSwag (jsonl),
                  TruthfulQA (CSV / mc_task.json) -> `MCItem`s with lm-eval's prompts;
                  `evaluate_mc` -> `TaskResult`s (acc, acc_norm, standard errors, counts).
    translation   `translation_scores`: batched greedy generation, BLEU and chrF (sacrebleu).
    self-check    `self_check`: our log-likelihoods against transformers' MistralForCausalLM on
                  the same weights, before a long run.

Scoring conventions (those of lm-eval, so numbers are comparable):
  * a request (context, continuation) is encoded as `whole = encode(context + continuation)`,
    `ctx = encode(context)`, continuation tokens = `whole[len(ctx):]`, trailing spaces of the
    context moved to the continuation; BOS first; an empty context is [BOS];
  * acc: argmax of the summed log-likelihoods; acc_norm: argmax of log-likelihood / number of
    characters of the choice (without the leading space);
  * standard error of a mean: sample standard deviation / sqrt(n).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .model import Transformer

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

LOGITS_BUDGET = 2**27  # elements of logits (batch x tokens x vocab) held at once (512 MiB fp32)
TOKENS_BUDGET = 16384  # tokens (batch x length) in one scoring forward


def _progress(total: int, desc: str, enabled: bool | None):
    """A tqdm bar on stderr (None: only when stderr is a terminal; False: never)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled is None else not enabled,
                leave=False, dynamic_ncols=True)


# ================================================================ perplexity
def strided_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(start, n_new) per window over a stream of `n_tokens` token ids x[0..n-1].

    The model reads x[start:start+L] (L = seq_len, or fewer when the text is shorter) and
    predicts x[start+1:start+L+1]; the window scores only its last `n_new` predictions, those
    not scored by an earlier window. The first window scores all its predictions; each later one
    moves by `stride` (default: seq_len, i.e. disjoint windows), and the last one is aligned to
    the end of the text so it, too, reads a full `seq_len` tokens. Every token but x[0] (BOS) is
    scored exactly once, with at least seq_len - stride + 1 tokens of context after the first
    window. With stride == seq_len this is lm-eval's `loglikelihood_rolling`.

    >>> strided_windows(10, 4, 2)   # x1..x4 | x5 x6 | x7 x8 | x9
    [(0, 4), (2, 2), (4, 2), (5, 1)]
    """
    stride = seq_len if stride is None else stride
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}")
    end = min(seq_len, n_tokens - 1)  # index of the last token scored so far
    windows = [(0, end)]
    while end < n_tokens - 1:
        new_end = min(end + stride, n_tokens - 1)
        windows.append((new_end - seq_len, new_end - end))
        end = new_end
    return windows


def with_window(model: Transformer, window: int | None, min_len: int = 0) -> Transformer:
    """The same weights (shared, not copied) with another sliding window (None: full attention);
    max_seq_len grows to `min_len` when needed."""
    args = dataclasses.replace(model.args, sliding_window=window,
                               max_seq_len=max(model.args.max_seq_len, min_len))
    if args == model.args:
        return model
    with torch.device("meta"):
        twin = Transformer(args)
    twin.load_state_dict(model.state_dict(), assign=True)
    if args.tie_embeddings:
        twin.lm_head.weight = twin.model.embed_tokens.weight
    return twin.eval()


@torch.inference_mode()
def token_logprobs(model: Transformer, ids: Sequence[int], seq_len: int, stride: int | None = None,
                   batch_size: int = 1, chunk: int | None = None, progress: bool | None = False) -> torch.Tensor:
    """log P(x_i | its window's context) for i = 1..n-1 (float64, length n-1), see `strided_windows`.

    Windows of equal length run `batch_size` at a time; each goes through a fresh rolling cache
    in chunks of `chunk` tokens (default: as many as keep the chunk's logits under
    LOGITS_BUDGET), and only the chunk holding scored positions has its logits computed.
    """
    a = model.args
    if a.sliding_window is None and seq_len > a.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds max_seq_len={a.max_seq_len} of a model without a "
                         "sliding window (use with_window(model, None, min_len=seq_len) to allow it)")
    x = torch.as_tensor(list(ids), dtype=torch.long)
    n = len(x)
    windows = strided_windows(n, seq_len, stride)
    device = model.device
    out = torch.empty(n - 1, dtype=torch.float64)
    groups: list[list[tuple[int, int]]] = []
    for w in windows:  # consecutive windows of one length share a batch
        length = min(seq_len, n - 1 - w[0])
        if groups and len(groups[-1]) < batch_size and min(seq_len, n - 1 - groups[-1][0][0]) == length:
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = _progress(n - 1, "perplexity", progress)
    for group in groups:
        B = len(group)
        L = min(seq_len, n - 1 - group[0][0])
        rows = torch.stack([x[s:s + L] for s, _ in group]).to(device)
        targets = torch.stack([x[s + 1:s + L + 1] for s, _ in group]).to(device)
        c = chunk or max(1, min(L, LOGITS_BUDGET // (B * a.vocab_size)))
        first_scored = L - max(k for _, k in group)  # earliest scored prediction in the group
        cache = model.new_cache(B, capacity=None if a.sliding_window else L)
        for c0 in range(0, L, c):
            c1 = min(c0 + c, L)
            if c1 <= first_scored:  # nothing scored here: advance the cache only
                model(rows[:, c0:c1], cache=cache, last_logits_only=True)
                continue
            logits, cache = model(rows[:, c0:c1], cache=cache)
            lp = logits.float().log_softmax(-1).gather(-1, targets[:, c0:c1, None])[..., 0].double().cpu()
            for r, (s, k) in enumerate(group):
                lo = max(c0, L - k)  # scored predictions of this row inside the chunk
                if lo < c1:
                    out[s + lo:s + c1] = lp[r, lo - c0:]
        bar.update(sum(k for _, k in group))
    bar.close()
    return out


@dataclass
class PerplexityResult:
    seq_len: int
    stride: int
    window: int | None  # the sliding window the model ran with (None: full attention)
    label: str  # "model" / "none" / the forced window
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per token (nats)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ppl": self.ppl}


def parse_window(spec: str) -> str | int | None:
    """'model' (as loaded), 'none' (full attention) or a positive integer window."""
    s = spec.strip().lower()
    if s in ("model", "none"):
        return s
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise ValueError(f"window must be 'model', 'none' or a positive integer, got {spec!r}")


def perplexity(model: Transformer, ids: Sequence[int], seq_lens: Sequence[int], stride: int | float | None = None,
               windows: Sequence[str | int | None] = ("model",), batch_size: int = 1,
               progress: bool | None = False) -> list[PerplexityResult]:
    """Perplexity of one token stream at each seq_len, for each window setting.

    stride: None (= seq_len), an int (capped at seq_len), or a float in (0, 1] (fraction of seq_len).
    windows: "model" (as loaded), "none" (disabled) or an int (forced), see `with_window`.
    """
    results = []
    for w in windows:
        w = parse_window(str(w)) if w is not None else "none"
        for L in seq_lens:
            if stride is None:
                s = L
            elif isinstance(stride, float):
                if not 0 < stride <= 1:
                    raise ValueError(f"a fractional stride must be in (0, 1], got {stride}")
                s = max(1, int(L * stride))
            else:
                s = min(int(stride), L)
            m = model if w == "model" else with_window(model, None if w == "none" else w, min_len=L)
            lp = token_logprobs(m, ids, L, s, batch_size=batch_size, progress=progress)
            results.append(PerplexityResult(L, s, m.args.sliding_window, str(w), len(lp), float(-lp.mean())))
    return results


def perplexity_table(results: Sequence[PerplexityResult]) -> str:
    head = f"{'window':>10} {'seq_len':>8} {'stride':>7} {'tokens':>8} {'NLL':>8} {'PPL':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        label = r.label if r.label != "model" else f"model({r.window})"
        lines.append(f"{label:>10} {r.seq_len:>8} {r.stride:>7} {r.tokens:>8} {r.nll:>8.4f} {r.ppl:>10.3f}")
    return "\n".join(lines)


def plot_perplexity(results: Sequence[PerplexityResult], path: str | Path, title: str = "") -> Path:
    """PNG: perplexity against seq_len, one line per window setting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label in dict.fromkeys(r.label for r in results):
        rs = sorted((r for r in results if r.label == label), key=lambda r: r.seq_len)
        name = "window disabled" if label == "none" else (
            f"window {rs[0].window}" + (" (as loaded)" if label == "model" else ""))
        ax.plot([r.seq_len for r in rs], [r.ppl for r in rs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens per window)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity by evaluation length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# ================================================================ log-likelihood scoring
def encode_pair(tokenizer: "Tokenizer", context: str, continuation: str,
                cache: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval splits them (see the module docstring)."""
    if context == "":
        cont = tokenizer.encode(continuation, bos=False)
        bos = tokenizer.bos_id
        return ([bos], cont) if not cont or cont[0] != bos else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, bos=True)
    if cache is not None:
        if context not in cache:
            cache[context] = tokenizer.encode(context, bos=True)
        ctx = cache[context]
    else:
        ctx = tokenizer.encode(context, bos=True)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def score_tokens(model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                 batch_size: int = 16, max_length: int | None = None,
                 progress: bool | None = False) -> list[tuple[float, bool]]:
    """(sum of log P(continuation tokens), whether each is the argmax) per (context, continuation).

    The model reads (context + continuation)[-(max_length + 1):][:-1] (lm-eval's truncation;
    max_length defaults to max_seq_len). Requests reading the same tokens share one forward
    (all four answer letters of an MMLU question, for instance). Inputs run longest first,
    right-padded, as plain full forwards: padding on the right never changes earlier positions
    under causal attention. A batch holds at most `batch_size` rows and TOKENS_BUDGET tokens,
    and only the positions that predict continuation tokens go through lm_head.
    """
    max_length = max_length or model.args.max_seq_len
    inputs: dict[tuple[int, ...], list[int]] = {}  # input ids -> request indices
    conts: list[list[int]] = []
    for i, (ctx, cont) in enumerate(requests):
        cont = [int(t) for t in cont]
        if not cont:
            raise ValueError(f"request {i} has an empty continuation (nothing to score)")
        whole = ([int(t) for t in ctx] + cont)[-(max_length + 1):]
        if len(whole) < 2:
            raise ValueError(f"request {i} needs a context token before its continuation")
        conts.append(cont[-(len(whole) - 1):])  # a continuation longer than the window is cut too
        inputs.setdefault(tuple(whole[:-1]), []).append(i)
    order = sorted(inputs, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = model.device
    bar = _progress(len(requests), "scoring", progress)
    start = 0
    while start < len(order):
        T = len(order[start])
        B = max(1, min(batch_size, TOKENS_BUDGET // T, len(order) - start))
        batch = order[start:start + B]
        start += B
        tokens = torch.zeros(B, T, dtype=torch.long)
        spans = []  # (row, first position, n) of the predictions each input needs
        for r, inp in enumerate(batch):
            tokens[r, :len(inp)] = torch.tensor(inp)
            n = max(len(conts[i]) for i in inputs[inp])
            spans.append((r, len(inp) - n, n))
        logits = _logits_at(model, tokens.to(device), spans)  # (sum of n, V), in span order
        offset = 0
        for (r, first, n), inp in zip(spans, batch):
            for i in inputs[inp]:
                cont = torch.tensor(conts[i], device=device)
                lp = logits[offset + n - len(cont):offset + n].float().log_softmax(-1)
                ll = float(lp.gather(-1, cont[:, None]).double().sum())
                results[i] = (ll, bool((lp.argmax(-1) == cont).all()))
            offset += n
            bar.update(len(inputs[inp]))
    bar.close()
    return results


def _logits_at(model: Transformer, tokens: torch.Tensor, spans: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Logits of a plain full forward at the positions `spans` = [(row, first, n)] only, as
    (sum of n, V): a pre-hook hands lm_head just those hidden states, so an MMLU prompt of 700
    tokens costs one row of logits, not 700."""
    rows = torch.cat([torch.full((n,), r) for r, _, n in spans]).to(tokens.device)
    cols = torch.cat([torch.arange(f, f + n) for _, f, n in spans]).to(tokens.device)

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][rows, cols][None],)

    handle = model.lm_head.register_forward_pre_hook(select)
    try:
        logits, _ = model(tokens, use_cache=False)
    finally:
        handle.remove()
    return logits[0]


def loglikelihood(model: Transformer, tokenizer: "Tokenizer", pairs: Sequence[tuple[str, str]],
                  batch_size: int = 16, max_length: int | None = None,
                  progress: bool | None = False) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) per (context, continuation) text pair."""
    cache: dict[str, list[int]] = {}
    reqs = [encode_pair(tokenizer, c, x, cache) for c, x in pairs]
    return score_tokens(model, reqs, batch_size, max_length, progress)


def loglikelihood_rolling(model: Transformer, tokenizer: "Tokenizer", texts: Sequence[str],
                          max_length: int | None = None, progress: bool | None = False) -> list[float]:
    """log P(text) of each text after BOS, in disjoint max_length windows (lm-eval's rule)."""
    max_length = max_length or model.args.max_seq_len
    out = []
    for text in texts:
        ids = tokenizer.encode(text, bos=True)
        out.append(float(token_logprobs(model, ids, max_length, max_length).sum()) if len(ids) > 1 else 0.0)
    return out


# ================================================================ multiple-choice benchmarks
@dataclass
class MCItem:
    """One question: the model scores `context + delimiter + choice` for every choice."""

    task: str
    doc_id: int
    context: str
    choices: list[str]
    gold: int | list[int]  # index of the correct choice ("mc"), or all correct indices ("mc2")
    metric: str = "mc"  # "mc": acc and acc_norm; "mc2": probability mass on the correct choices
    delimiter: str = " "
    group: str | None = None  # e.g. "mmlu" for its subjects

    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, self.delimiter + c) for c in self.choices]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, as np.argmax


def item_scores(item: MCItem, lls: Sequence[float]) -> dict[str, float]:
    """Per-item metrics from the choices' log-likelihoods (lm-eval's definitions)."""
    if item.metric == "mc2":
        m = max(lls)
        p = [math.exp(x - m) for x in lls]
        gold = set(item.gold if isinstance(item.gold, list) else [item.gold])
        return {"acc": sum(p[i] for i in gold) / sum(p)}
    gold = item.gold
    pred = _argmax(lls)
    pred_norm = _argmax([ll / len(c) if c else ll for ll, c in zip(lls, item.choices)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def mean_stderr(xs: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n) (nan for fewer than 2 values)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


@dataclass
class TaskResult:
    task: str
    n: int
    metrics: dict[str, float]  # acc, acc_norm (mean over items)
    stderr: dict[str, float]
    group: str | None = None
    kind: str = "task"  # "task", "macro" (mean of subtasks), "micro" (mean over all their items)
    scores: dict[str, list[float]] = field(default_factory=dict, repr=False)  # per-item values

    def to_dict(self) -> dict[str, Any]:
        clean = lambda d: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
        return {"task": self.task, "n": self.n, "kind": self.kind, "group": self.group,
                **clean(self.metrics), **{f"{k}_stderr": v for k, v in clean(self.stderr).items()}}


def evaluate_mc(model: Transformer, tokenizer: "Tokenizer", items: Sequence[MCItem], batch_size: int = 16,
                max_length: int | None = None, progress: bool | None = None) -> list[TaskResult]:
    """Score every item's choices in one batched pass; per-task results, then group rows
    (macro: mean of the subtasks' accuracies; micro: mean over all their items)."""
    pairs = [r for it in items for r in it.requests()]
    lls = [ll for ll, _ in loglikelihood(model, tokenizer, pairs, batch_size, max_length, progress)]
    per_task: dict[str, dict[str, list[float]]] = {}
    groups: dict[str, str | None] = {}
    k = 0
    for it in items:
        scores = item_scores(it, lls[k:k + len(it.choices)])
        k += len(it.choices)
        per = per_task.setdefault(it.task, {})
        for name, v in scores.items():
            per.setdefault(name, []).append(v)
        groups[it.task] = it.group
    results = []
    for task, per in per_task.items():
        results.append(TaskResult(task, len(next(iter(per.values()))),
                                  {m: sum(v) / len(v) for m, v in per.items()},
                                  {m: mean_stderr(v) for m, v in per.items()}, groups[task], scores=per))
    for group in dict.fromkeys(g for g in groups.values() if g):
        members = [r for r in results if r.group == group]
        names = list(members[0].metrics)
        macro = {m: sum(r.metrics[m] for r in members) / len(members) for m in names}
        macro_se = {m: math.sqrt(sum(r.stderr[m] ** 2 for r in members)) / len(members) for m in names}
        pooled = {m: [v for r in members for v in r.scores[m]] for m in names}
        n = sum(r.n for r in members)
        results.append(TaskResult(group, n, macro, macro_se, kind="macro"))
        results.append(TaskResult(group, n, {m: sum(v) / n for m, v in pooled.items()},
                                  {m: mean_stderr(v) for m, v in pooled.items()}, kind="micro"))
    return results


def results_table(results: Sequence[TaskResult]) -> str:
    """Markdown table: task, items, acc ± stderr, acc_norm ± stderr."""
    def cell(r: TaskResult, m: str) -> str:
        if m not in r.metrics:
            return "-"
        se = r.stderr.get(m, float("nan"))
        return f"{100 * r.metrics[m]:.2f} ± {100 * se:.2f}" if not math.isnan(se) else f"{100 * r.metrics[m]:.2f}"

    lines = ["| task | items | acc (%) | acc_norm (%) |", "|---|---:|---:|---:|"]
    ordered = [r for r in results if r.group is None and r.kind == "task"]
    for group in dict.fromkeys(r.group for r in results if r.group):
        ordered += [r for r in results if r.task == group and r.kind != "task"]
        ordered += [r for r in results if r.group == group]
    for r in ordered:
        name = r.task if r.kind == "task" else f"**{r.task}** ({r.kind} average)"
        if r.group:
            name = "&nbsp;&nbsp;" + r.task.removeprefix(r.group + "_")
        lines.append(f"| {name} | {r.n} | {cell(r, 'acc')} | {cell(r, 'acc_norm')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- readers: MMLU
MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    for i, r in enumerate(rows, 1):
        if len(r) != 6 or r[5].strip() not in MMLU_LETTERS:
            raise ValueError(f"{path}:{i}: expected question,A,B,C,D,answer(A-D), got {r[:6]!r}")
    return rows


def _mmlu_question(row: Sequence[str]) -> str:
    q, *choices = row[:5]
    return q.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip(MMLU_LETTERS, choices)) + "\nAnswer:"


def read_mmlu(path: str | Path, shots: int = 5, subjects: Iterable[str] | None = None,
              split: str = "test", limit: int | None = None) -> list[MCItem]:
    """MMLU from the original hendrycks CSVs: `path` holds `dev/<subject>_dev.csv` (the few-shot
    exemplars, first `shots` rows) and `test/<subject>_test.csv` (or `val/`). The prompt is
    lm-eval's: "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
    then each exemplar as "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n", then
    the question ending in "Answer:"; the choices are " A" .. " D"."""
    root = Path(path)
    if (root / "data" / split).is_dir():
        root = root / "data"
    if not (root / split).is_dir():
        raise FileNotFoundError(f"no {split}/ folder of MMLU CSV files in {path}")
    files = sorted((root / split).glob(f"*_{split}.csv"))
    wanted = set(subjects) if subjects is not None else None
    items = []
    for file in files:
        subject = file.name[: -len(f"_{split}.csv")]
        if wanted is not None and subject not in wanted:
            continue
        exemplars = []
        if shots:
            dev = root / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                raise FileNotFoundError(f"{shots}-shot MMLU needs {dev}")
            exemplars = _mmlu_rows(dev)[:shots]
            if len(exemplars) < shots:
                raise ValueError(f"{dev} has {len(exemplars)} rows, fewer than {shots} shots")
        prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix += "".join(_mmlu_question(r) + " " + r[5].strip() + "\n\n" for r in exemplars)
        for i, row in enumerate(_mmlu_rows(file)[:limit]):
            items.append(MCItem(f"mmlu_{subject}", i, prefix + _mmlu_question(row), list(MMLU_LETTERS),
                                MMLU_LETTERS.index(row[5].strip()), group="mmlu"))
    if wanted is not None and (missing := wanted - {it.task[5:] for it in items}):
        raise FileNotFoundError(f"no MMLU {split} file for subject(s): {', '.join(sorted(missing))}")
    if not items:
        raise ValueError(f"no MMLU questions in {root / split}")
    return items


# ---------------------------------------------------------------- readers: ARC
def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not JSON: {exc}") from None
    return out


def arc_task_name(path: str | Path) -> str:
    return "arc_challenge" if "challenge" in Path(path).name.lower() else "arc_easy"


def read_arc(path: str | Path, task: str | None = None, limit: int | None = None) -> list[MCItem]:
    """ARC from the original jsonl ({"question": {"stem", "choices": [{"text", "label"}]},
    "answerKey"}; a Hugging Face export with a plain `question` and `choices.text/label` works
    too). lm-eval's 0-shot prompt: "Question: {stem}\\nAnswer:", choices " {text}"."""
    path = Path(path)
    items = []
    for i, doc in enumerate(_jsonl(path)[:limit]):
        q = doc["question"]
        if isinstance(q, dict):
            stem, labels = q["stem"], [c["label"] for c in q["choices"]]
            texts = [c["text"] for c in q["choices"]]
        else:
            stem, labels, texts = q, list(doc["choices"]["label"]), list(doc["choices"]["text"])
        key = str(doc["answerKey"])
        if key not in labels:
            raise ValueError(f"{path}: item {doc.get('id', i)} answerKey {key!r} is not among labels {labels}")
        items.append(MCItem(task or arc_task_name(path), i, f"Question: {stem}\nAnswer:", texts, labels.index(key)))
    return items


# ---------------------------------------------------------------- readers: HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """The standard HellaSwag cleanup (lm-eval / llama.cpp): WikiHow [title]/[step] markers."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: str | Path, limit: int | None = None) -> list[MCItem]:
    """HellaSwag jsonl: the original schema (activity_label, ctx_a, ctx_b, endings, label) gets
    the standard preprocessing, query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize();
    an already preprocessed file ({"query", "endings", "label"}) is used as it is."""
    path = Path(path)
    items = []
    for i, doc in enumerate(_jsonl(path)[:limit]):
        if "query" in doc:
            query, endings = doc["query"], list(doc.get("endings") or doc["choices"])
        else:
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
            query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
            endings = [hellaswag_preprocess(e) for e in doc["endings"]]
        label = doc.get("label", doc.get("gold"))
        if label in (None, ""):
            raise ValueError(f"{path}: item {i} has no label (the test split is unlabelled)")
        items.append(MCItem("hellaswag", int(doc.get("ind", i)), query, endings, int(label)))
    return items


# ---------------------------------------------------------------- readers: TruthfulQA
TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _close(answer: str) -> str:
    answer = answer.strip()
    return answer if not answer or answer.endswith(".") else answer + "."


def _split_answers(cell: str) -> list[str]:
    return [_close(a) for a in cell.split(";") if a.strip()]


def _truthfulqa_targets(path: Path) -> list[tuple[str, dict[str, tuple[list[str], list[int]]]]]:
    """(question, {"mc1": (choices, labels), "mc2": ...}) per question, from any of the formats."""
    out = []
    if path.suffix == ".csv":
        # The original TruthfulQA.csv (the MC targets file is not public data here): MC1 =
        # best answer vs the incorrect answers, MC2 = all correct vs all incorrect answers;
        # answers closed with a period, as TruthfulQA's own utilities do.
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                best = _close(row["Best Answer"])
                true, false = _split_answers(row["Correct Answers"]), _split_answers(row["Incorrect Answers"])
                if best not in true:
                    true.insert(0, best)
                out.append((row["Question"].strip(), {
                    "mc1": ([best, *false], [1] + [0] * len(false)),
                    "mc2": ([*true, *false], [1] * len(true) + [0] * len(false)),
                }))
        return out
    for doc in _jsonl(path):
        targets = {}
        for k in ("mc1", "mc2"):
            t = doc[f"{k}_targets"]
            if "choices" in t:  # Hugging Face export
                targets[k] = (list(t["choices"]), [int(x) for x in t["labels"]])
            else:  # mc_task.json: {answer: label}
                targets[k] = (list(t), [int(x) for x in t.values()])
        out.append((doc["question"].strip(), targets))
    return out


def read_truthfulqa(path: str | Path, variant: str = "mc1", limit: int | None = None) -> list[MCItem]:
    """TruthfulQA MC1 or MC2 (lm-eval's QA prompt, 0-shot) from mc_task.json, a Hugging Face
    `multiple_choice` export (jsonl/json), or the original TruthfulQA.csv (an approximation)."""
    if variant not in ("mc1", "mc2"):
        raise ValueError(f"TruthfulQA variant must be mc1 or mc2, got {variant!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    items = []
    for i, (question, targets) in enumerate(_truthfulqa_targets(path)[:limit]):
        choices, labels = targets[variant]
        context = TRUTHFULQA_PROMPT + "\n\nQ: " + question + "\nA:"
        if variant == "mc1":
            items.append(MCItem("truthfulqa_mc1", i, context, choices, labels.index(1)))
        else:
            items.append(MCItem("truthfulqa_mc2", i, context, choices,
                                [j for j, x in enumerate(labels) if x == 1], metric="mc2"))
    return items


# ---------------------------------------------------------------- tasks by name
TASKS = ("mmlu", "arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc1", "truthfulqa_mc2")
DEFAULT_SHOTS = {"mmlu": 5}  # the Mistral paper's settings: MMLU 5-shot, the others 0-shot
_PATTERNS = {
    "arc_easy": ["ARC-Easy-Test*.jsonl"],
    "arc_challenge": ["ARC-Challenge-Test*.jsonl"],
    "hellaswag": ["hellaswag_val*.jsonl"],
    "truthfulqa_mc1": ["mc_task.json", "TruthfulQA*.csv"],
    "truthfulqa_mc2": ["mc_task.json", "TruthfulQA*.csv"],
}


def find_task_data(task: str, data_dir: str | Path) -> Path:
    """Where `task`'s file (or MMLU's folder) lies under `data_dir`, by the original file names."""
    root = Path(data_dir)
    if task == "mmlu" or task.startswith("mmlu_"):
        for cand in (root / "mmlu", root / "mmlu" / "data", root / "data", root):
            if (cand / "test").is_dir():
                return cand
        raise FileNotFoundError(f"no MMLU folder (with test/ and dev/) under {root}")
    if task not in _PATTERNS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)} (or mmlu_<subject>)")
    for pattern in _PATTERNS[task]:
        found = sorted(root.rglob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"no data for {task} under {root} (looked for {', '.join(_PATTERNS[task])})")


def load_task(task: str, path: str | Path, shots: int | None = None, limit: int | None = None) -> list[MCItem]:
    """Items of one task by name from its file/folder (`shots` only for MMLU)."""
    if task == "mmlu" or task.startswith("mmlu_"):
        subjects = None if task == "mmlu" else [task[5:]]
        return read_mmlu(path, shots=DEFAULT_SHOTS["mmlu"] if shots is None else shots,
                         subjects=subjects, limit=limit)
    if shots:
        raise ValueError(f"{task} is evaluated 0-shot here (as in the Mistral paper); got shots={shots}")
    if task in ("arc_easy", "arc_challenge"):
        return read_arc(path, task, limit)
    if task == "hellaswag":
        return read_hellaswag(path, limit)
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return read_truthfulqa(path, task[-3:], limit)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)} (or mmlu_<subject>)")


# ================================================================ translation
def read_translation_pairs(path: str | Path, reverse: bool = False, limit: int | None = None,
                           group_references: bool = True) -> list[tuple[str, list[str]]]:
    """(source, references) from an `en<TAB>fr` TSV (`reverse`: fr -> en). Lines sharing a
    source become one sentence with several references (Tatoeba lists several translations of
    many sentences), unless `group_references` is False. `limit`: the first N sources."""
    from .data import read_pairs

    pairs = read_pairs(path, reverse=reverse)
    if not group_references:
        return [(s, [t]) for s, t in pairs][:limit]
    grouped: dict[str, list[str]] = {}
    for s, t in pairs:
        if s in grouped or limit is None or len(grouped) < limit:
            grouped.setdefault(s, []).append(t)
    return list(grouped.items())


def translation_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults), several references per sentence allowed."""
    from sacrebleu.metrics import BLEU, CHRF

    n_refs = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(n_refs)]
    bleu, chrf = BLEU(), CHRF()
    return {"bleu": bleu.corpus_score(list(hypotheses), streams).score,
            "chrf": chrf.corpus_score(list(hypotheses), streams).score,
            "sentences": len(hypotheses), "max_references": n_refs,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def translate_eval(model: Transformer, tokenizer: "Tokenizer", sources: Sequence[str], template: str,
                   batch_size: int = 32, max_new_tokens: int = 128,
                   progress: bool | None = None) -> list[str]:
    """Greedy hypotheses for `template.format(source=...)` prompts, cut at the first newline."""
    from .generate import generate

    if "{source}" not in template:
        raise ValueError("the template must contain {source}")
    out: list[str] = []
    bar = _progress(len(sources), "translating", progress)
    for k in range(0, len(sources), batch_size):
        prompts = [template.format(source=s.strip()) for s in sources[k:k + batch_size]]
        texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
        out += [t.strip() for t in texts]
        bar.update(len(prompts))
    bar.close()
    return out


# ================================================================ self-check against transformers
SELF_CHECK_ITEMS: list[tuple[str, str]] = [
    ("The capital of France is", " Paris"),
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " carbon dioxide"),
    ("", "Hello world"),
    ("Translate: English → French\nEnglish: I am happy.\nFrench:", " Je suis heureux."),
    ("Translate: English → French\nEnglish: Where is the station?\nFrench: ", "Où est la gare ?"),
    ("The following are multiple choice questions (with answers).\n\n2 + 2 =\nA. 3\nB. 4\nAnswer:", " B"),
]


def hf_reference(model: Transformer):
    """transformers' MistralForCausalLM sharing `model`'s weight tensors (no copy), eager attention."""
    import transformers

    cfg = {k: v for k, v in model.args.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    config = transformers.MistralConfig(**cfg)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        hf = transformers.MistralForCausalLM(config)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    w = model.lm_head.weight
    with torch.device(w.device):  # a real inv_freq buffer (fp32, as transformers keeps it)
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config)
    for name, buf in hf.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"transformers reference has an unset buffer {name}")
    return hf.eval()


@torch.inference_mode()
def hf_score_tokens(hf, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """The reference: one unpadded transformers forward per request."""
    out = []
    device = next(hf.parameters()).device
    for ctx, cont in requests:
        ids = torch.tensor([list(ctx) + list(cont)], device=device)
        logits = hf(ids[:, :-1]).logits[0, -len(cont):].float().log_softmax(-1)
        c = torch.tensor(list(cont), device=device)
        out.append((float(logits.gather(-1, c[:, None]).double().sum()), bool((logits.argmax(-1) == c).all())))
    return out


@dataclass
class SelfCheck:
    ok: bool
    max_diff: float  # ours vs transformers, max over items (nats)
    batch_diff: float  # ours batched vs ours one at a time
    atol: float
    items: list[dict[str, Any]]
    skipped: str = ""  # why the transformers comparison did not run

    def summary(self) -> str:
        if self.skipped:
            return f"self-check: batched vs single max |diff| {self.batch_diff:.2e}; transformers comparison skipped ({self.skipped})"
        verdict = "OK" if self.ok else "FAILED"
        return (f"self-check {verdict}: {len(self.items)} items, max |ours - transformers| = {self.max_diff:.2e} nats "
                f"(tolerance {self.atol:.0e}), batched vs single {self.batch_diff:.2e}")


def self_check(model: Transformer, tokenizer: "Tokenizer", items: Sequence[tuple[str, str]] = SELF_CHECK_ITEMS,
               atol: float | None = None, batch_size: int = 8) -> SelfCheck:
    """Score known items with our batched path, our one-at-a-time path and transformers on the
    same weights; they must agree (fp32: 1e-3 nats; bf16/fp16: 0.05 per token + 0.1). A wrong
    alignment of logits and targets, a padding leak or a broken cache shows as several nats."""
    items = list(items)
    window = model.args.sliding_window
    if window is not None and window <= 512:  # make one item cross the window
        filler = " ".join(["the cat sat on the mat."] * (window // 4 + 2))
        items.append((filler + " The dog", " sat on the mat."))
    cache: dict[str, list[int]] = {}
    reqs = [encode_pair(tokenizer, c, x, cache) for c, x in items]
    ours = score_tokens(model, reqs, batch_size=batch_size)
    single = [score_tokens(model, [r], batch_size=1)[0] for r in reqs]
    batch_diff = max(abs(a[0] - b[0]) for a, b in zip(ours, single))
    fp32 = model.dtype == torch.float32
    tol = [atol if atol is not None else (1e-3 if fp32 else 0.1 + 0.05 * len(c)) for _, c in reqs]
    rows = [{"context": c[-60:], "continuation": x, "tokens": len(r[1]), "ours": o[0]} for (c, x), r, o in zip(items, reqs, ours)]
    try:
        hf = hf_reference(model)
    except ImportError:
        ok = batch_diff <= min(tol)
        return SelfCheck(ok, float("nan"), batch_diff, min(tol), rows, skipped="transformers is not installed")
    ref = hf_score_tokens(hf, reqs)
    del hf
    diffs = [abs(a[0] - b[0]) for a, b in zip(ours, ref)]
    for row, b, d in zip(rows, ref, diffs):
        row.update(transformers=b[0], diff=d)
    ok = all(d <= t for d, t in zip(diffs, tol)) and batch_diff <= min(tol)
    if fp32:
        ok = ok and all(a[1] == b[1] for a, b in zip(ours, ref))
    return SelfCheck(ok, max(diffs), batch_diff, min(tol) if atol is None else atol, rows)
