"""DropPlan / DropConfig: validation, JSON, hash, and what one-shot, joint and iterative pick.
Pure Python (no model)."""

from __future__ import annotations

import json

import pytest

from adapters_hub.drop.plan import DropConfig, DropPlan


# -- validation: errors name the field ------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, words", [
    ({"attn": (-1,)}, "DropPlan.attn", "out of range"),
    ({"attn": (6,)}, "DropPlan.attn", "out of range"),
    ({"attn": (2, 2)}, "DropPlan.attn", "duplicate"),
    ({"attn": (1.0,)}, "DropPlan.attn", "ints"),
    ({"target": "heads"}, "DropPlan.target", "unknown"),
    ({"method": "greedy"}, "DropPlan.method", "unknown"),
    ({"mlp": (1,)}, "DropPlan.mlp", "target 'attn'"),          # default target is attn
    ({"target": "joint", "block": (1,)}, "DropPlan.block", "target 'joint'"),
    ({"attn": (1, 2), "order": (("attn", 1),)}, "DropPlan.order", "not an ordering"),
])
def test_plan_validation_names_the_field(kwargs, field, words):
    with pytest.raises(ValueError) as err:
        DropPlan(6, **kwargs)
    assert field in str(err.value) and words in str(err.value)


def test_plan_num_layers_validated():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="DropPlan.num_layers"):
            DropPlan(bad)


def test_top_n_n_larger_than_layers():
    with pytest.raises(ValueError, match=r"n: 7 is larger than the 6 attn layers"):
        DropPlan.top_n([0.1] * 6, n=7, target="attn")
    with pytest.raises(ValueError, match=r"n: 13 is larger than the 12 attention \+ MLP"):
        DropPlan.top_n({"attn": [0.1] * 6, "mlp": [0.2] * 6}, n=13, target="joint")
    with pytest.raises(ValueError, match="n: must be a non-negative int"):
        DropPlan.top_n([0.1] * 6, n=-1)
    with pytest.raises(ValueError, match="unknown target"):
        DropPlan.top_n([0.1] * 6, n=1, target="heads")
    with pytest.raises(ValueError, match="n: 7 is larger"):
        DropPlan.iterative(lambda plan: {"attn": [0.0] * 6}, n=7, num_layers=6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="DropConfig.target"):
        DropConfig(target="heads")
    with pytest.raises(ValueError, match="DropConfig.n:"):
        DropConfig(n=-1)
    with pytest.raises(ValueError, match="DropConfig.block_len"):
        DropConfig(block_len=0)
    with pytest.raises(ValueError, match="DropConfig: unknown field"):
        DropConfig.from_dict({"tagret": "attn"})
    cfg = DropConfig(target="joint", n=3, iterative=True, skip_tokens=8192)
    assert DropConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# -- serialisation ------------------------------------------------------------------------------

def test_json_round_trip_and_stable_hash():
    plan = DropPlan(30, "joint", attn=(29, 25), mlp=(3,), method="iterative",
                    order=(("attn", 29), ("mlp", 3), ("attn", 25)))
    back = DropPlan.from_json(plan.to_json())
    assert back == plan and back.order == plan.order and back.attn == (25, 29)
    assert back.hash() == plan.hash()
    # The hash is of what is dropped: construction order and method do not matter ...
    assert DropPlan(30, "joint", attn=(25, 29), mlp=(3,)).hash() == plan.hash()
    # ... but every dropped module does, and the layer count.
    assert DropPlan(30, "joint", attn=(25, 29), mlp=(4,)).hash() != plan.hash()
    assert DropPlan(31, "joint", attn=(25, 29), mlp=(3,)).hash() != plan.hash()
    # Stable across processes and versions (a literal, so a changed recipe is noticed).
    assert DropPlan(6, attn=(4, 5)).hash() == "9f0aab30dda91418"


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown field"):
        DropPlan.from_dict({"num_layers": 6, "atn": [1]})
    with pytest.raises(ValueError, match="DropPlan.num_layers: missing"):
        DropPlan.from_dict({"attn": [1]})
    with pytest.raises(ValueError, match="DropPlan.version"):
        DropPlan.from_dict({"num_layers": 6, "version": 99})


# -- what the plans pick ------------------------------------------------------------------------

def test_one_shot_drops_the_n_least_important():
    scores = [0.9, 0.05, 0.3, 0.01, 0.2, 0.02]
    plan = DropPlan.top_n(scores, n=3, target="attn")
    assert plan.attn == (1, 3, 5) and plan.method == "one_shot"
    assert [layer for _, layer in plan.order] == [3, 5, 1]  # least important first
    assert DropPlan.top_n(scores, n=0).attn == ()


def test_joint_ranks_attention_and_mlp_in_one_list():
    # The 3 least important modules overall: mlp 0 (0.01), attn 4 (0.02), mlp 5 (0.03).
    # Per-kind rankings would instead take some of each kind in fixed numbers.
    scores = {"attn": [0.5, 0.4, 0.3, 0.2, 0.02, 0.6], "mlp": [0.01, 0.9, 0.8, 0.7, 0.6, 0.03]}
    plan = DropPlan.top_n(scores, n=3, target="joint")
    assert plan.attn == (4,) and plan.mlp == (0, 5) and plan.block == ()
    assert plan.order == (("mlp", 0), ("attn", 4), ("mlp", 5))
    with pytest.raises(ValueError, match="joint"):
        DropPlan.top_n([0.1] * 6, n=1, target="joint")


def test_iterative_re_measures_between_drops():
    # Base scores rank layers 3 < 4 < 1. Once 3 is dropped, layer 4 becomes important
    # (it was compensating for 3), so the iterative method takes 1 next; one-shot takes 4.
    base = [0.9, 0.3, 0.8, 0.01, 0.02, 0.7]
    calls = []

    def score_fn(plan):
        calls.append(plan.attn)
        scores = list(base)
        if 3 in plan.attn:
            scores[4] = 0.95
        for i in plan.attn:  # a dropped module measures 0, as module_importance reports
            scores[i] = 0.0
        return {"attn": scores}

    plan = DropPlan.iterative(score_fn, n=2, target="attn", num_layers=6)
    assert plan.attn == (1, 3) and plan.method == "iterative"
    assert plan.order == (("attn", 3), ("attn", 1))
    assert calls == [(), (3,)]  # measured on the empty plan, then on the plan with 3 dropped
    assert DropPlan.top_n(base, n=2).attn == (3, 4)


def test_iterative_joint_and_block_targets():
    def score_fn(plan):
        return {"attn": [0.5, 0.1, 0.5, 0.5], "mlp": [0.5, 0.5, 0.05, 0.5], "block": [0.9, 0.2, 0.3, 0.01]}

    joint = DropPlan.iterative(score_fn, n=2, target="joint", num_layers=4)
    assert joint.mlp == (2,) and joint.attn == (1,)
    block = DropPlan.iterative(score_fn, n=2, target="block", num_layers=4)
    assert block.block == (1, 3)
    with pytest.raises(ValueError, match="score_fn: attn scores have 3 values"):
        DropPlan.iterative(lambda p: {"attn": [0.1] * 3}, n=1, num_layers=4)
