"""Scale-out on the real local stack: a second Ray node (its own raylet) joined to the
head, a 2-worker data-parallel smoke job placed one worker per node that survives one
killed worker (retried from its checkpoint), and the refusal of node-local checkpoint
storage for a multi-node run. Registers into an MLflow of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMOKE = {"base_model": "tiny-llama", "profile": "smoke"}


def _driver_env(home) -> dict[str, str]:
    """A driver of this stack's head: its GCS address and token, node-local storage."""
    from adapters_hub import stack

    env = {k: v for k, v in os.environ.items() if k != "LISA_HUB_STORAGE"}
    return {**env, **stack.ray_client_env(home), "RAY_ADDRESS": stack._load_state(home)["ray"].extra["gcs_address"]}


@pytest.fixture
def two_nodes(ray_stack):
    from adapters_hub import stack

    home = ray_stack[0]
    stack.add_nodes(1, home=home, num_cpus=1)
    yield ray_stack
    stack.remove_nodes(home=home)  # later tests see one node again


def test_a_two_worker_job_spreads_over_two_nodes_survives_a_killed_worker_and_registers_one_adapter(
        two_nodes, own_mlflow, monkeypatch):
    import collections
    import signal

    import mlflow
    import psutil

    import sdk

    home, dashboard, _ = two_nodes
    overrides = {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "batch_size": 1, "max_steps": 12,
                 "save_steps": 3, "seed": 12, "eval_examples": 2, "max_new_tokens": 2}

    # node-local checkpoints on a cluster of two nodes: refused before training, one line (the
    # check every job's `runtime.fit` makes first, asked here of this real two-node cluster by
    # a driver of its own: a refused job would cost half a minute of CI to say the same line)
    refusal = subprocess.run([sys.executable, "-c", "from jobs import runtime; runtime.connect(); "
                              f"runtime.check_storage({str(home / 'train')!r})"], env=_driver_env(home),
                             capture_output=True, text=True, timeout=300)
    assert refusal.returncode != 0 and "storage: this cluster has 2 nodes" in refusal.stderr, refusal.stderr[-2000:]
    assert "LISA_HUB_STORAGE" in refusal.stderr

    monkeypatch.setenv("LISA_HUB_STORAGE", str(home / "train"))  # one machine: the folder is shared
    job = sdk.submit_adaptation(task="gsm8k", address=dashboard, overrides=overrides, **SMOKE)
    deadline = time.monotonic() + 600
    while "Reporting training result" not in job.logs():  # this job has reported a checkpoint
        assert not job.status().is_terminal() and time.monotonic() < deadline, job.logs()[-2000:]
        time.sleep(1)
    time.sleep(2)  # the controller records it
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 2, [w.info["cmdline"] for w in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)  # one of the two
    result = job.wait(timeout=900)
    logs = job.logs()
    assert "2 worker(s) x batch 1 x grad_accum 1 = global batch 2" in logs
    placed = dict(re.findall(r"\[train\] worker (\d)/2 on node (\w+)", logs))
    assert set(placed) == {"0", "1"} and len(set(placed.values())) == 2, logs[-3000:]
    assert "resuming from checkpoint at step" in logs, logs[-3000:]
    resumed_at = int(logs.split("resuming from checkpoint at step")[1].split()[0])
    assert 3 <= resumed_at < overrides["max_steps"]

    client = mlflow.MlflowClient(own_mlflow)
    assert client.get_run(result.run_id).data.params["global_batch"] == "2"
    per_step = collections.Counter(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
    assert set(per_step) == set(range(1, overrides["max_steps"] + 1))
    assert all(per_step[s] == 1 for s in range(1, resumed_at + 1))  # one curve: rank 0's (later steps ran twice)
    assert result.version == "1" and "champion" in result.aliases
