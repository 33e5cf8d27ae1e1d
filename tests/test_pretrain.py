"""`lisa-hub pretrain`: a LiSA model from scratch beside a dense twin. Unit tests of the spec,
the config file, the plan by position and the two models (seconds); one stack test (real
Ray head, its own MLflow) kills a submitted job's worker after its first checkpoint, sees it
resume, and loads the registered base and backbone by name."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

TINY = {"description": "tiny, for tests", "tokenizer": "bytes", "lisa": {"rank": 4},
        "model": {"model_type": "llama", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                  "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}


def _config(tmp_path, **changes) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


def test_a_plan_by_position_spreads_shared_layers_and_keeps_layer_0_dense():
    from adapters_hub.lisa.plan import PlanError, layers_by_position

    assert layers_by_position(6, 0.5) == [1, 3, 5]
    assert layers_by_position(4, 0.5) == [1, 3]
    for layers in (2, 6, 12, 30):
        for fraction in (0.1, 0.3, 0.5, 0.6, 0.9):
            chosen = layers_by_position(layers, fraction)
            assert 0 not in chosen and chosen == sorted(set(chosen)) and max(chosen) < layers
            assert len(chosen) == max(1, min(layers - 1, round(fraction * layers)))
    with pytest.raises(PlanError, match="fraction"):
        layers_by_position(6, 1.0)


def test_bad_specs_and_configs_name_the_field_or_key(tmp_path):
    from jobs.pretrain import PretrainSpec, load_config, model_config

    with pytest.raises(ValueError, match="plan_fraction: must be in"):
        PretrainSpec(plan_fraction=0)
    with pytest.raises(ValueError, match="name: lower-case"):
        PretrainSpec(name="My Model")
    with pytest.raises(ValueError, match="stepz: unknown field"):
        PretrainSpec(stepz=3)
    with pytest.raises(ValueError, match="neither a file nor a preset.*bytes-6l"):
        load_config("nope")
    with pytest.raises(ValueError, match="tiny.json: unknown key 'layers'"):
        load_config(str(_config(tmp_path, layers=3)))
    with pytest.raises(ValueError, match="lisa.rank must be a positive integer"):
        load_config(str(_config(tmp_path, lisa={"rank": 0})))
    from adapters_hub.architectures import UnsupportedArchitectureError

    gpt2 = {**TINY["model"], "model_type": "gpt2"}
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*supported: llama"):
        model_config(load_config(str(_config(tmp_path, model=gpt2))), 259)
    small = {**TINY["model"], "vocab_size": 100}
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the tokenizer's 259"):
        model_config(load_config(str(_config(tmp_path, model=small))), 259)
    assert PretrainSpec(config="bytes-6l", plan_fraction=0.5).base_name() == "bytes-6l-lisa50"
    assert load_config("bytes-6l")["model"]["num_hidden_layers"] == 6


def test_the_twins_start_equal_and_only_the_idle_projections_are_frozen(tmp_path):
    from jobs.pretrain import PretrainSpec, _models, _weights, load_config, model_config, plan_of

    config = load_config(str(_config(tmp_path)))
    cfg = model_config(config, 259)
    spec = PretrainSpec(config=config["path"], plan_fraction=0.5)
    plan = plan_of(spec, cfg, config)
    assert plan.layers == (1, 3) and {s.rank for s in plan.shared} == {4} and plan.meta["origin"] == "pretrain"
    models = _models(cfg, plan, spec)
    lisa, dense = models["lisa"], models["dense"]
    for name, p in dense.named_parameters():  # the same initial weights
        assert torch.equal(p, lisa.model.get_parameter(name))
    frozen = {n for n, p in lisa.model.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{i}.self_attn.{proj}.weight" for i in (1, 3) for proj in ("q_proj", "k_proj")}
    weights = _weights(lisa)
    assert weights["total"] - weights["run"] == sum(lisa.model.get_parameter(n).numel() for n in frozen)
    ids = torch.randint(3, 259, (2, 16))
    loss = lisa(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()  # every weight that runs gets a gradient, the LiSA tensors too
    assert all(p.grad is not None for p in lisa.model.parameters() if p.requires_grad)
    assert any("lisa_" in n for n, p in lisa.model.named_parameters() if p.requires_grad)


@pytest.mark.stack
@pytest.mark.slow
def test_a_pretraining_job_survives_a_killed_worker_and_registers_a_base_that_loads_by_name(
        ray_stack, own_mlflow, tmp_path, monkeypatch):
    """Submitted through `sdk.submit_pretraining` (the config file travels with the job); its
    Ray Train worker is killed after the first checkpoint, and the restarted worker resumes
    from it (a whole job killed and run again resumes through the same `runtime.fit`:
    tests/test_convert_and_demo.py, tests/test_e2e.py). The registered base then loads by
    name elsewhere, and a task adapter is made from it."""
    import psutil

    import sdk
    from adapters_hub.backbone import backbone_folder, load_backbone
    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa.convert import token_split
    from adapters_hub.models import load_base
    from tests.test_e2e import _checkpoint_recorded

    storage = tmp_path / "storage"
    monkeypatch.setenv("LISA_HUB_STORAGE", str(storage))  # the SDK passes it on to the job
    options = {"save_every": 4, "batch_size": 4, "seq_len": 32, "eval_blocks": 2, "eval_len": 64, "warmup_steps": 2}
    job = sdk.submit_pretraining(config=str(_config(tmp_path)), plan_fraction=0.5, steps=24, name="tiny-scratch",
                                 options=options, address=ray_stack[1])
    deadline = time.monotonic() + 600
    while not _checkpoint_recorded(storage, "pretrain-"):
        assert not job.status().is_terminal() and time.monotonic() < deadline, job.logs()[-3000:]
        time.sleep(0.5)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 1, [w.info["cmdline"] for w in workers]
    os.kill(workers[0].pid, signal.SIGKILL)
    result = job.wait(timeout=600)
    logs = job.logs()
    step = int(logs.split("resuming from checkpoint at step")[1].split()[0])
    assert 4 <= step < 24
    assert result.base == "tiny-scratch" and result.model_name == "backbone-tiny-scratch"
    assert result.raw["base_model_name"] == "base-tiny-scratch"
    metrics = result.metrics
    assert metrics["steps"] == 24 and metrics["lisa.parameters_run"] < metrics["dense.parameters_run"]
    assert not [p for p in storage.glob("pretrain-*") if p.is_dir()]  # the finished run's checkpoints are gone

    # another process (a task job, the server) loads the base by name; with a LISA_HUB_HOME
    # that lacks the folder, from the registry
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path / "elsewhere"))
    model, tok = load_base("tiny-scratch")
    assert model.config.lisa_hub_pretrained["plan_hash"] == result.plan_hash
    lm, _ = load_backbone("tiny-scratch", backbone_folder("tiny-scratch", tracking_uri=own_mlflow))
    split = token_split(tok, eval_blocks=2, eval_len=64, calib_blocks=0, train_len=32)
    assert abs(perplexity(lm.eval(), split.eval, progress=False) - metrics["lisa.perplexity"]) < 1e-3

    # a task adapter trains on it like on any base: the adapt job's own steps, here in-process
    # (a whole job costs a minute and a half of CI): its plan and general adapter from the
    # registry (no attention analysis), the adapter made from them, one training step
    from adapters_hub.backbone import backbone_plan, load_lisa_model
    from adapters_hub.kinds import get_kind
    from jobs.adapt import _general_adapter, prepare_adapter

    plan = backbone_plan("tiny-scratch", tracking_uri=own_mlflow, log=pytest.fail)  # a log line = analysing
    assert plan.hash == result.plan_hash
    init_from = _general_adapter("gsm8k", "tiny-scratch", plan, own_mlflow)
    assert init_from is not None
    task_lm, _ = load_lisa_model("tiny-scratch", plan)
    assert prepare_adapter(task_lm, get_kind("lisa"), "gsm8k", {}, init_from=init_from) > 0
    ids = torch.randint(3, 259, (2, 16))
    task_lm.train()
    task_lm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert any(p.grad is not None for p in task_lm.parameters() if p.requires_grad)

def test_a_pretrained_base_without_its_registered_backbone_is_refused_not_reanalysed(tmp_path, monkeypatch):
    from adapters_hub import stack
    from adapters_hub.backbone import backbone_plan

    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    folder = tmp_path / "pretrained" / "mine" / "base"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    uri = f"http://127.0.0.1:{stack.free_port()}"  # an empty registry would do; none is needed to refuse
    monkeypatch.setattr("adapters_hub.registry.get_backbone", lambda base, tracking_uri=None: None)
    with pytest.raises(LookupError, match="pre-trained with its own plan.*--name mine --register"):
        backbone_plan("mine", tracking_uri=uri, log=lambda line: None)
