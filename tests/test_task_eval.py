"""Task evaluation on the tiny LLaMA: metric keys and ranges, NLL and generation correctness."""

from __future__ import annotations

import math

import pytest
import torch

from adapters_hub import task_eval
from adapters_hub.evaluation import perplexity
from adapters_hub.task_eval import answer_nll, answer_tokens, evaluate_task, generate
from adapters_hub.tasks import load_task

ROWS = [
    {"question": "Tom has 2 apples and buys 3 more. How many apples?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "What is 10 minus 4?", "answer": "10 - 4 = <<10-4=6>>6\n#### 6"},
    {"question": "A box holds 12 eggs. How many eggs are in 3 boxes of that size?",
     "answer": "3 * 12 = <<3*12=36>>36\n#### 36"},
    {"question": "Half of 50?", "answer": "50 / 2 = <<50/2=25>>25\n#### 25"},
    {"question": "1,000 plus 1?", "answer": "1000 + 1 = 1001\n#### 1,001"},
]


@pytest.fixture(scope="module")
def gsm8k():
    return load_task("gsm8k")


def test_gsm8k_metrics_keys_and_ranges(tiny, gsm8k):
    model, tok = tiny
    metrics = evaluate_task(model, tok, gsm8k, ROWS, profile="smoke", progress=False)
    assert set(metrics) == {"accuracy", "answer_found", "answer_nll", "eval_examples"}
    assert 0.0 <= metrics["accuracy"] <= metrics["answer_found"] <= 1.0
    assert math.isfinite(metrics["answer_nll"]) and metrics["answer_nll"] > 0
    assert metrics["eval_examples"] == len(ROWS)
    assert 1 <= len(metrics.samples) <= 3
    sample = metrics.samples[0]
    assert sample.prompt == gsm8k.prompt(ROWS[0]) and sample.target == gsm8k.completion(ROWS[0])
    assert isinstance(sample.output, str)
    assert not model.training


def test_accuracy_counts_exact_final_numbers(tiny, gsm8k, monkeypatch):
    model, tok = tiny
    # stand-in generations: right, right (other wording), wrong number, no marker, right with commas
    outputs = [" so #### 5", " #### 6.0", " #### 35", " 25", " #### 1001"]
    monkeypatch.setattr(task_eval, "generate", lambda *a, **k: outputs)
    metrics = evaluate_task(model, tok, gsm8k, ROWS, profile="smoke", progress=False)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["answer_found"] == pytest.approx(4 / 5)


def _direct_nll(model, tok, prompt, completion):
    """Sum and count of answer-token NLLs for one example, no batching, no padding."""
    ids, first = answer_tokens(tok, prompt, completion)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids))), len(ids) - first


def test_answer_nll_equals_direct_computation(tiny, gsm8k):
    model, tok = tiny
    prompts = [gsm8k.prompt(r) for r in ROWS]
    completions = [gsm8k.completion(r) for r in ROWS]
    # batch of 3 over rows of different lengths: padding must not change anything
    batched = answer_nll(model, tok, prompts, completions, batch_size=3, progress=False)
    parts = [_direct_nll(model, tok, p, c) for p, c in zip(prompts, completions)]
    direct = sum(s for s, _ in parts) / sum(n for _, n in parts)
    assert batched == pytest.approx(direct, rel=1e-5)


def test_answer_tokens_are_the_completion(tiny):
    _, tok = tiny
    ids, first = answer_tokens(tok, "Question: 1+1?\nAnswer:", " 2\n#### 2")
    assert tok.decode(ids[first:]) == " 2\n#### 2"


def test_left_padded_batch_generates_like_one_by_one(tiny):
    model, tok = tiny
    prompts = ["Question: short?\nAnswer:", "Question: a much longer question with more words?\nAnswer:", "Q"]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_wikitext_perplexity(tiny):
    model, tok = tiny
    spec = load_task("wikitext2")
    profile = spec.profile("smoke")
    rows = [{"text": " = Heading = \n" + "The quick brown fox jumps over the lazy dog . " * 15 + "\n"}] * 2
    metrics = evaluate_task(model, tok, spec, rows, profile=profile, progress=False)
    assert set(metrics) == {"perplexity", "eval_tokens"}
    n_blocks = int(metrics["eval_tokens"]) // profile.max_seq_len
    ids = tok("".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: n_blocks * profile.max_seq_len]).view(n_blocks, -1)
    assert metrics["perplexity"] == pytest.approx(perplexity(model, blocks, progress=False), rel=1e-5)
    assert 1.0 < metrics["perplexity"] < 2 * tok.vocab_size  # a random model: about uniform, not worse
    assert metrics.samples and metrics.samples[0].prompt


def test_no_rows_is_an_error(tiny, gsm8k):
    with pytest.raises(ValueError, match="no rows"):
        evaluate_task(*tiny, gsm8k, [], profile="smoke", progress=False)
