"""The adaptation job's TRL trainer and callbacks (imported on the Ray Train worker only).

    trainer = AdapterSFTTrainer(lisa_model=lm, adapter_kind=kind, adapter_name="gsm8k",
                                distill_beta=0.0, model=lm, args=sft_config, ...)

Checkpoints hold the adapter only (not the base weights); the loss may add attention
distillation; callbacks send per-step metrics to the job's MLflow run and adapter-only
checkpoints to Ray Train.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback
from trl import SFTTrainer


def sft_config(p: dict, work: Path):
    """TRL's SFTConfig for a task profile `p` (a Profile's model_dump), checkpoints in `work`."""
    from trl import SFTConfig

    save_steps = p["save_steps"] or max(1, p["max_steps"] // 4)
    return SFTConfig(
        output_dir=str(work), max_steps=p["max_steps"], per_device_train_batch_size=p["batch_size"],
        gradient_accumulation_steps=p["grad_accum"], learning_rate=p["lr"], lr_scheduler_type="cosine",
        warmup_steps=min(10, p["max_steps"] // 10), logging_steps=1, save_steps=save_steps, save_total_limit=2,
        report_to="none", max_length=p["max_seq_len"], seed=p["seed"], use_cpu=not p["use_gpu"],
        dataloader_num_workers=0, disable_tqdm=False, save_only_model=False,
        # TRL turns activation checkpointing on by default; a 135M model does not need it, it
        # costs ~30% more compute, and its recomputation would replay the distillation hooks.
        activation_checkpointing=False,
        # TRL defaults to bf16 autocast; on this CPU its backward runs ~8x slower than fp32
        # (measured: 214 s vs 12 s per step of 8 GSM8K rows), so bf16 only on GPUs.
        bf16=bool(p["use_gpu"]),
        # Several workers: the HF Trainer sees Ray Train's process group (gloo on CPU, NCCL on
        # GPU), wraps the model in DDP and gives each worker its shard of the rows. Every
        # adapter tensor takes part in every forward: no unused-parameter search.
        ddp_find_unused_parameters=False,
    )


class AdapterSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints hold the adapter only (not the 135M base weights), and
    whose loss adds `distill_beta` x attention-distillation KL (lisa kind) when set."""

    def __init__(self, *args, lisa_model, adapter_kind, adapter_name: str, distill_beta: float = 0.0, **kwargs):
        self.lisa_model, self.adapter_kind, self.adapter_name = lisa_model, adapter_kind, adapter_name
        self.distill_beta = distill_beta
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.distill_beta or return_outputs:  # return_outputs: evaluation only
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from adapters_hub.lisa.distill import distillation

        with distillation(self.lisa_model) as d:  # collects one KL term per substituted layer
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
            kl = d.loss()
        self._metrics["train" if model.training else "eval"]["distill_kl"].append(float(kl.detach()))
        return loss + self.distill_beta * kl

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter alone, in its kind's format (the public hook; HF's checkpoints call it too).
        Every rank writes its own checkpoint folder, as before: Ray Train takes rank 0's."""
        self.adapter_kind.save(self.lisa_model, self.adapter_name, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The one private hook left: HF resumes a model that is not a PeftModel only from a full
        # state dict (model.safetensors), and our checkpoints hold the adapter alone (a few MB,
        # not the 135M base). `train(resume_from_checkpoint=...)` calls this before it restores
        # the optimizer, scheduler and trainer state, which stay HF's own.
        from safetensors.torch import load_file

        tensors = load_file(str(Path(resume_from_checkpoint) / "adapter_model.safetensors"))
        # every tensor of this adapter, trained or kept frozen (a lisa adapter's Q/K with
        # lisa_tensors=aligner): the checkpoint holds them all
        own = {k: v for k, v in self.model.named_parameters() if f".{self.adapter_name}." in k}
        loaded = 0
        for key, value in tensors.items():  # saved names lack the adapter name; match by suffix
            for full, param in own.items():
                if full.replace(f".{self.adapter_name}.", ".").endswith(key):
                    param.data.copy_(value)
                    loaded += 1
                    break
        if loaded != len(tensors):
            raise RuntimeError(f"checkpoint {resume_from_checkpoint}: {len(tensors) - loaded} tensors did not load")


class MlflowSteps(TrainerCallback):
    """Per-step training metrics into the job's MLflow run (world rank 0 only).

    A server that stops answering stops training (`lost` says why) instead of failing the
    worker: a failed worker would be restarted by Ray Train, to fail again. With several
    workers the stop is agreed at the next step's end (one all-reduce of a flag), so no
    worker is left waiting in DDP's gradient all-reduce for one that has stopped."""

    def __init__(self, tracking_uri: str, run_id: str, rank: Callable[[], int]) -> None:
        self.tracking_uri, self.run_id, self.rank = tracking_uri, run_id, rank
        self.lost: str | None = None
        self._client = None

    def on_log(self, args, state, control, logs=None, **kw):
        if self.rank() != 0 or not logs or self.lost:
            return
        import mlflow

        if self._client is None:
            self._client = mlflow.MlflowClient(self.tracking_uri)
        try:
            for key, value in logs.items():
                if isinstance(value, (int, float)):
                    self._client.log_metric(self.run_id, f"train/{key}", float(value), step=state.global_step)
        except Exception as err:  # MLflow's errors wrap connection errors in several types
            self.lost = f"{self.tracking_uri} at step {state.global_step}: {err.__class__.__name__}: {str(err)[:200]}"
            print(f"[train] MLflow lost ({self.lost}); stopping", flush=True)

    def on_step_end(self, args, state, control, **kw):
        import torch.distributed as dist

        stop = self.lost is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([int(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_training_stop = True


class ReportCheckpoints(TrainerCallback):
    """Adapter-only checkpoints to Ray Train at every HF save (and `report` for the last)."""

    def __init__(self, *, lisa_model, adapter_kind, adapter_name: str, trainable: int,
                 mlflow_steps: MlflowSteps | None = None) -> None:
        self.lm, self.kind, self.name, self.trainable = lisa_model, adapter_kind, adapter_name, trainable
        self.mlflow_steps = mlflow_steps

    def on_save(self, args, state, control, **kw):
        from transformers.trainer_utils import get_last_checkpoint

        self.report(get_last_checkpoint(args.output_dir), state, final=False)

    def report(self, hf_checkpoint, state, *, final: bool) -> None:
        """Every worker reports (Ray Train waits for all); only rank 0 sends a checkpoint:
        the adapter is the same on every worker after DDP's gradient all-reduce."""
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            ray.train.report({"step": state.global_step}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(hf_checkpoint, Path(tmp) / "checkpoint")
            self.kind.save(self.lm, self.name, Path(tmp) / "adapter")
            meta = {"history": state.log_history, "trainable": self.trainable, "final": final,
                    "mlflow_lost": self.mlflow_steps.lost if self.mlflow_steps else None}
            (Path(tmp) / "meta.json").write_text(json.dumps(meta))
            ray.train.report({"step": state.global_step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
