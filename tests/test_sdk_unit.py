"""SDK pure logic: statuses, result parsing, validation before submitting, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import sdk
from jobs.runtime import RESULT_MARKER
from sdk.client import parse_result


def test_status_terminality():
    assert {s for s in sdk.JobStatus if s.is_terminal()} == {sdk.JobStatus.STOPPED, sdk.JobStatus.SUCCEEDED,
                                                              sdk.JobStatus.FAILED}
    assert sdk.JobStatus("RUNNING") is sdk.JobStatus.RUNNING and str(sdk.JobStatus.PENDING) == "PENDING"


def test_result_is_read_from_the_last_marker_line():
    first = {"run_id": "r1", "model_name": "gsm8k-lisa", "version": 1, "aliases": ["candidate"], "metrics": {}}
    last = {**first, "run_id": "r2", "version": 2, "metrics": {"adapter.accuracy": 0.5}}
    logs = f"noise\n{RESULT_MARKER}{json.dumps(first)}\nmore\n{RESULT_MARKER}{json.dumps(last)}\ntrailing\n"
    result = parse_result("job-1", logs)
    assert result.run_id == "r2" and result.version == "2" and result.ref == "gsm8k-lisa/2"
    assert result.metrics == {"adapter.accuracy": 0.5}
    assert parse_result("job-1", "no result here") is None


def test_validation_happens_before_anything_is_submitted():
    # An address nobody listens on: validation must fail first, without trying to connect.
    nowhere = "http://127.0.0.1:9"
    with pytest.raises(LookupError, match="gsm9k"):
        sdk.submit_adaptation(task="gsm9k", address=nowhere)
    with pytest.raises(ValueError, match="kind"):
        sdk.submit_adaptation(task="gsm8k", kind="qlora", address=nowhere)
    with pytest.raises(ValueError, match="profile"):
        sdk.submit_adaptation(task="gsm8k", profile="huge", address=nowhere)
    with pytest.raises(ValueError, match="overrides.*max_stepz"):
        sdk.submit_adaptation(task="gsm8k", overrides={"max_stepz": 1}, address=nowhere)
    with pytest.raises(ValueError, match="max_steps=-1"):
        sdk.submit_adaptation(task="gsm8k", overrides={"max_steps": -1}, address=nowhere)
    with pytest.raises(ValueError, match="max_steps='abc'"):
        sdk.submit_adaptation(task="gsm8k", overrides={"max_steps": "abc"}, address=nowhere)
    with pytest.raises(LookupError, match="unknown base model 'smollm3'"):
        sdk.submit_adaptation(task="gsm8k", base_model="smollm3", address=nowhere)
    with pytest.raises(LookupError, match="no model folder"):
        sdk.submit_adaptation(task="gsm8k", base_model="./no/such/model", address=nowhere)
    with pytest.raises(sdk.ClusterUnavailableError, match="lisa-hub up"):
        sdk.submit_adaptation(task="gsm8k", address=nowhere)


def test_an_unreachable_mlflow_fails_the_submission_not_the_job(monkeypatch):
    import socket

    from adapters_hub.registry import RegistryUnavailableError
    from sdk import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed}")
    monkeypatch.setattr(client, "resolve_address", lambda address=None: "http://cluster")  # a cluster that answers
    monkeypatch.setattr(client, "_submit", lambda *a, **k: pytest.fail("submitted although MLflow is down"))
    with pytest.raises(RegistryUnavailableError, match=f"127.0.0.1:{closed} is unreachable"):
        sdk.submit_adaptation(task="gsm8k", profile="smoke")


def test_a_ray_address_that_does_not_answer_fails_within_seconds():
    import socket
    import time

    from jobs.runtime import check_ray_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"RAY_ADDRESS=127.0.0.1:{closed}: no Ray GCS answers"):
        check_ray_address(f"127.0.0.1:{closed}")
    assert time.monotonic() - start < 5
    with pytest.raises(ConnectionError, match="expected host:port"):
        check_ray_address("localhost:abc")
    assert check_ray_address("auto") == "auto" and check_ray_address(None) is None
    assert check_ray_address("http://127.0.0.1:8265") == "http://127.0.0.1:8265"


def test_conversion_and_dense_backbone_are_validated_before_submitting():
    nowhere = "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="fraction"):
        sdk.submit_conversion(fraction=0.5, max_ppl_increase=0.05, address=nowhere)
    with pytest.raises(ValueError, match="fraction"):
        sdk.submit_conversion(fraction=1.5, address=nowhere)
    with pytest.raises(ValueError, match="options.*lr_max"):
        sdk.submit_conversion(options={"lr_max": 1}, address=nowhere)
    with pytest.raises(ValueError, match="aligner"):
        sdk.submit_conversion(options={"aligner": "mlp"}, address=nowhere)
    with pytest.raises(ValueError, match="layers"):
        sdk.submit_conversion(options={"layers": [0, 2]}, address=nowhere)
    with pytest.raises(ValueError, match="^attention: "):
        sdk.submit_adaptation(task="gsm8k", attention="sparse", address=nowhere)
    with pytest.raises(ValueError, match="lisa adapter needs the LiSA backbone"):
        sdk.submit_adaptation(task="gsm8k", kind="lisa", attention="dense", address=nowhere)
    with pytest.raises(sdk.ClusterUnavailableError):
        sdk.submit_conversion(fraction=0.5, address=nowhere)


def test_conversion_cli_arguments_map_to_the_spec():
    import argparse

    from jobs import convert

    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    spec = convert.parse_args(["--base", "tiny-llama", "--layers", "2,3,5", "--minutes", "2"])
    assert spec.layers == [2, 3, 5] and spec.fraction is None and spec.minutes == 2
    assert convert.parse_args([]).fraction == 0.6  # the default plan
    assert convert.parse_args(["--calib-len", "1024"]).calib_len == 1024
    with pytest.raises(ValueError, match="calib_len"):
        convert.ConvertSpec(calib_len=0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--fraction", "0.5", "--max-ppl-increase", "0.1"])
    assert convert.parse_args([]).dtype == "auto" and convert.parse_args(["--dtype", "float32"]).dtype == "float32"
    with pytest.raises(ValueError, match="dtype: 'float16'"):
        convert.ConvertSpec(dtype="float16")


def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    import torch

    from jobs import runtime

    epyc = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512vl\n"
    older = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512vl\n"  # AVX-512 without BF16
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert runtime.cpu_has_bf16(epyc) and runtime.cpu_has_bf16(arm) and not runtime.cpu_has_bf16(older)
    assert not runtime.cpu_has_bf16("")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: False)
    assert runtime.amp_dtype("auto", "cpu") is None  # emulated bf16 would be slower than fp32
    assert runtime.amp_dtype("bfloat16", "cpu") is torch.bfloat16  # asked for: given
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: True)
    assert runtime.amp_dtype("auto", "cpu") is torch.bfloat16 and runtime.amp_dtype("float32", "cpu") is None
    with pytest.raises(ValueError, match="dtype: 'fp16'"):
        runtime.amp_dtype("fp16", "cpu")


def test_each_submission_ships_a_fresh_code_package():
    from sdk.client import _code_package

    with _code_package() as a, _code_package() as b:
        a, b = Path(a), Path(b)
        for rel in ("jobs/adapt.py", "adapters_hub/lisa/layer.py", "manifests/tasks/gsm8k.yaml", "pyproject.toml"):
            assert (a / rel).is_file(), rel
        assert not (a / "tests").exists() and not (a / "benchmarks").exists()
        assert not list(a.rglob("__pycache__"))
        assert (a / ".lisa-hub-package").read_text() != (b / ".lisa-hub-package").read_text()
    assert not a.exists()  # removed once submitted
