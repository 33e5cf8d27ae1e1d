"""SharingPlan and LisaConfig: validation names the field, JSON round trip, stable hash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapters_hub.lisa.config import LisaConfig, LisaConfigError
from adapters_hub.lisa.plan import PlanError, SharedLayer, SharingPlan, default_rank


def plan(**kw):
    args = dict(num_layers=8, num_heads=4, head_dim=16, layers=[3, 4, 6], perms={4: [1, 0, 3, 2]})
    args.update(kw)
    return SharingPlan.explicit(**args)


def test_default_rank_is_floor_of_head_dim_over_6():
    assert default_rank(64) == 10 and 64 / default_rank(64) >= 6
    assert default_rank(128) == 21 and 128 / default_rank(128) >= 6
    assert default_rank(16) == 2 and default_rank(4) == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(layers=[0, 3]), "shared[0].layer"),
        (dict(layers=[3, 8]), "shared[1].layer"),
        (dict(layers=[3, 3]), "shared[1].layer"),
        (dict(layers=[3], rank=0), "shared[0].rank"),
        (dict(layers=[3], rank=16), "shared[0].rank"),
        (dict(layers=[3], donors={3: 3}), "shared[0].donor"),
        (dict(layers=[3], perms={3: [0, 0, 1, 2]}), "shared[0].perm"),
        (dict(head_dim=0, layers=[]), "head_dim"),
    ],
)
def test_invalid_plans_name_the_field(kwargs, field):
    with pytest.raises(PlanError) as err:
        plan(**kwargs)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_json_round_trip_and_stable_hash(tmp_path):
    p = plan(meta={"note": "x"})
    q = SharingPlan.load(p.save(tmp_path / "plan.json"))
    assert q == p and q.hash == p.hash and q.meta == {"note": "x"}
    # The hash is a pure function of content: fixed value, independent of order and meta.
    shuffled = SharingPlan(8, 4, 16, tuple(reversed(p.shared)), {"other": 1})
    assert shuffled.hash == p.hash
    assert p.hash == plan().hash and len(p.hash) == 16
    assert plan(layers=[3, 4]).hash != p.hash
    assert plan(rank=3).hash != p.hash
    assert plan(perms={4: [0, 1, 3, 2]}).hash != p.hash
    data = json.loads(p.to_json())
    assert data["hash"] == p.hash
    data["shared"][0]["rank"] = 3
    with pytest.raises(PlanError, match="^hash:"):
        SharingPlan.from_dict(data)  # edited content no longer matches its recorded hash


def test_from_report_picks_lowest_aligned_divergence_and_protects_first_layers():
    from adapters_hub.lisa.analysis import AttentionReport

    rng = np.random.default_rng(0)
    L, H = 10, 3
    pair = rng.uniform(0.2, 0.4, size=(L, H, H))
    # layer l: aligned divergence grows with l, except layers 1 (protected) and 7 (lowest)
    for l in range(L):
        pair[l][np.arange(H), [2, 0, 1]] = 0.01 * l
    pair[1][np.arange(H), [2, 0, 1]] = 0.0
    pair[7][np.arange(H), [2, 0, 1]] = 0.001
    pair[0] = np.nan
    report = AttentionReport(L, H, 1, 24, pair)
    assert report.perm[5] == [2, 0, 1]
    assert all(a <= r + 1e-12 for a, r in zip(report.aligned_mean[1:], report.raw_mean[1:]))
    p = SharingPlan.from_report(report, fraction=0.4, protect_first=2)
    assert p.layers == (2, 3, 4, 7)  # floor(0.4 * 10) = 4, lowest aligned first, never layers 0-1
    assert all(s.perm == (2, 0, 1) and s.donor == s.layer - 1 and s.rank == 4 for s in p.shared)
    unaligned = SharingPlan.from_report(report, fraction=0.4, protect_first=2, aligned=False)
    assert unaligned.layers == p.layers and all(s.perm == (0, 1, 2) for s in unaligned.shared)
    with pytest.raises(PlanError, match="^fraction:"):
        SharingPlan.from_report(report, fraction=0.9, protect_first=3)
    with pytest.raises(PlanError, match="^protect_first:"):
        SharingPlan.from_report(report, protect_first=0)


def test_lisa_config_validates_early():
    p = plan()
    assert LisaConfig(plan=p).h_ff == 8
    for kwargs, field in [(dict(aligner_hidden=0), "aligner_hidden"), (dict(aligner_act="swish"), "aligner_act"),
                          (dict(aligner_init_std=0.0), "aligner_init_std"), (dict(plan="x"), "plan")]:
        with pytest.raises(LisaConfigError, match=f"^{field}:"):
            LisaConfig(**{"plan": p, **kwargs})
    cfg = LisaConfig(plan=p, aligner_hidden=5, base_fingerprint="abc")
    assert LisaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_shared_layer_type_is_checked():
    with pytest.raises(PlanError, match=r"^shared\[0\]:"):
        SharingPlan(4, 2, 8, ({"layer": 1},))  # type: ignore[arg-type]
    assert SharingPlan(4, 2, 8, (SharedLayer(2, 0, (1, 0), 1),)).get(2).donor == 0


def test_per_layer_ranks_round_trip_and_the_kv_cache_holds_each_layers_own_rank(tiny, tmp_path):
    import copy

    import torch
    from transformers import DynamicCache

    from adapters_hub.lisa import LisaConfig, LisaModel
    from adapters_hub.lisa.plan import SharingPlan, ranks_by_sensitivity

    ranks = ranks_by_sensitivity([2, 3, 5], {2: 0.1, 3: 0.9, 5: 0.2}, base_rank=2, boost=2.0, max_rank=15)
    assert ranks == {2: 2, 3: 4, 5: 2}  # the most sensitive third (one layer) gets 2x
    model = copy.deepcopy(tiny[0])
    plan = SharingPlan.for_model(model, [2, 3, 5], rank=ranks)
    again = SharingPlan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and [s.rank for s in again.shared] == [2, 4, 2]
    lm = LisaModel(model, LisaConfig(plan=again))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        lm(input_ids=torch.randint(3, 259, (1, 9)), past_key_values=cache, use_cache=True)
    head_dim = plan.head_dim
    widths = [cache.layers[i].keys.shape[-1] for i in range(plan.num_layers)]
    assert widths == [ranks.get(i, head_dim) for i in range(plan.num_layers)]
    kvh = model.config.num_key_value_heads
    assert plan.kv_bytes_per_token(kvh) == sum(kvh * (w + head_dim) * 4 for w in widths)
    assert "KV" in plan.summary(kvh) and "3:4" in plan.summary(kvh)
