"""The serving engine (sdk/engine.py) without Ray: requests for several adapters batched
together give what each gives alone; overload, time-out and bad requests are answered
without disturbing the others. Tiny LLaMA, adapters in local folders.

    .venv/bin/python -m pytest -q tests/test_engine_unit.py
"""

from __future__ import annotations

import asyncio
import time

import pytest

from adapters_hub.backbone import load_lisa_model
from adapters_hub.lisa import SharingPlan
from sdk import openai_api as api
from sdk.engine import Engine
from sdk.hotswap import Backbone
from tests.test_hotswap_unit import _folders

PROMPTS = ["Question: 2+3?\nAnswer:", "Hi", "The cat sat on the", "Once upon a time"]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    plan = SharingPlan.for_model(tiny[0], [2, 3, 5])
    tmp = tmp_path_factory.mktemp("adapters")
    a, b = _folders(tmp, plan)
    (foreign,) = _folders(tmp / "other", SharingPlan.for_model(tiny[0], [3, 4]), n=1)
    return plan, a, b, foreign


def _engine(plan, *, allow=True, **limits):
    bb = Backbone(*load_lisa_model("tiny-llama", plan), base_model="tiny-llama", max_resident=4,
                  allow_local_folders=allow)
    bb.tokenizer.padding_side = "left"
    return Engine(backbone=bb, limits=api.Limits(**{"batch_wait_s": 0.02, **limits}))


def _params(model, prompt, max_tokens=8, **kw):
    return api.parse_completion({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                 "ignore_eos": max_tokens > 100,  # long ones must run until stopped
                                 **kw}, api.Limits(max_tokens=1000))


async def _text(engine, model, prompt, max_tokens=8, **kw):
    job = await engine.submit(params=_params(model, prompt, max_tokens, **kw))
    await engine.result(job)
    return [r.text for r in job.rows]


def test_concurrent_requests_for_two_adapters_are_one_batch_and_equal_each_alone(setup):
    plan, a, b, _ = setup
    engine = _engine(plan)
    models = [a, b, a, b, "tiny-llama"]
    prompts = PROMPTS + ["x"]

    async def main():
        alone = [await _text(engine, m, p) for m, p in zip(models, prompts)]
        assert engine.stats["largest_batch"] == 1
        together = await asyncio.gather(*(_text(engine, m, p) for m, p in zip(models, prompts)))
        return alone, together
    alone, together = asyncio.run(main())
    assert together == alone
    assert engine.stats["largest_batch"] == 5  # all five in one mixed-adapter batch
    reference = engine.bb.generate(PROMPTS, adapter=[a, b, a, b], max_new_tokens=8)
    assert [t[0] for t in alone[:4]] == reference
    assert alone[0] != alone[4]  # the bare backbone differs from adapter a


def test_full_queue_answers_503_before_any_work(setup):
    plan, a, _, _ = setup
    engine = _engine(plan, max_queue=1, max_batch_size=1, max_tokens=1000)

    async def main():
        running = await engine.submit(params=_params(a, "Hi", 300))
        while engine.stats["running_rows"] == 0:
            await asyncio.sleep(0.01)
        waiting = await engine.submit(params=_params(a, "Hi", 2))
        with pytest.raises(api.ApiError) as info:
            await engine.submit(params=_params(a, "Hi", 2))
        running.cancelled = True
        await engine.result(running)
        await engine.result(waiting)
        return info.value, running, waiting
    err, running, waiting = asyncio.run(main())
    assert err.status == 503 and err.body()["error"]["code"] == "overloaded"
    assert len(waiting.rows[0].tokens) == 2
    assert len(running.rows[0].tokens) < 300  # cancelling (client gone) stopped it


def test_time_out_stops_the_generation_and_the_next_request_runs(setup):
    plan, a, _, _ = setup
    engine = _engine(plan, timeout_s=0.3, max_tokens=1000)

    async def main():
        start = time.monotonic()
        job = await engine.submit(params=_params(a, "Hi", 1000))
        with pytest.raises(api.ApiError) as info:
            await engine.result(job)
        took = time.monotonic() - start
        assert engine.stats["running_rows"] == 0  # nothing still generates for it
        steps = engine.stats["steps"]
        assert await _text(engine, a, "Hi", 3)  # the next request is served at once
        return info.value, took, job, engine.stats["steps"] - steps
    err, took, job, next_steps = asyncio.run(main())
    assert err.status == 504 and err.body()["error"]["type"] == "timeout_error"
    assert took < 2.0 and len(job.rows[0].tokens) < 1000
    assert next_steps == 3


def test_a_bad_adapter_in_a_batch_fails_alone(setup):
    plan, a, b, foreign = setup
    engine = _engine(plan)

    async def one(model, prompt):
        try:
            return await _text(engine, model, prompt)
        except api.ApiError as err:
            return err

    async def main():
        return await asyncio.gather(one(a, PROMPTS[0]), one(foreign, PROMPTS[1]), one(b, PROMPTS[2]))
    good_a, bad, good_b = asyncio.run(main())
    assert isinstance(bad, api.ApiError) and bad.status == 400 and bad.param == "model"
    assert [good_a[0], good_b[0]] == engine.bb.generate([PROMPTS[0], PROMPTS[2]], adapter=[a, b], max_new_tokens=8)


def test_folders_refused_without_the_operator_option_and_no_existence_hint(setup, tmp_path):
    plan, a, _, _ = setup
    engine = _engine(plan, allow=False)

    async def status(model):
        try:
            await engine.submit(params=_params(model, "Hi"))
        except api.ApiError as err:
            return err.status, err.message.replace(repr(model), "M")
        return 200, ""
    existing, missing = asyncio.run(status(a)), asyncio.run(status(str(tmp_path / "nope")))
    assert existing[0] == 404 and existing == missing
    assert asyncio.run(status("../" + a)) == existing


def test_prompt_over_the_token_cap_is_refused_before_queueing(setup):
    plan, a, _, _ = setup
    engine = _engine(plan, max_prompt_tokens=50)

    async def main():
        with pytest.raises(api.ApiError) as info:
            await engine.submit(params=_params(a, "y" * 51))
        return info.value
    err = asyncio.run(main())
    assert err.status == 400 and err.code == "context_length_exceeded" and engine.stats["batches"] == 0


def test_a_request_joins_a_running_batch_and_leaves_before_it(setup):
    plan, a, b, _ = setup
    engine = _engine(plan, max_tokens=1000)

    async def main():
        alone = await _text(engine, b, PROMPTS[2], 5)
        long = await engine.submit(params=_params(a, "Hi", 600))
        while engine.stats["running_rows"] == 0:
            await asyncio.sleep(0.005)
        short = await _text(engine, b, PROMPTS[2], 5)  # continuous batching: no wait for the long one
        still_running = long.open_rows
        long.cancelled = True
        await engine.result(long)
        return alone, short, still_running
    alone, short, still_running = asyncio.run(main())
    assert short == alone and still_running == 1
    assert engine.stats["largest_batch"] == 2


def test_pinned_adapters_are_never_evicted_and_loads_are_reported(setup, tmp_path):
    plan, a, b, _ = setup
    (c,) = _folders(tmp_path, plan, n=1)
    bb = Backbone(*load_lisa_model("tiny-llama", plan), base_model="tiny-llama", max_resident=1)
    events = []
    bb.on_event = lambda event, key: events.append((event, key))
    key_a = bb.pin(a)
    bb.use(b)
    bb.use(c)  # a pool of one: b goes, the pinned a stays
    assert key_a in bb.resident and bb.pinned == {key_a}
    assert ("evict", key_a) not in events and ("evict", bb._resolve(b)[1]) in events
    assert [e for e, _ in events].count("load") == 3


def test_a_registry_that_does_not_answer_is_a_503_not_a_404(setup):
    plan, *_ = setup
    engine = _engine(plan, allow=False)
    engine.bb.tracking_uri = "http://127.0.0.1:1"  # nothing listens there

    async def main():
        with pytest.raises(api.ApiError) as info:
            await engine.submit(params=_params("gsm8k-lisa@champion", "Hi"))
        return info.value
    err = asyncio.run(main())
    assert err.status == 503 and err.code == "registry_unavailable"


def test_a_lora_adapter_is_served_in_the_mixed_batch_and_changes_no_other_rows_answer(setup, tmp_path):
    """A request naming a lora adapter decodes in the same batch as lisa rows; its answer is
    what `Backbone.use` gives alone, and the lisa rows answer as they did before it loaded
    (the old engine activated a LoRA for every row of the replica)."""
    import torch

    from adapters_hub.kinds import get_kind

    plan, a, _, _ = setup
    lm, _ = load_lisa_model("tiny-llama", plan)
    lora = get_kind("lora")
    lora.add(lm, "sneaky", {})
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a LoRA that would change every answer
    folder = lora.save(lm, "sneaky", tmp_path / "sneaky")
    engine = _engine(plan)

    async def main():
        before = await _text(engine, a, "The cat sat on the")
        together = await asyncio.gather(_text(engine, a, "The cat sat on the"), _text(engine, str(folder), "Hi"),
                                        _text(engine, a, "The cat sat on the"))
        return before, together
    before, (lisa_row, lora_row, lisa_again) = asyncio.run(main())
    assert lisa_row == before and lisa_again == before
    assert engine.stats["largest_batch"] == 3
    assert len(engine.bb.resident) == 2
    engine.bb.use(str(folder))
    assert engine.bb.generate("Hi", max_new_tokens=8) == lora_row[0]
    assert lora_row[0] != engine.bb.generate("Hi", adapter=[a], max_new_tokens=8)[0]


def test_an_adapter_of_a_kind_that_cannot_batch_is_refused_before_it_loads(setup, tmp_path):
    """attn_drop changes the model's structure for every row: the kind is read from the
    folder first, the request is a 400 `unsupported_kind`, nothing becomes resident."""
    import json

    plan, a, _, _ = setup
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"kind": "attn_drop", "base_fingerprint": "x"}))
    engine = _engine(plan)

    async def main():
        before = await _text(engine, a, "The cat sat on the")
        resident = list(engine.bb.resident)
        job = await engine.submit(params=_params(str(folder), "Hi"))
        with pytest.raises(api.ApiError) as err:
            await engine.result(job)
        assert err.value.status == 400 and err.value.code == "unsupported_kind"
        assert engine.bb.resident == resident
        return before, await _text(engine, a, "The cat sat on the")
    before, after = asyncio.run(main())
    assert after == before
    with pytest.raises(ValueError, match="mixed batches take lisa, lora adapters only"):
        engine.bb.generate(["x", "y"], adapter=[a, str(folder)])


def test_the_dense_backbone_serves_several_lora_adapters_in_one_batch(tiny, tmp_path):
    """`Backbone.load(attention="dense")`: the multi-LoRA baseline server. Two LoRA adapters
    of the unmodified base decode in one batch and each row equals its adapter alone."""
    import torch

    from adapters_hub.backbone import dense_plan
    from adapters_hub.kinds import get_kind

    lm, _ = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    lora, folders = get_kind("lora"), []
    for i, name in enumerate(("x", "y")):
        lora.add(lm, name, {"target_modules": ["q_proj", "v_proj", "down_proj"]})
        with torch.no_grad():
            for n, p in lm.named_parameters():
                if f"lora_B.{name}." in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        folders.append(str(lora.save(lm, name, tmp_path / name)))
    bb = Backbone.load(base_model="tiny-llama", attention="dense")
    engine = Engine(backbone=bb, limits=api.Limits(batch_wait_s=0.02))
    models = [folders[0], folders[1], "tiny-llama", folders[0]]

    async def main():
        alone = [await _text(engine, m, p) for m, p in zip(models, PROMPTS)]
        together = await asyncio.gather(*(_text(engine, m, p) for m, p in zip(models, PROMPTS)))
        return alone, together, await _text(engine, "tiny-llama", PROMPTS[0])
    alone, together, bare = asyncio.run(main())
    assert together == alone and engine.stats["largest_batch"] == 4
    assert alone[0] != bare  # the LoRA update really applies to its rows
    assert engine.bb.generate(PROMPTS[:2], adapter=folders[:2], max_new_tokens=8) == [alone[0][0], alone[1][0]]
    with pytest.raises(ValueError, match="plan_path"):
        Backbone.load(base_model="tiny-llama", attention="dense", plan_path="plan.json")


def test_an_engine_whose_model_thread_died_is_unhealthy(setup, monkeypatch):
    """The replica's health check reads `Engine.healthy`: it turns false when the worker
    thread ends (an error that escapes the batch loop), so Serve restarts the replica."""
    import sdk.decode

    engine = _engine(setup[0])
    assert engine.healthy  # not started yet
    engine.start()
    assert engine.healthy

    def die(self):
        raise SystemExit("model thread gone")

    monkeypatch.setattr(sdk.decode.Decoder, "step", die)

    async def go():
        await engine.submit(params=_params("tiny-llama", "Hi"))
        for _ in range(200):
            if not engine.healthy:
                return
            await asyncio.sleep(0.02)

    asyncio.run(go())
    assert not engine.healthy
