"""Reliability on the real local stack (tiny-llama, smoke profile): identical jobs submitted
together, two jobs racing to register a base's first plan, MLflow stopped mid-job. (A Train
worker killed mid-run is retried from its checkpoint: tests/test_scale_out.py kills one of
two workers; tests/test_e2e.py stops a job and resumes it.)

Each test registers into an MLflow server of its own: the session registry belongs to the
ordered e2e tests."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMOKE = {"base_model": "tiny-llama", "profile": "smoke"}


def test_identical_jobs_at_once_on_an_empty_registry_end_as_documented(ray_stack, own_mlflow):
    """Same spec twice at once: each job succeeds or fails with the one-line 'identical job
    is running' error (never a raw error from the other's files); one plan for the base;
    one version per succeeded job, its MLflow run tagged with its job id; no folders left."""
    import mlflow

    import sdk
    from adapters_hub import registry

    home, dashboard, _ = ray_stack
    overrides = {"max_steps": 6, "eval_examples": 4, "max_new_tokens": 2}
    jobs = [sdk.submit_adaptation(task="gsm8k", address=dashboard, overrides=overrides, **SMOKE) for _ in range(2)]
    results = {}
    for job in jobs:
        try:
            results[job.id] = job.wait(timeout=900)
        except sdk.JobFailedError:
            logs = job.logs()
            assert "an identical job is running" in logs and "FileNotFoundError" not in logs, logs[-3000:]
    assert results, "neither job succeeded"

    client = mlflow.MlflowClient(own_mlflow)
    plans = client.search_model_versions(f"name = '{registry.backbone_model_name('tiny-llama')}'")
    assert len(plans) == 1
    versions = registry.list_adapters("gsm8k", tracking_uri=own_mlflow)
    assert len(versions) == len(results)
    for job_id, result in results.items():
        assert client.get_run(result.run_id).data.tags["ray_job_id"] == job_id
    assert not list((home / "train").glob("gsm8k-lisa-*-adapter*")), "per-job adapter folders left behind"


def test_mlflow_stopped_mid_job_fails_it_within_a_minute_and_registers_nothing(ray_stack, tmp_path_factory,
                                                                               monkeypatch):
    import time

    import sdk
    from adapters_hub import registry, stack

    import shutil

    before = set((ray_stack[0] / "train").glob("*"))
    home = tmp_path_factory.mktemp("dying-mlflow")
    ports = stack.Ports(dashboard=stack.free_port(), gcs=stack.free_port(), mlflow=stack.free_port())
    stack.up(home=home, ray=False, ports=ports)
    uri = stack.mlflow_url(home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        overrides = {"max_steps": 400, "save_steps": 4, "eval_examples": 2, "max_new_tokens": 2, "seed": 13}
        job = sdk.submit_adaptation(task="gsm8k", address=ray_stack[1], overrides=overrides, **SMOKE)
        deadline = time.monotonic() + 600
        while "Reporting training result" not in job.logs():  # training runs and has logged steps
            assert not job.status().is_terminal(), job.logs()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(1)
        stack.down(home=home)
        killed = time.monotonic()
        with pytest.raises(sdk.JobFailedError):
            job.wait(timeout=300)
        assert time.monotonic() - killed < 60, "the job took more than a minute to fail"
        assert "MLflow" in job.logs().split("Reporting training result")[-1]
        stack.up(home=home, ray=False, ports=ports)  # the same registry, back
        assert registry.Registry(uri).list_adapters("gsm8k") == []
    finally:
        stack.down(home=home)
        for left in set((ray_stack[0] / "train").glob("*")) - before:  # the failed run's checkpoints and lock
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
