"""evaluate.py / lm_eval_adapter.py / `mistral-torch evaluate`: perplexity windows against hand
computations, MC log-likelihoods against transformers, readers against the formats, and our
benchmark numbers against lm-evaluation-harness's through our adapter (where lm-eval is installed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_twin, tiny_args

from mistral_torch import Transformer
from mistral_torch import evaluate as ev

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on 2 shared cores, 2 OpenMP threads wait on each other for
    milliseconds per op whenever the other core is busy (100x slower here); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_for(seed: int = 0, std: float = 0.2, **overrides) -> Transformer:
    """A tiny random model with peaked distributions (std 0.2), so misaligned scores show."""
    return Transformer(tiny_args(**overrides)).init_weights(std=std, seed=seed).eval()


@pytest.fixture(scope="module")
def tok():
    from mistral_torch.tokenizer import load_tokenizer

    return load_tokenizer("v1")  # Mistral-7B's SentencePiece tokenizer, shipped in mistral-common


@pytest.fixture(scope="module")
def lm32k():
    """Tiny model at the real vocabulary (32000), window 16, max_seq_len 2048."""
    return model_for(seed=3, vocab_size=32000, sliding_window=16, max_seq_len=2048)


def plain_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1 from one plain full forward (no cache)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]), use_cache=False)
    return logits[0].double().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------- strided windows
def test_strided_windows_examples():
    assert ev.strided_windows(10, 4, 2) == [(0, 4), (2, 2), (4, 2), (5, 1)]
    # lm-eval's loglikelihood_rolling docstring: BOS + 10 tokens, max length 4
    assert ev.strided_windows(11, 4) == [(0, 4), (4, 4), (6, 2)]
    assert ev.strided_windows(3, 8) == [(0, 2)]  # shorter than one window
    with pytest.raises(ValueError, match="stride"):
        ev.strided_windows(10, 4, 5)
    with pytest.raises(ValueError, match="at least 2"):
        ev.strided_windows(1, 4)


@pytest.mark.parametrize("n,L,S", [(2, 1, 1), (17, 5, 1), (17, 5, 3), (40, 7, 7), (8, 100, 30), (64, 16, 12)])
def test_strided_windows_cover_every_token_once(n, L, S):
    seen = []
    for start, k in ev.strided_windows(n, L, S):
        length = min(L, n - 1 - start)
        assert start >= 0 and 1 <= k <= length and start + length <= n - 1
        seen += list(range(start + length - k + 1, start + length + 1))  # indices of scored targets
    assert seen == list(range(1, n))


def test_perplexity_within_one_window_is_exp_mean_nll_of_full_forward():
    model = model_for(seed=1, sliding_window=32)
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), use_cache=False)
    nll = F.cross_entropy(logits[0, :-1].double(), torch.tensor(ids[1:]))
    for L in (32, 64):  # the whole text fits in one evaluation window
        (r,) = ev.perplexity(model, ids, [L])
        assert r.tokens == 29 and r.window == 32
        assert r.nll == pytest.approx(float(nll), abs=1e-6)
        assert r.ppl == pytest.approx(math.exp(float(nll)), rel=1e-6)


def test_strided_evaluation_matches_hand_computation():
    model = model_for(seed=2, sliding_window=None)
    x = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    # seq_len 4, stride 2: the model reads x0..x3 and scores x1..x4; reads x2..x5, scores x5 x6;
    # reads x4..x7, scores x7 x8; the last window is aligned to the end: reads x5..x8, scores x9.
    hand = {}
    for lo, hi, targets in [(0, 4, [1, 2, 3, 4]), (2, 6, [5, 6]), (4, 8, [7, 8]), (5, 9, [9])]:
        lp = plain_logprobs(model, x[lo:hi + 1])  # lp[j] = log P(x[lo+j+1] | x[lo..lo+j])
        for t in targets:
            hand[t] = float(lp[t - lo - 1])
    expected = torch.tensor([hand[t] for t in range(1, 10)], dtype=torch.float64)
    for batch_size, chunk in [(1, None), (3, None), (2, 1), (4, 3)]:
        got = ev.token_logprobs(model, x, 4, 2, batch_size=batch_size, chunk=chunk)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    (r,) = ev.perplexity(model, x, [4], stride=2)
    assert r.nll == pytest.approx(-float(expected.mean()), abs=1e-6)
    (half,) = ev.perplexity(model, x, [4], stride=0.5)
    assert half.stride == 2 and half.nll == r.nll


def test_long_windows_go_through_the_rolling_cache_exactly():
    """A window far longer than the attention window, in chunks through the cache, equals one
    plain forward over it; with the window disabled (same weights) it equals a window-less model."""
    model = model_for(seed=4, sliding_window=8, max_seq_len=64)
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    full = plain_logprobs(model, ids[:41])  # one window of 40 tokens read, 5x the attention window
    got = ev.token_logprobs(model, ids[:41], 40, chunk=7, batch_size=2)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=0)
    # window disabled: weights shared (no copy), full causal attention, longer max_seq_len allowed
    off = ev.with_window(model, None, min_len=128)
    assert off.args.sliding_window is None and off.args.max_seq_len == 128
    assert off.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    ref = Transformer(tiny_args(sliding_window=None, max_seq_len=128)).eval()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ev.token_logprobs(off, ids, 128, 64, chunk=50), ev.token_logprobs(ref, ids, 128, 64),
                               atol=2e-5, rtol=0)
    torch.testing.assert_close(ev.token_logprobs(off, ids[:41], 40), plain_logprobs(ref, ids[:41]), atol=2e-5, rtol=0)
    # and the window matters once the evaluation length exceeds it, not before
    short = ev.perplexity(model, ids, [8], windows=["model", "none"])
    assert short[0].nll == pytest.approx(short[1].nll, abs=1e-6)
    long = ev.perplexity(model, ids, [64], windows=["model", "none"])
    assert abs(long[0].nll - long[1].nll) > 1e-4
    with pytest.raises(ValueError, match="max_seq_len"):
        ev.token_logprobs(ref, ids, 129)


def test_perplexity_table_json_and_plot(tmp_path):
    model = model_for(seed=5, sliding_window=8, max_seq_len=64)
    ids = list(range(1, 100))
    results = ev.perplexity(model, ids, [8, 32], windows=["model", "none", "4"])
    assert [(r.label, r.window, r.seq_len) for r in results] == [
        ("model", 8, 8), ("model", 8, 32), ("none", None, 8), ("none", None, 32), ("4", 4, 8), ("4", 4, 32)]
    table = ev.perplexity_table(results)
    assert "model(8)" in table and "none" in table and len(table.splitlines()) == 8
    json.dumps([r.to_dict() for r in results])
    png = ev.plot_perplexity(results, tmp_path / "ppl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="window"):
        ev.parse_window("0")


# ---------------------------------------------------------------- log-likelihood scoring
def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = ev.encode_pair(tok, "Question: Why?\nAnswer: ", "Because")  # trailing space moves
    assert ctx == tok.encode("Question: Why?\nAnswer:") and ctx[0] == tok.bos_id
    assert ctx + cont == tok.encode("Question: Why?\nAnswer: Because")
    assert tok.decode(cont) == "Because"
    assert ev.encode_pair(tok, "", "Hello") == ([tok.bos_id], tok.encode("Hello", bos=False))
    lm_model = pytest.importorskip("lm_eval.api.model")

    class Probe(lm_model.TemplateLM):  # lm-eval's own splitting, on our tokenizer
        eot_token_id = tok.eos_id
        prefix_token_id = tok.bos_id
        def tok_encode(self, s, add_special_tokens=None, **kw): return tok.encode(s, bos=True)
        def _loglikelihood_tokens(self, requests, **kw): return [(r[1], r[2]) for r in requests]
        loglikelihood_rolling = generate_until = None

    class Req:
        def __init__(self, *args): self.args = args

    pairs = [("The capital of France is", " Paris"), ("a b  ", "c"), ("", "Hello world"), ("x:\n", " y z")]
    assert Probe().loglikelihood([Req(*p) for p in pairs], disable_tqdm=True) == [ev.encode_pair(tok, *p) for p in pairs]


def test_mc_loglikelihoods_equal_transformers(tok, lm32k):
    """The MC scoring path (batched, right-padded, shared inputs) against transformers' model
    holding the same weights, one unpadded sequence at a time: within 1e-4 nats."""
    items = ev.read_arc(FIXTURES / "arc" / "ARC-Challenge-Test.fixture.jsonl") + \
        ev.read_mmlu(FIXTURES / "mmlu", shots=1, subjects=["philosophy"], limit=2)
    pairs = [r for it in items for r in it.requests()] + [("", "Hello world")]
    ours = ev.loglikelihood(lm32k, tok, pairs, batch_size=5)
    hf = hf_twin(lm32k)
    reqs = [ev.encode_pair(tok, c, x) for c, x in pairs]
    assert max(len(c) + len(x) for c, x in reqs) > 2 * lm32k.args.sliding_window  # the window is crossed
    with torch.no_grad():
        for (ctx, cont), (ll, greedy) in zip(reqs, ours):
            logits = hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].double().log_softmax(-1)
            ref = logits.gather(-1, torch.tensor(cont)[:, None]).sum()
            assert abs(ll - float(ref)) <= 1e-4
            assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    assert len({round(ll, 3) for ll, _ in ours}) > len(ours) // 2  # not degenerate scores


def test_score_tokens_truncates_and_greedy_flag():
    model = model_for(seed=6, sliding_window=None, max_seq_len=16)
    ctx = list(range(1, 30))
    cont = [7, 8]
    (ll, _), = ev.score_tokens(model, [(ctx, cont)])
    whole = (ctx + cont)[-17:]  # lm-eval: the last max_length + 1 tokens, the last one not read
    assert ll == pytest.approx(float(plain_logprobs(model, whole)[-2:].sum()), abs=1e-5)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3]]), use_cache=False)
    g1, g2 = int(logits[0, 2].argmax()), int(logits[0, 1].argmax())
    res = ev.score_tokens(model, [([1, 2, 3], [g1]), ([1, 2, 3], [(g1 + 1) % 512]), ([1, 2], [3]), ([1, 2], [g2])])
    assert [g for _, g in res] == [True, False, g2 == 3, True]
    with pytest.raises(ValueError, match="empty continuation"):
        ev.score_tokens(model, [([1], [])])


def test_rolling_loglikelihood_is_the_sum_over_disjoint_windows(tok):
    model = model_for(seed=7, vocab_size=32000, sliding_window=None, max_seq_len=8)
    text = "The quick brown fox jumps over the lazy dog, twice over. And then it slept in the sun."
    ids = tok.encode(text)
    assert len(ids) > 17
    expected = 0.0
    for start, k in ev.strided_windows(len(ids), 8):
        expected += float(plain_logprobs(model, ids[start:start + 9])[-k:].sum())
    assert ev.loglikelihood_rolling(model, tok, [text])[0] == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- metrics
def test_item_scores_and_stderr():
    it = ev.MCItem("t", 0, "Q:", ["a", "bbbb", "cc"], gold=1)
    assert ev.item_scores(it, [-1.0, -3.0, -2.5]) == {"acc": 0.0, "acc_norm": 1.0}  # -0.75 per char wins
    assert ev.item_scores(it, [-2.0, -2.0, -5.0]) == {"acc": 0.0, "acc_norm": 1.0}  # tie: first index
    mc2 = ev.MCItem("t", 0, "Q:", ["x", "y", "z"], gold=[0, 1], metric="mc2")
    p = [math.exp(-1), math.exp(-2), math.exp(-3)]
    assert ev.item_scores(mc2, [-1, -2, -3])["acc"] == pytest.approx((p[0] + p[1]) / sum(p))
    assert ev.mean_stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.25 / 4))
    assert math.isnan(ev.mean_stderr([1.0]))


def test_evaluate_mc_groups_macro_and_micro(tok, lm32k):
    items = ev.read_mmlu(FIXTURES / "mmlu", shots=0, limit=None)
    items = [it for it in items if it.task != "mmlu_college_physics"] + \
        ev.read_mmlu(FIXTURES / "mmlu", shots=0, subjects=["college_physics"], limit=2)
    results = {(r.task, r.kind): r for r in ev.evaluate_mc(lm32k, tok, items, batch_size=8)}
    subjects = [results[(f"mmlu_{s}", "task")] for s in ("philosophy", "high_school_mathematics", "college_physics")]
    assert [r.n for r in subjects] == [4, 4, 2]
    macro, micro = results[("mmlu", "macro")], results[("mmlu", "micro")]
    assert macro.metrics["acc"] == pytest.approx(sum(r.metrics["acc"] for r in subjects) / 3)
    assert micro.metrics["acc"] == pytest.approx(sum(r.metrics["acc"] * r.n for r in subjects) / 10)
    assert macro.n == micro.n == 10
    table = ev.results_table(list(results.values()))
    assert "(macro average)" in table and "philosophy" in table


# ---------------------------------------------------------------- readers
def test_read_mmlu_prompt_format():
    items = ev.read_mmlu(FIXTURES / "mmlu", shots=5, subjects=["philosophy"])
    assert len(items) == 4 and items[0].task == "mmlu_philosophy" and items[0].group == "mmlu"
    with open(FIXTURES / "mmlu" / "dev" / "philosophy_dev.csv", newline="", encoding="utf-8") as f:
        dev = list(csv.reader(f))
    with open(FIXTURES / "mmlu" / "test" / "philosophy_test.csv", newline="", encoding="utf-8") as f:
        test = list(csv.reader(f))
    ctx = items[0].context
    assert ctx.startswith("The following are multiple choice questions (with answers) about philosophy.\n\n"
                          f"{dev[0][0]}\nA. {dev[0][1]}\nB. {dev[0][2]}\nC. {dev[0][3]}\nD. {dev[0][4]}\nAnswer: {dev[0][5]}\n\n")
    assert ctx.endswith(f"\n\n{test[0][0].strip()}\nA. {test[0][1]}\nB. {test[0][2]}\nC. {test[0][3]}\nD. {test[0][4]}\nAnswer:")
    assert ctx.count("\nAnswer:") == 6
    assert items[0].choices == ["A", "B", "C", "D"] and items[0].gold == "ABCD".index(test[0][5])
    assert items[0].requests()[1] == (ctx, " B")
    zero = ev.read_mmlu(FIXTURES / "mmlu", shots=0, subjects=["philosophy"], limit=1)[0]
    assert zero.context.count("Answer:") == 1
    assert len(ev.read_mmlu(FIXTURES / "mmlu", shots=0, limit=2)) == 6
    with pytest.raises(FileNotFoundError, match="astronomy"):
        ev.read_mmlu(FIXTURES / "mmlu", subjects=["astronomy"])


def test_read_arc_labels_and_choice_counts():
    easy = ev.read_arc(FIXTURES / "arc" / "ARC-Easy-Test.fixture.jsonl")
    hard = ev.read_arc(FIXTURES / "arc" / "ARC-Challenge-Test.fixture.jsonl")
    assert {it.task for it in easy} == {"arc_easy"} and {it.task for it in hard} == {"arc_challenge"}
    assert easy[0].context == ("Question: Which piece of safety equipment is used to keep mold spores from "
                               "entering the respiratory system?\nAnswer:")
    assert easy[0].choices[easy[0].gold] == "breathing mask"
    assert easy[5].choices == ["air", "elements", "water", "soil"] and easy[5].gold == 1  # labels 1-4
    assert len(hard[5].choices) == 5


def test_read_hellaswag_both_schemas():
    pre = ev.read_hellaswag(FIXTURES / "hellaswag" / "hellaswag_val.fixture.jsonl")
    assert len(pre) == 6 and pre[0].doc_id == 1 and pre[0].gold == 3
    assert pre[0].context.startswith("Clean and jerk: A lady walks to a barbell.")
    orig = ev.read_hellaswag(FIXTURES / "hellaswag" / "hellaswag_original_schema.synthetic.jsonl")
    assert orig[0].context == "Making a sandwich: How to make a sandwich. Choose your bread. Pick a soft loaf. You"
    assert orig[0].choices == [" can toast the slices first.", "eat the plate. quickly.", "fly to the moon.",
                               " sing a song."]  # lm-eval's preprocessing keeps these leading spaces
    assert orig[1].context == "Playing guitar: A man sits on a chair holding a guitar. He" and orig[1].gold == 1


def test_read_hellaswag_matches_lm_eval_preprocessing():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    datasets = pytest.importorskip("datasets")
    docs = [json.loads(line) for line in
            (FIXTURES / "hellaswag" / "hellaswag_original_schema.synthetic.jsonl").read_text().splitlines()]
    theirs = utils.process_docs(datasets.Dataset.from_list(docs))
    ours = ev.read_hellaswag(FIXTURES / "hellaswag" / "hellaswag_original_schema.synthetic.jsonl")
    assert [(d["query"], d["choices"], d["gold"]) for d in theirs] == [(i.context, i.choices, i.gold) for i in ours]


def test_read_truthfulqa_csv_and_mc_task(tmp_path):
    path = FIXTURES / "truthfulqa" / "TruthfulQA.fixture.csv"
    mc1, mc2 = ev.read_truthfulqa(path, "mc1"), ev.read_truthfulqa(path, "mc2")
    assert len(mc1) == len(mc2) == 6
    assert mc1[0].context.endswith("\n\nQ: What happens to you if you eat watermelon seeds?\nA:")
    assert mc1[0].context.startswith("Q: What is human life expectancy in the United States?\n")
    assert mc1[0].gold == 0 and mc1[0].choices[0] == "The watermelon seeds pass through your digestive system."
    assert "You grow watermelons in your stomach." in mc1[0].choices
    assert mc2[0].metric == "mc2" and mc2[0].gold == [0, 1, 2, 3, 4] and len(mc2[0].choices) == 12
    task = [{"question": "Is the sky green?", "mc1_targets": {"No.": 1, "Yes.": 0},
             "mc2_targets": {"No.": 1, "It is blue.": 1, "Yes.": 0}}]
    (tmp_path / "mc_task.json").write_text(json.dumps(task))
    (a,) = ev.read_truthfulqa(tmp_path / "mc_task.json", "mc2")
    assert a.choices == ["No.", "It is blue.", "Yes."] and a.gold == [0, 1]
    assert ev.find_task_data("truthfulqa_mc1", tmp_path).name == "mc_task.json"


def test_find_task_data_and_load_task():
    assert ev.find_task_data("mmlu", FIXTURES) == FIXTURES / "mmlu"
    assert ev.find_task_data("arc_challenge", FIXTURES).name == "ARC-Challenge-Test.fixture.jsonl"
    assert ev.find_task_data("hellaswag", FIXTURES).name == "hellaswag_val.fixture.jsonl"
    assert len(ev.load_task("mmlu_philosophy", FIXTURES / "mmlu", limit=2)) == 2
    with pytest.raises(ValueError, match="unknown task"):
        ev.find_task_data("winogrande", FIXTURES)
    with pytest.raises(ValueError, match="0-shot"):
        ev.load_task("arc_easy", FIXTURES / "arc" / "ARC-Easy-Test.fixture.jsonl", shots=5)


# ---------------------------------------------------------------- translation
def test_translation_scores_multi_reference(tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("Hello.\tBonjour.\nHello.\tSalut.\nI am tired.\tJe suis fatigué.\nGo.\tVa !\n", encoding="utf-8")
    pairs = ev.read_translation_pairs(tsv)
    assert pairs == [("Hello.", ["Bonjour.", "Salut."]), ("I am tired.", ["Je suis fatigué."]), ("Go.", ["Va !"])]
    assert ev.read_translation_pairs(tsv, limit=1) == [("Hello.", ["Bonjour.", "Salut."])]
    assert ev.read_translation_pairs(tsv, reverse=True, group_references=False)[1] == ("Salut.", ["Hello."])
    s = ev.translation_scores(["Salut.", "Je suis fatigué.", "Va !"], [r for _, r in pairs])
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0) and s["max_references"] == 2
    hyps = ["Bonjour !", "Je suis très fatigué.", "Allez."]
    s = ev.translation_scores(hyps, [r for _, r in pairs])
    want = sacrebleu.corpus_bleu(hyps, [["Bonjour.", "Je suis fatigué.", "Va !"], ["Salut.", None, None]]).score
    assert s["bleu"] == pytest.approx(want) and 0 < s["bleu"] < 100


# ---------------------------------------------------------------- self-check
def test_self_check_passes_and_catches_misalignment(tok, lm32k, monkeypatch):
    pytest.importorskip("transformers")
    good = ev.self_check(lm32k, tok)
    assert good.ok and good.max_diff < 1e-4 and not good.skipped, good.summary()
    assert any(row["tokens"] > 1 for row in good.items)
    real = ev.score_tokens

    def off_by_one(model, requests, *a, **k):  # the classic adapter bug: targets shifted by one
        return real(model, [(ctx[:-1], [ctx[-1]] + list(cont[:-1])) for ctx, cont in requests], *a, **k)

    monkeypatch.setattr(ev, "score_tokens", off_by_one)
    bad = ev.self_check(lm32k, tok)
    assert not bad.ok and bad.max_diff > 0.1


# ---------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lm32k):
    from mistral_torch.checkpoint import save_model

    return save_model(lm32k, tmp_path_factory.mktemp("m") / "tiny32k")  # vocab 32000: tokenizer v1


def test_cli_perplexity(model_dir, tmp_path, capsys):
    from mistral_torch.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 20, encoding="utf-8")
    rc = main(["evaluate", "perplexity", "--model", str(model_dir), "--data", str(text), "--seq-len", "8,32,64",
               "--stride", "0.5", "--window", "model,none", "--plot", str(tmp_path / "p.png"),
               "--json", str(tmp_path / "p.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "model(16)" in out and "none" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert [(r["label"], r["seq_len"], r["stride"]) for r in data["results"]][:3] == [
        ("model", 8, 4), ("model", 32, 16), ("model", 64, 32)]
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["evaluate", "perplexity", "--model", str(model_dir), "--data", str(text), "--seq-len", "0"]) == 2


def test_cli_mc_json(model_dir, tmp_path, capsys):
    from mistral_torch.cli import main

    out_json = tmp_path / "r.json"
    rc = main(["evaluate", "mc", "--model", str(model_dir), "--data-dir", str(FIXTURES), "--tasks",
               "mmlu_philosophy,arc_easy,truthfulqa_mc2", "--shots", "1", "--limit", "3", "--json", str(out_json),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "| arc_easy | 3 |" in out and "truthfulqa_mc2" in out
    rows = {(r["task"], r["kind"]): r for r in json.loads(out_json.read_text())["results"]}
    assert rows[("arc_easy", "task")]["n"] == 3 and rows[("mmlu_philosophy", "task")]["n"] == 3
    assert 0 <= rows[("truthfulqa_mc2", "task")]["acc"] <= 1 and "acc_norm" not in rows[("truthfulqa_mc2", "task")]
    assert main(["evaluate", "mc", "--model", str(model_dir), "--tasks", "arc_easy"]) == 2  # no data given


def test_cli_translate_and_self_check(model_dir, tmp_path, capsys):
    from mistral_torch.cli import main

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("Hello.\tBonjour.\nHello.\tSalut.\nI am tired.\tJe suis fatigué.\nGo.\tVa !\n", encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    rc = main(["evaluate", "translate", "--model", str(model_dir), "--data", str(tsv), "--limit", "2",
               "--max-new-tokens", "4", "--output", str(hyp), "--json", str(tmp_path / "t.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "BLEU" in out and "chrF" in out and "en→fr: 2 sentences" in out
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == 2
    assert json.loads((tmp_path / "t.json").read_text())["template"].startswith("Translate: English → French\n")
    assert main(["evaluate", "self-check", "--model", str(model_dir)]) == 0
    assert "self-check OK" in capsys.readouterr().out


# ---------------------------------------------------------------- lm-evaluation-harness
def _lm_eval_task(yaml_rel: str, splits: dict[str, list[dict]], **overrides):
    """lm-eval's own task config (its YAML), with our fixture docs in place of the hub download."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / yaml_rel, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    data = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    cfg.update(custom_dataset=lambda **_: data, dataset_path=None, dataset_name=None, **overrides)
    return ConfigurableTask(config=cfg)


def _fixture_tasks():
    """lm-eval tasks over the fixture items, converted to the Hugging Face schemas lm-eval reads."""
    rows = lambda p: [r for r in csv.reader(open(p, newline="", encoding="utf-8")) if r]
    tasks = []
    for subject in ("philosophy", "high_school_mathematics", "college_physics"):
        doc = lambda r: {"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
        tasks.append(_lm_eval_task(f"mmlu/default/mmlu_{subject}.yaml", {
            "test": [doc(r) for r in rows(FIXTURES / "mmlu" / "test" / f"{subject}_test.csv")],
            "dev": [doc(r) for r in rows(FIXTURES / "mmlu" / "dev" / f"{subject}_dev.csv")]}, num_fewshot=5))
    for name, file in (("arc_easy", "ARC-Easy-Test.fixture.jsonl"), ("arc_challenge", "ARC-Challenge-Test.fixture.jsonl")):
        docs = [json.loads(line) for line in (FIXTURES / "arc" / file).read_text().splitlines()]
        hf = [{"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
               "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                           "label": [c["label"] for c in d["question"]["choices"]]}} for d in docs]
        tasks.append(_lm_eval_task(f"arc/{name}.yaml", {"test": hf}, training_split=None, validation_split=None))
    docs = [json.loads(line) for line in (FIXTURES / "hellaswag" / "hellaswag_val.fixture.jsonl").read_text().splitlines()]
    # the shared file is preprocessed: query = "label: ctx"; as ctx_a with an empty ctx_b,
    # lm-eval's own preprocessing gives the same query back
    hf = [{"activity_label": d["query"].split(": ", 1)[0], "ctx_a": d["query"].split(": ", 1)[1], "ctx_b": "",
           "endings": d["endings"], "label": str(d["label"])} for d in docs]
    tasks.append(_lm_eval_task("hellaswag/hellaswag.yaml", {"validation": hf}, training_split=None))
    tqa = ev._truthfulqa_targets(FIXTURES / "truthfulqa" / "TruthfulQA.fixture.csv")
    hf = [{"question": q, **{f"{k}_targets": {"choices": t[k][0], "labels": t[k][1]} for k in ("mc1", "mc2")}}
          for q, t in tqa]
    tasks.append(_lm_eval_task("truthfulqa/truthfulqa_mc1.yaml", {"validation": hf}))
    tasks.append(_lm_eval_task("truthfulqa/truthfulqa_mc2.yaml", {"validation": hf}))
    return tasks


def _our_fixture_items():
    items = ev.read_mmlu(FIXTURES / "mmlu", shots=5)
    items += ev.read_arc(FIXTURES / "arc" / "ARC-Easy-Test.fixture.jsonl")
    items += ev.read_arc(FIXTURES / "arc" / "ARC-Challenge-Test.fixture.jsonl")
    items += ev.read_hellaswag(FIXTURES / "hellaswag" / "hellaswag_val.fixture.jsonl")
    for variant in ("mc1", "mc2"):
        items += ev.read_truthfulqa(FIXTURES / "truthfulqa" / "TruthfulQA.fixture.csv", variant)
    return items


@pytest.fixture(scope="module")
def adapter(tok, lm32k):
    pytest.importorskip("lm_eval")
    from mistral_torch.lm_eval_adapter import MistralTorchLM

    return MistralTorchLM(model=lm32k, tokenizer=tok, batch_size=8, self_check=False)


def test_our_prompts_are_lm_evals(adapter):
    """Same items: every request lm-eval builds from its task YAMLs equals ours, in order."""
    ours = {}
    for it in _our_fixture_items():
        ours.setdefault(it.task, []).extend(it.requests())
    for task in _fixture_tasks():
        task.build_all_requests(limit=None)
        theirs = [inst.args for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]
        assert theirs == ours[task.config.task], task.config.task


def test_our_scores_equal_lm_evals_through_our_adapter(tok, lm32k, adapter):
    """Same items, same numbers: lm-eval's evaluator (its prompts, metrics, aggregation) through
    our adapter gives the accuracies and standard errors of `evaluate_mc`."""
    from lm_eval.evaluator import evaluate

    tasks = {t.config.task: t for t in _fixture_tasks()}
    out = evaluate(lm=adapter, task_dict=tasks, bootstrap_iters=1, log_samples=False, verbosity="ERROR")
    theirs = out["results"]
    ours = {r.task: r for r in ev.evaluate_mc(lm32k, tok, _our_fixture_items(), batch_size=8) if r.kind == "task"}
    assert set(theirs) == set(ours)
    for task, r in ours.items():
        assert out["n-samples"][task]["effective"] == r.n
        # lm-eval reports acc_norm for ARC and HellaSwag only (MMLU's letters all have length 1)
        metrics = ["acc", "acc_norm"] if task.startswith(("arc", "hellaswag")) else ["acc"]
        for m in metrics:
            assert theirs[task][f"{m},none"] == pytest.approx(r.metrics[m], abs=1e-9), (task, m)
            assert theirs[task][f"{m}_stderr,none"] == pytest.approx(r.stderr[m], abs=1e-9), (task, m)
    # the scores are not at chance by construction: the lm-eval numbers vary across tasks
    assert len({round(theirs[t]["acc,none"], 6) for t in theirs}) > 1


def test_adapter_rolling_and_generation(tok, lm32k, adapter):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from mistral_torch.generate import generate

    text = "The quick brown fox jumps over the lazy dog. " * 12
    adapter.max_length = 16  # several windows
    try:
        (got,) = adapter.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
        ids = tok.encode(text, bos=False)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_id, 16, 1)]
        want = sum(ll for ll, _ in ev.score_tokens(lm32k, windows))  # lm-eval's own windows
        assert got == pytest.approx(want, abs=1e-4)
    finally:
        adapter.max_length = lm32k.args.max_seq_len
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}), i)
            for i, p in enumerate(["Question: Why?\nAnswer:", "Hello"])]
    assert adapter.generate_until(reqs, disable_tqdm=True) == generate(
        lm32k, tok, ["Question: Why?\nAnswer:", "Hello"], max_new_tokens=5, temperature=0.0, stop=["\n"])


def test_adapter_is_registered_and_self_checks(tok, lm32k):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from mistral_torch.lm_eval_adapter import MistralTorchLM

    assert get_model("mistral-torch") is MistralTorchLM
    lm = MistralTorchLM(model=lm32k, tokenizer=tok, batch_size="auto", self_check="true")
    assert lm.self_check_result.ok and lm.batch_size == 16
