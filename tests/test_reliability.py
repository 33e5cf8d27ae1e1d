"""Reliability on the real local stack (tiny-llama, smoke profile): MLflow stopped mid-job.
(Identical jobs submitted together, racing for a base's first plan: the first fixture of
tests/test_e2e.py. A Train worker killed mid-run is retried from its checkpoint:
tests/test_scale_out.py and tests/test_pretrain.py; tests/test_e2e.py stops a job and
resumes it.)

Each test registers into an MLflow server of its own: the session registry belongs to the
ordered e2e tests."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMOKE = {"base_model": "tiny-llama", "profile": "smoke"}


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
