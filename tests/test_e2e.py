"""End to end on tiny-llama with the real local stack: SDK -> Ray job -> Ray Train + TRL ->
MLflow registry -> hot swap (serving job-trained adapters over HTTP: the demo in
tests/test_convert_and_demo.py; the Serve app itself: tests/test_serve.py). Ordered: later
tests use earlier adapters. The
first adapter's job is stopped mid-run and submitted again (it resumes from its checkpoint):
each job costs about a minute of CI, so one job pair checks both."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMOKE = {"base_model": "tiny-llama", "profile": "smoke"}
RESUMABLE = {"max_steps": 16, "save_steps": 4, "max_new_tokens": 2}  # enough steps left to stop it mid-run
QUESTION = "Question: Ann has 2 cats and buys 3 more. How many cats?\nAnswer:"


@pytest.fixture(scope="module")
def cluster(ray_stack):
    from adapters_hub import stack

    home, dashboard, mlflow_uri = ray_stack
    return dashboard, mlflow_uri, stack._load_state(home)["ray"].extra["gcs_address"]


@pytest.fixture(scope="module")
def first(cluster, ray_stack):
    """gsm8k on a fresh registry, the same spec submitted twice at once: one job wins the
    run lock, the other ends with the one-line 'identical job is running' error. The winner
    is stopped once Ray Train has recorded a checkpoint, then submitted again: it resumes
    from that checkpoint and registers version 1. (loser, stopped job, resumed job, result)"""
    import sdk

    dashboard, home = cluster[0], ray_stack[0]
    pair = [sdk.submit_adaptation(task="gsm8k", address=dashboard, overrides=RESUMABLE, **SMOKE) for _ in range(2)]
    deadline = time.monotonic() + 600
    # the loser fails at the lock (seconds) while the winner holds it; then the winner's checkpoint
    while not (any(j.status().is_terminal() for j in pair) and _checkpoint_recorded(home / "train", "gsm8k-lisa-")):
        assert not all(j.status().is_terminal() for j in pair), pair[0].logs()[-2000:] + pair[1].logs()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(1)
    loser, stopped = sorted(pair, key=lambda j: not j.status().is_terminal())
    stopped.stop()
    while not stopped.status().is_terminal():
        time.sleep(1)
    job = sdk.submit_adaptation(task="gsm8k", address=dashboard, overrides=RESUMABLE, **SMOKE)
    return loser, stopped, job, job.wait(timeout=900)


def test_identical_jobs_at_once_on_an_empty_registry_end_as_documented(first, cluster, ray_stack):
    """The loser of two identical jobs fails with the one-line error (never a raw error from
    the other's files); one plan is registered for the base; the registered version's run
    is tagged with the job that made it; no per-job folders are left."""
    import mlflow

    import sdk
    from adapters_hub import registry

    loser, _, job, result = first
    assert loser.status() is sdk.JobStatus.FAILED
    logs = loser.logs()
    assert "an identical job is running" in logs and "FileNotFoundError" not in logs, logs[-3000:]
    client = mlflow.MlflowClient(cluster[1])
    assert len(client.search_model_versions(f"name = '{registry.backbone_model_name('tiny-llama')}'")) == 1
    assert client.get_run(result.run_id).data.tags["ray_job_id"] == job.id
    assert not list((ray_stack[0] / "train").glob("gsm8k-lisa-*-adapter*")), "per-job adapter folders left behind"


def test_submit_follow_wait_registers_a_version(first, cluster):
    import mlflow

    import sdk
    from adapters_hub import registry

    _, stopped, job, result = first
    uri = cluster[1]
    assert stopped.status() is sdk.JobStatus.STOPPED and stopped.status().is_terminal()
    assert job.status() is sdk.JobStatus.SUCCEEDED and job.status().is_terminal()
    logs = job.logs()
    assert "resuming from checkpoint at step" in logs, logs[-3000:]
    step = int(logs.split("resuming from checkpoint at step")[1].split()[0])
    assert 4 <= step < RESUMABLE["max_steps"]
    assert "init=fresh" in logs  # no general adapter registered yet
    assert result.model_name == "gsm8k-lisa" and result.version == "1"
    assert result.aliases == ["candidate", "champion"]  # first version: nothing to beat
    for key in ("base.accuracy", "fresh.answer_nll", "adapter.answer_nll", "adapter.accuracy"):
        assert key in result.metrics
    assert "LISA_HUB_RESULT" in logs and "[train] trainable parameters" in logs

    record = registry.get_adapter("gsm8k-lisa@champion", tracking_uri=uri)
    assert record.version == 1 and set(record.aliases) == {"candidate", "champion"}
    for tag in ("task", "kind", "base_model", "base_fingerprint", "plan_hash", "trainable_params", "sha256"):
        assert record.tags.get(tag), tag
    assert record.tags["base_model"] == "tiny-llama" and record.tags["kind"] == "lisa"

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert abs(run.data.metrics["adapter.answer_nll"] - result.metrics["adapter.answer_nll"]) < 1e-9
    assert len(client.get_metric_history(result.run_id, "train/loss")) >= 2  # per-step metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"loss_curve.png", "samples.json"} <= artifacts

    listed = [j for j in sdk.list_jobs(address=cluster[0]) if j.id == job.id]
    assert listed and listed[0].task == "gsm8k" and listed[0].base == "tiny-llama"


def test_adapter_loads_and_swaps_on_one_backbone(first, cluster):
    import sdk

    result = first[3]
    uri = cluster[1]
    bb = sdk.Backbone.load(base_model="tiny-llama", tracking_uri=uri)
    fresh = bb.generate(QUESTION, max_new_tokens=8)
    active = bb.use("gsm8k")  # bare task name -> gsm8k-lisa@champion
    assert active.key == "gsm8k-lisa/1" and active.kind == "lisa"
    tuned = bb.generate(QUESTION, max_new_tokens=8)
    alone = sdk.Backbone.load(base_model="tiny-llama", tracking_uri=uri)
    alone.use(result.ref)
    assert tuned == alone.generate(QUESTION, max_new_tokens=8)
    assert isinstance(fresh, str)


def test_two_task_adapters_mixed_batch_and_hot_swap(first, cluster):
    import sdk

    dashboard, uri, _ = cluster
    wiki = sdk.submit_adaptation(task="wikitext2", address=dashboard, **SMOKE).wait(timeout=900)
    assert wiki.model_name == "wikitext2-lisa"

    bb = sdk.Backbone.load(base_model="tiny-llama", tracking_uri=uri, max_resident=2)
    prompts = [QUESTION, "The history of", "Question: 5 - 2?\nAnswer:"]
    refs = ["gsm8k-lisa/1", wiki.ref, "gsm8k-lisa/1"]
    per_adapter = {}
    for ref in set(refs):
        solo = sdk.Backbone.load(base_model="tiny-llama", tracking_uri=uri)
        solo.use(ref)
        per_adapter[ref] = solo.generate(prompts, max_new_tokens=6)
    mixed = bb.generate(prompts, adapter=refs, max_new_tokens=6)
    assert mixed == [per_adapter[r][i] for i, r in enumerate(refs)]
    # swap back and forth on one backbone: each output equals that adapter loaded alone
    for ref in (wiki.ref, "gsm8k-lisa/1", wiki.ref):
        bb.use(ref)
        assert bb.generate(prompts, max_new_tokens=6) == per_adapter[ref]
    assert len(bb.resident) <= 2


def test_a_later_run_starts_from_the_general_adapter_and_takes_champion_only_if_strictly_better(first, cluster):
    import sdk
    from adapters_hub import registry

    dashboard, uri, _ = cluster
    one = first[3]
    job = sdk.submit_adaptation(task="gsm8k", address=dashboard, overrides={"max_steps": 1, "lr": 1e-6}, **SMOKE)
    two = job.wait(timeout=900)
    assert two.version == "2" and "candidate" in two.aliases
    acc, nll = (lambda r: r.metrics["adapter.accuracy"]), (lambda r: r.metrics["adapter.answer_nll"])
    better = acc(two) > acc(one) or (acc(two) == acc(one) and nll(two) < nll(one))  # gsm8k: ties -> NLL
    assert ("champion" in two.aliases) == better  # champion only when strictly better
    champion = registry.get_adapter("gsm8k-lisa@champion", tracking_uri=uri)
    assert champion.version == (2 if better else 1)
    # Once the base has a general adapter (wikitext2-lisa, registered by the test above when
    # the module runs in order), a new task adapter starts from it instead of fresh.
    try:
        registry.get_adapter("wikitext2-lisa@champion", tracking_uri=uri)
        expected = "init=general adapter"
    except registry.AdapterNotFoundError:
        expected = "init=fresh"
    logs = job.logs()
    assert expected in logs, logs[-3000:]
    assert ("init.answer_nll" in two.metrics) == (expected == "init=general adapter"), two.metrics


def _checkpoint_recorded(storage, prefix: str) -> bool:
    """A Ray Train run under `storage` whose checkpoint-manager snapshot lists a checkpoint."""
    import json

    for snapshot in storage.glob(f"{prefix}*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


def test_bad_inputs_fail_clearly_and_leave_nothing(cluster, tmp_path):
    import sdk
    from adapters_hub import registry, stack
    from adapters_hub.tasks import TaskSpecError, UnknownTaskError

    dashboard, uri, _ = cluster
    before = {(a.name, a.version) for a in registry.list_adapters(tracking_uri=uri)}
    n_jobs = len(sdk.list_jobs(address=dashboard))

    with pytest.raises(UnknownTaskError, match="gsm9k"):
        sdk.submit_adaptation(task="gsm9k", address=dashboard)
    with pytest.raises(ValueError, match="profile"):
        sdk.submit_adaptation(task="gsm8k", profile="huge", address=dashboard)
    with pytest.raises(ValueError, match="overrides"):
        sdk.submit_adaptation(task="gsm8k", overrides={"max_stepz": 3}, address=dashboard)

    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("name: broken\ndescription: x\nmetrics: [accuracy]\n")
    env = dict(os.environ, LISA_HUB_TASKS_DIR=str(bad))
    run = subprocess.run([sys.executable, "-m", "jobs.adapt", "--task", "broken", "--profile", "smoke"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "broken.yaml" in run.stderr, run.stderr

    dead = f"http://127.0.0.1:{stack.free_port()}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=dead)
    run = subprocess.run([sys.executable, "-m", "jobs.adapt", "--task", "gsm8k", "--profile", "smoke",
                          "--base", "tiny-llama"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and dead in run.stderr and "lisa-hub up" in run.stderr, run.stderr

    with pytest.raises(sdk.ClusterUnavailableError, match="lisa-hub up"):
        sdk.submit_adaptation(task="gsm8k", address=f"http://127.0.0.1:{stack.free_port()}")

    assert {(a.name, a.version) for a in registry.list_adapters(tracking_uri=uri)} == before
    assert len(sdk.list_jobs(address=dashboard)) == n_jobs
