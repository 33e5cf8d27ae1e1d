"""Pure helpers of the Serve app (sdk/serve.py): replica options and the merged /stats.

    .venv/bin/python -m pytest -q tests/test_serve_unit.py
"""

import pytest

from sdk.serve import merge_stats, replica_options


def test_replica_options_fix_a_count_or_autoscale_and_name_the_bad_field():
    assert replica_options(replicas=3) == {"num_replicas": 3}
    scaling = replica_options(min_replicas=0, max_replicas=4, target_ongoing_requests=2)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (0, 1, 4)
    assert scaling["target_ongoing_requests"] == 2
    for kwargs, field in (({"replicas": 0}, "replicas"), ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
                          ({"min_replicas": -1}, "min_replicas"),
                          ({"max_replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            replica_options(**kwargs)


def test_merged_stats_sum_counters_join_adapter_sets_and_keep_each_replica():
    a = {"replica": "r1", "steps": 3, "loads": 2, "largest_batch": 4, "resident": ["x", "p"], "pinned": ["p"],
         "requests": {"x": 2}, "rss_mb": 100.0, "age_s": 0.5}
    b = {"replica": "r0", "steps": 1, "loads": 1, "largest_batch": 6, "resident": ["y", "p"], "pinned": ["p"],
         "requests": {"x": 1, "y": 5}, "rss_mb": 90.0, "age_s": 2.0}
    out = merge_stats([a, b])
    assert (out["steps"], out["loads"], out["largest_batch"]) == (4, 3, 6)
    assert out["resident"] == ["p", "x", "y"] and out["pinned"] == ["p"]
    assert out["requests"] == {"x": 3, "y": 5}
    assert [s["replica"] for s in out["replicas"]] == ["r0", "r1"] and "rss_mb" not in out
    assert merge_stats([]) == {"replicas": []}
