"""The adaptation job's pure pieces, without Ray or MLflow: the trainer subclass (adapter-only
checkpoints, attention distillation in the loss), argument parsing, overrides."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan
from jobs import adapt, runtime


def _trainer(tiny, tmp_path, beta, steps=2, save_steps=0):
    from datasets import Dataset
    from trl import SFTConfig

    from adapters_hub.kinds import get_kind

    model = copy.deepcopy(tiny[0])
    lm = LisaModel(model, LisaConfig(plan=SharingPlan.for_model(model, [2, 3, 5])), adapter_name="t")
    data = Dataset.from_dict({"text": ["hello lisa world " * 4, "shared attention layers " * 4] * 4})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], logging_steps=1, max_length=64, use_cpu=True, dataloader_num_workers=0, activation_checkpointing=False,
                     save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    from jobs.trainer import AdapterSFTTrainer

    trainer = AdapterSFTTrainer(model=lm, args=args, train_dataset=data, processing_class=tiny[1], lisa_model=lm,
                                adapter_kind=get_kind("lisa"), adapter_name="t", distill_beta=beta)
    return trainer, lm


def test_distillation_term_is_added_and_logged(tiny, tmp_path):
    trainer, lm = _trainer(tiny, tmp_path, beta=1.0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "distill_kl" in h]
    assert len(logged) == 2 and all(h["distill_kl"] >= 0 for h in logged)
    # The KL of a fresh adapter is > 0 on a random model (donor attention != own attention).
    assert logged[0]["distill_kl"] > 1e-4
    plain, _ = _trainer(tiny, tmp_path / "plain", beta=0.0)
    plain.train()
    assert not any("distill_kl" in h for h in plain.state.log_history)


def test_checkpoints_hold_the_adapter_only_and_resume_loads_it(tiny, tmp_path):
    trainer, lm = _trainer(tiny, tmp_path, beta=0.0, steps=2, save_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    trained = {k: v.clone() for k, v in lm.adapter_state_dict("t").items()}
    again, lm2 = _trainer(tiny, tmp_path / "again", beta=0.0)
    for k, p in lm2.named_parameters():  # frozen tensors of the adapter (lisa_tensors=aligner) load too
        if ".lisa_qk." in k:
            p.requires_grad_(False)
    again._load_from_checkpoint(str(ckpt))
    for k, v in lm2.adapter_state_dict("t").items():
        assert torch.equal(v, trained[k]), k


def test_overrides_and_set_flags_are_validated():
    spec = adapt.parse_args(["--task", "gsm8k", "--profile", "smoke", "--set", "max_steps=5", "--set", "lr=0.01"])
    assert spec.overrides == {"max_steps": 5, "lr": 0.01}
    from adapters_hub.tasks import load_task

    assert adapt._profile(load_task("gsm8k"), spec).max_steps == 5
    with pytest.raises(ValueError, match="max_steps"):
        adapt._profile(load_task("gsm8k"), adapt.AdaptSpec(task="gsm8k", profile="smoke", overrides={"max_steps": -1}))
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        adapt.parse_args(["--task", "gsm8k", "--set", "max_steps"])


def test_an_identical_running_job_is_refused_and_a_dead_ones_lock_is_free(tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    monkeypatch.setenv("LISA_HUB_JOB_ID", "raysubmit_first")
    with runtime.run_lock("gsm8k-lisa-abc"):
        with pytest.raises(runtime.JobConflictError, match="identical job is running.*raysubmit_first.*gsm8k-lisa-abc"):
            with runtime.run_lock("gsm8k-lisa-abc"):  # a second open file: the lock another process would take
                pass
        with runtime.run_lock("gsm8k-lisa-other"):  # another spec runs beside it
            pass
    with runtime.run_lock("gsm8k-lisa-abc"):  # released when the first job ends (or dies)
        pass


def test_a_lost_mlflow_stops_training_instead_of_failing_the_worker(monkeypatch):
    import socket
    from types import SimpleNamespace

    from jobs.trainer import MlflowSteps

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    steps = MlflowSteps(f"http://127.0.0.1:{closed}", "run0", rank=lambda: 0)
    control = SimpleNamespace(should_training_stop=False)
    steps.on_log(None, SimpleNamespace(global_step=7), control, logs={"loss": 1.0})
    assert "at step 7" in steps.lost
    steps.on_step_end(None, SimpleNamespace(global_step=8), control)  # agreed at the next step's end
    assert control.should_training_stop


def test_profile_lora_fields_decide_what_trains(tiny, tmp_path):
    """lora_rank / lora_targets / lisa_tensors of a profile reach the adapter: a lisa adapter
    started from the general adapter gets LoRA parts and, with lisa_tensors=aligner, keeps its
    low-rank Q/K frozen; a lora adapter gets the rank and targets asked for."""
    from adapters_hub.backbone import load_lisa_model
    from adapters_hub.kinds import get_kind

    plan = SharingPlan.for_model(tiny[0], [2, 3, 5])
    lm, _ = load_lisa_model("tiny-llama", plan)
    general = lm.save_adapter(tmp_path / "general", "fresh")
    lm, _ = load_lisa_model("tiny-llama", plan, general_adapter=general)
    n = adapt.prepare_adapter(lm, get_kind("lisa"), "t", {"lora_rank": 2, "lora_targets": ["o_proj"],
                                                           "lisa_tensors": "aligner"}, init_from=str(general))
    names = [k for k, p in lm.named_parameters() if p.requires_grad]
    assert n == 3 * 16 + 6 * 2 * (64 + 64)  # 3 aligners (4 x 4 heads) + o_proj parts on all 6 layers
    assert all("lisa_aligner.t." in k or "o_proj.lisa_lora_" in k for k in names)
    assert lm.peft_config["t"].lora_parts.r == 2

    lm, _ = load_lisa_model("tiny-llama", plan)
    n = adapt.prepare_adapter(lm, get_kind("lora"), "l", {"lora_rank": 3, "lora_targets": ["mlp"]}, init_from=None)
    names = [k for k, p in lm.named_parameters() if p.requires_grad]
    assert names and all(".mlp." in k and ".lora_" in k and ".l." in k for k in names)
    assert n == sum(p.numel() for k, p in lm.named_parameters() if p.requires_grad)
    assert {p.shape[0] for k, p in lm.named_parameters() if "lora_A" in k} == {3}


@pytest.mark.parametrize("make,field", [
    (lambda: __import__("jobs.adapt").adapt.AdaptSpec(task="gsm8k", profle="quick"), "profle: unknown field"),
    (lambda: __import__("jobs.adapt").adapt.AdaptSpec(task="gsm8k", fresh_start="maybe"), "fresh_start:"),
    (lambda: __import__("jobs.convert").convert.ConvertSpec(minutes="soon"), "minutes:"),
    (lambda: __import__("jobs.convert").convert.ConvertSpec(seq_len=0), "seq_len:"),
])
def test_job_specs_are_closed_and_their_errors_name_the_field_on_one_line(make, field):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)


def test_a_job_spec_travels_as_json_and_comes_back_equal():
    from jobs.adapt import AdaptSpec
    from jobs.convert import ConvertSpec
    from jobs.runtime import parse_spec

    from jobs.pretrain import PretrainSpec

    for spec, module in ((AdaptSpec(task="gsm8k", overrides={"max_steps": 3}), "adapt"),
                         (ConvertSpec(kv_budget=0.5, drop_attention=True), "convert"),
                         (PretrainSpec(plan_fraction=0.3, steps=7), "pretrain")):
        mod = __import__(f"jobs.{module}", fromlist=["x"])
        again = parse_spec(["--spec-json", json.dumps(spec.model_dump())], prog="x", description="x",
                           add_arguments=mod.add_arguments, spec_type=type(spec))
        assert again == spec
        assert mod.parse_args(["--spec-json", json.dumps(spec.model_dump())]) == spec  # the job's own entry
