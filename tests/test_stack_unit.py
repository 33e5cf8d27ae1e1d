"""Stack helpers that need no running service: where a driver connects, what `down` forgets."""

from __future__ import annotations

import pytest


def test_a_driver_with_no_head_and_no_ray_address_starts_its_own_instance(tmp_path, monkeypatch):
    """Never a bare ray.init(): it follows Ray's current-cluster note to a head that may be gone
    (seen: 13 minutes of retries after `lisa-hub down`, following a 10-minute scan)."""
    from adapters_hub import stack
    from jobs import runtime

    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.ray_address() == "local"
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{stack.free_port()}")
    with pytest.raises(ConnectionError, match="no Ray GCS answers"):
        runtime.ray_address()


def test_down_forgets_only_its_own_heads_current_cluster_note(tmp_path):
    from adapters_hub.stack import forget_current_cluster

    note = tmp_path / "ray_current_cluster"
    note.write_text("10.1.2.3:41234")
    assert not forget_current_cluster("127.0.0.1:6379", note) and note.exists()  # another cluster's
    assert forget_current_cluster("127.0.0.1:41234", note) and not note.exists()
    assert not forget_current_cluster("127.0.0.1:41234", note)  # nothing left: fine
