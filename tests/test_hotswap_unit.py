"""Hot-swap pool on the tiny LLaMA with local adapter folders (no services; the registry
path is covered end to end in test_e2e.py)."""

from __future__ import annotations

import pytest
import torch

from adapters_hub.backbone import load_lisa_model
from adapters_hub.lisa import AdapterMismatchError, SharingPlan
from sdk.hotswap import Backbone

PROMPTS = ["Question: 2+3?\nAnswer:", "Hi", "The cat sat on the"]


def _folders(tmp_path, plan, n=2):
    """Save `n` adapters with distinct non-trivial weights for `plan`; return their folders."""
    lm, _ = load_lisa_model("tiny-llama", plan)
    folders = []
    for i in range(n):
        name = f"task{i}"
        lm.add_adapter(name, next(iter(lm.peft_config.values())))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for t in lm.adapter_state_dict(name).values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        folders.append(str(lm.save_adapter(tmp_path / name, name)))
    return folders


@pytest.fixture()
def setup(tiny, tmp_path):
    plan = SharingPlan.for_model(tiny[0], [2, 3, 5])
    folders = _folders(tmp_path, plan)
    bb = Backbone(*load_lisa_model("tiny-llama", plan), base_model="tiny-llama", max_resident=2)
    bb.tokenizer.padding_side = "left"
    return bb, folders, plan


def _alone(plan, folder):
    solo = Backbone(*load_lisa_model("tiny-llama", plan), base_model="tiny-llama")
    solo.tokenizer.padding_side = "left"
    solo.use(folder)
    return solo.generate(PROMPTS, max_new_tokens=6)


def test_swap_matches_each_adapter_loaded_alone_and_back(setup):
    bb, (a, b), plan = setup
    bb.use(a)
    out_a = bb.generate(PROMPTS, max_new_tokens=6)
    out_b = bb.generate(PROMPTS, adapter=b, max_new_tokens=6)
    assert out_a != out_b  # the two adapters really differ
    assert out_a == _alone(plan, a) and out_b == _alone(plan, b)
    assert bb.generate(PROMPTS, adapter=a, max_new_tokens=6) == out_a  # A -> B -> A is exact


def test_mixed_batch_equals_per_adapter_runs(setup):
    bb, (a, b), _ = setup
    mixed = bb.generate(PROMPTS, adapter=[a, b, a], max_new_tokens=6)
    assert mixed[0] == bb.generate(PROMPTS[0], adapter=a, max_new_tokens=6)
    assert mixed[1] == bb.generate(PROMPTS[1], adapter=b, max_new_tokens=6)
    assert mixed[2] == bb.generate(PROMPTS[2], adapter=a, max_new_tokens=6)
    with pytest.raises(ValueError, match="2 adapters for 3 prompts"):
        bb.generate(PROMPTS, adapter=[a, b])


def test_pool_is_bounded_and_evicts_the_least_recently_used(setup, tmp_path):
    bb, (a, b), plan = setup
    (c,) = _folders(tmp_path / "more", plan, n=1)
    bb.use(a), bb.use(b)
    assert len(bb.resident) == 2
    bb.use(c)  # a is the least recently used: evicted, and its tensors leave the model
    assert bb.resident == [b, c] and bb.active.key == c
    assert len([n for n in bb.lm.peft_config if n.startswith("a_")]) == 2
    bb.use(b)  # touching b makes c the least recently used: loading a again evicts c
    bb.use(a)
    assert bb.resident == [b, a]


def test_a_pool_of_one_swaps_and_a_mixed_batch_may_exceed_the_pool(setup, tmp_path):
    bb, (a, b), plan = setup
    (c,) = _folders(tmp_path / "more", plan, n=1)
    bb.max_resident = 1
    bb.use(a)
    bb.use(b)  # loading b must not evict b itself, nor a while a is still active
    assert bb.resident == [b] and bb.active.key == b
    assert bb.generate(PROMPTS, max_new_tokens=6) == _alone(plan, b)
    # three adapters in one batch with a pool of one: none is evicted before the batch runs
    mixed = bb.generate(PROMPTS, adapter=[a, c, a], max_new_tokens=6)
    assert mixed[1] == _alone(plan, c)[1] and mixed[2] == _alone(plan, a)[2]
    assert bb.active.key == b and b in bb.resident  # the active adapter stayed
    bb.use(c)  # the next swap brings the pool back to its bound
    assert bb.resident == [c]
    bb.use(a)  # comes back from its folder, same outputs as ever
    assert bb.generate(PROMPTS, max_new_tokens=6) == _alone(plan, a)


def test_adapter_for_another_plan_is_refused_and_active_stays(setup, tiny, tmp_path):
    bb, (a, _), _ = setup
    bb.use(a)
    before = bb.generate(PROMPTS, max_new_tokens=6)
    other = SharingPlan.for_model(tiny[0], [3, 4])
    (foreign,) = _folders(tmp_path / "other", other, n=1)
    with pytest.raises(AdapterMismatchError, match="plan"):
        bb.use(foreign)
    assert bb.active.key == a
    assert bb.generate(PROMPTS, max_new_tokens=6) == before
    assert len(bb.resident) == 1
