"""Scale-out on the real local stack: a second Ray node (its own raylet) joined to the
head, a 2-worker data-parallel smoke job placed one worker per node that survives one
killed worker (retried from its checkpoint), and the refusal of node-local checkpoint
storage for a multi-node run. Registers into an MLflow of its own."""

from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMOKE = {"base_model": "tiny-llama", "profile": "smoke"}


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
    import os
    import signal

    import mlflow
    import psutil

    import sdk

    home, dashboard, _ = two_nodes
    overrides = {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "batch_size": 1, "max_steps": 12,
                 "save_steps": 3, "seed": 12, "eval_examples": 2, "max_new_tokens": 2}

    # node-local checkpoints on a cluster of two nodes: refused before training, one line
    refused = sdk.submit_adaptation(task="gsm8k", address=dashboard, overrides=overrides, **SMOKE)
    with pytest.raises(sdk.JobFailedError):
        refused.wait(timeout=600)
    assert "storage: this cluster has 2 nodes" in refused.logs() and "LISA_HUB_STORAGE" in refused.logs()

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
