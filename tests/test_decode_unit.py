"""The serving decode loop (sdk/decode.py) on the tiny LLaMA: greedy rows equal the plain
reference (`Backbone.generate`, HF generate), rows finish independently, streamed pieces
join to the final text, sampling is seeded.

    .venv/bin/python -m pytest -q tests/test_decode_unit.py
"""

from __future__ import annotations

import time

import pytest

from adapters_hub.backbone import load_lisa_model
from adapters_hub.lisa import SharingPlan
from sdk.decode import Decoder, Row, decode_rows
from sdk.hotswap import Backbone
from tests.test_hotswap_unit import _folders

PROMPTS = ["Question: 2+3?\nAnswer:", "Hi", "The cat sat on the", "A much longer prompt, longer than the others", "x"]


PLANS = {"shared": {"layers": [2, 3, 5]},
         "hybrid": {"layers": [2, 4, 5], "dropped": [3]}}  # 4 shares 2's attention past dropped 3


@pytest.fixture(scope="module", params=sorted(PLANS))
def served(tiny, tmp_path_factory, request):
    plan = SharingPlan.for_model(tiny[0], **PLANS[request.param])
    a, b = _folders(tmp_path_factory.mktemp("adapters"), plan)
    bb = Backbone(*load_lisa_model("tiny-llama", plan), base_model="tiny-llama", max_resident=4)
    bb.tokenizer.padding_side = "left"
    names = {ref: bb._ensure_resident(ref)[2] for ref in (a, b)}
    return bb, a, b, names


def _rows(bb, prompts, names, max_new, **kw):
    return [Row(prompt_ids=bb.tokenizer(p).input_ids, adapter_name=n, max_new_tokens=m, **kw)
            for p, n, m in zip(prompts, names, max_new)]


def test_greedy_mixed_batch_equals_backbone_generate(served):
    bb, a, b, names = served
    refs = [a, b, a, b, a]
    reference = bb.generate(PROMPTS, adapter=refs, max_new_tokens=10)
    rows = decode_rows(bb.lm, bb.tokenizer, _rows(bb, PROMPTS, [names[r] for r in refs], [10] * 5))
    assert [r.text for r in rows] == reference
    assert reference[0] != bb.generate(PROMPTS[0], adapter=b, max_new_tokens=10)  # the adapters really differ
    assert all(r.finish_reason == "length" and len(r.tokens) == 10 for r in rows)


def test_rows_leaving_early_do_not_change_the_others(served):
    bb, a, b, names = served
    refs = [b, a, b, a, b]
    full = decode_rows(bb.lm, bb.tokenizer, _rows(bb, PROMPTS, [names[r] for r in refs], [10] * 5))
    assert [r.text for r in full] == bb.generate(PROMPTS, adapter=refs, max_new_tokens=10)
    budgets = [2, 10, 5, 1, 10]
    rows = decode_rows(bb.lm, bb.tokenizer, _rows(bb, PROMPTS, [names[r] for r in refs], budgets))
    assert [len(r.tokens) for r in rows] == budgets
    assert [r.tokens for r in rows] == [f.tokens[:m] for f, m in zip(full, budgets)]


def test_stop_string_cuts_and_streamed_pieces_join_to_the_text(served):
    bb, a, _, names = served
    (text,) = bb.generate([PROMPTS[2]], adapter=[a], max_new_tokens=12)
    stop = text[5:7]
    pieces = []
    (row,) = decode_rows(bb.lm, bb.tokenizer, _rows(bb, [PROMPTS[2]], [names[a]], [12], stop=(stop,),
                                                    on_delta=lambda r, t: pieces.append(t)))
    assert row.finish_reason == "stop" and row.text == text[:text.find(stop)]
    assert "".join(pieces) == row.text
    pieces.clear()
    (row,) = decode_rows(bb.lm, bb.tokenizer, _rows(bb, [PROMPTS[2]], [names[a]], [12],
                                                    on_delta=lambda r, t: pieces.append(t)))
    assert "".join(pieces) == row.text == text


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(served):
    bb, a, _, names = served
    greedy = bb.generate(PROMPTS[:2], adapter=[a, a], max_new_tokens=10)
    run = lambda **kw: [r.text for r in decode_rows(bb.lm, bb.tokenizer, _rows(  # noqa: E731
        bb, PROMPTS[:2], [names[a]] * 2, [10, 10], **kw))]
    hot = run(temperature=2.0, seed=7)
    assert hot == run(temperature=2.0, seed=7) and hot != run(temperature=2.0, seed=8)
    assert hot != greedy
    assert run(temperature=1.0, top_p=1e-9, seed=3) == greedy  # only the top token survives


def test_deadline_and_cancel_stop_a_row_and_leave_the_other(served):
    bb, a, b, names = served
    rows = _rows(bb, PROMPTS[:3], [names[a], names[b], names[a]], [400, 20, 400])
    rows[0].deadline = time.monotonic() + 0.05
    calls = {"n": 0}

    def cancel_after_three():
        calls["n"] += 1
        return calls["n"] > 3
    rows[2].cancelled = cancel_after_three
    decode_rows(bb.lm, bb.tokenizer, rows)
    assert rows[0].finish_reason == "timeout" and len(rows[0].tokens) < 400
    assert rows[2].finish_reason == "cancelled" and len(rows[2].tokens) == 3
    assert rows[1].text == bb.generate(PROMPTS[1], adapter=b, max_new_tokens=20)


def test_rows_joining_between_steps_get_what_they_get_in_one_static_batch(served):
    bb, a, b, names = served
    refs = [a, b, b, a, a]
    static = decode_rows(bb.lm, bb.tokenizer, _rows(bb, PROMPTS, [names[r] for r in refs], [10] * 5))
    assert [r.text for r in static] == bb.generate(PROMPTS, adapter=refs, max_new_tokens=10)
    budgets = [3, 10, 10, 4, 10]
    rows = _rows(bb, PROMPTS, [names[r] for r in refs], budgets)
    dec = Decoder(bb.lm, bb.tokenizer)
    dec.add(rows[:2])        # a short and a long prompt start
    for _ in range(4):       # row 0 (3 tokens) leaves on the way; the padding it needed is cut
        dec.step()
    assert dec.live == 1
    dec.add(rows[2:4])       # two newcomers join a row that is 5 tokens in
    dec.step()
    dec.add(rows[4:])        # the longest prompt joins last
    while dec.live:
        dec.step()
    assert [len(r.tokens) for r in rows] == budgets
    assert [r.tokens for r in rows] == [s.tokens[:m] for s, m in zip(static, budgets)]


def test_logprobs_and_echo_equal_a_plain_forward_of_prompt_and_completion(served):
    import torch

    bb, a, b, names = served
    refs = [a, b, a]
    rows = decode_rows(bb.lm, bb.tokenizer, _rows(bb, PROMPTS[:3], [names[r] for r in refs], [4, 0, 3],
                                                  logprobs=3, echo=True))
    assert rows[1].tokens == [] and rows[1].finish_reason == "length"  # max_tokens 0: the prompt only
    for row, ref in zip(rows, refs):
        ids = row.prompt_ids + row.tokens
        with torch.no_grad(), bb.lm.adapter_per_row([names[ref]]):
            logp = torch.log_softmax(bb.lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
        plain = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
        ours = row.prompt_logprobs + row.token_logprobs
        assert ours[0] is None and len(ours) == len(ids)
        assert ours[1:] == pytest.approx(plain, abs=1e-4)
        for t, top in enumerate((row.prompt_top + row.top_logprobs)[1:], start=1):
            best = logp[t - 1].topk(3)
            assert list(top) == best.indices.tolist() and list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        if row.tokens:  # greedy: each generated token is its position's most likely one
            assert all(tok == next(iter(top)) for tok, top in zip(row.tokens, row.top_logprobs))
