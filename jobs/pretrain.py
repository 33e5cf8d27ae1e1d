"""Pre-training job: a small LiSA decoder from random initialisation (the LiSA paper's third
mode), trained beside a dense twin of the same width, steps and batches, and registered as
a base of its own with its backbone.

Run (from the repository root):

    lisa-hub pretrain --config bytes-6l --plan-fraction 0.5 --steps 600 --register
    python -m jobs.pretrain --config bytes-6l --plan-fraction 0.5 --steps 600     # same thing
    sdk.submit_pretraining(config="bytes-6l", plan_fraction=0.5)                   # as a Ray job

The plan is fixed before training, with no donor analysis (there is no trained attention to
analyse): `plan_fraction` of the layers, spread by position (`layers_by_position`; layer 0
stays dense), each reading its nearest layer below with identity head order, at the rank
the config's `lisa.rank` gives. Every weight trains (the base's and the LiSA tensors), except
the W_q / W_k a shared layer never runs. Steps: 1 tokens: the training text and evaluation
blocks of the conversion job (`token_split`; WikiText-2's held-out tail is never read)
2 both models, one optimiser each, the same batch at every step, in Ray Train, with
checkpoints of both (a re-run resumes) and per-step losses in MLflow   3 the base folder
(HF layout, `lisa-hub` loads it by name) and the backbone folder (plan + the LiSA tensors
as its general adapter) under LISA_HUB_HOME/pretrained/<name>   4 perplexity of the LiSA
model loaded exactly as serving loads it, and of the dense twin   5 with --register, the
registered models `base-<name>` and `backbone-<name>`. Last line: `LISA_HUB_RESULT {json}`.

A config (manifests/pretrain/<name>.json, or a path) holds `model` (transformers config
fields, `model_type` one of the supported families), `tokenizer` ("bytes", or a base whose
tokenizer to use) and `lisa` ({"rank": r}).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from pydantic import field_validator

from jobs import runtime

GENERAL = "general"  # the backbone's general adapter: here, the LiSA tensors trained from scratch
PRESETS = Path(__file__).resolve().parents[1] / "manifests" / "pretrain"
CONFIG_KEYS = {"description", "tokenizer", "model", "lisa"}

warnings.filterwarnings("ignore", message='Field name "register" in "PretrainSpec" shadows', category=UserWarning)


class PretrainSpec(runtime.JobSpec):
    config: str = "bytes-6l"       # a preset of manifests/pretrain or a JSON file
    name: str | None = None        # the base's name; default <config>-lisa<percent>
    plan_fraction: float = 0.5     # share this fraction of the layers (by position)
    rank: int | None = None        # low-rank Q/K of a shared layer; default the config's lisa.rank
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    dense: bool = True             # train the dense twin beside it (the comparison)
    eval_blocks: int = 8
    eval_len: int = 512
    save_every: int = 50
    register: bool = False
    fresh_start: bool = False

    @field_validator("plan_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError("must be in (0, 1): some layers shared, layer 0 dense")
        return value

    @field_validator("steps", "batch_size", "seq_len", "eval_blocks", "eval_len", "save_every")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", value):
            raise ValueError("lower-case letters, digits, '.', '_' and '-' only (it names a folder and "
                             "registered models)")
        return value

    def base_name(self) -> str:
        return self.name or f"{Path(self.config).stem}-lisa{round(self.plan_fraction * 100)}"


def load_config(config: str) -> dict:
    """The config file as validated data: a preset name (manifests/pretrain/<name>.json) or a
    path. Raises ValueError naming the file and the key."""
    path = Path(config).expanduser()
    if not path.suffix:
        path = PRESETS / f"{config}.json"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise ValueError(f"config: {config!r} is neither a file nor a preset ({', '.join(presets)})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config: {path}: not JSON ({err})") from None
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config: {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
    if not isinstance(data.get("model"), dict) or "model_type" not in data["model"]:
        raise ValueError(f"config: {path}: 'model' must be an object with a model_type")
    rank = data.get("lisa", {}).get("rank")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"config: {path}: lisa.rank must be a positive integer, got {rank!r}")
    return {"tokenizer": "bytes", "lisa": {}, **data, "path": str(path)}


def model_config(config: dict, vocab: int):
    """The transformers config of the model to train; an unsupported family fails here."""
    from transformers import AutoConfig

    from adapters_hub import architectures

    fields = dict(config["model"])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    architectures.check(cfg)
    if cfg.vocab_size < vocab:
        raise ValueError(f"config: {config['path']}: model.vocab_size {cfg.vocab_size} is smaller than the "
                         f"tokenizer's {vocab} tokens")
    return cfg


def tokenizer_of(config: dict):
    from adapters_hub.models import byte_tokenizer, load_tokenizer

    return byte_tokenizer() if config["tokenizer"] == "bytes" else load_tokenizer(config["tokenizer"])


def plan_of(spec: PretrainSpec, cfg, config: dict):
    from adapters_hub.lisa.plan import SharingPlan, default_rank, layers_by_position

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rank = spec.rank or config["lisa"].get("rank") or default_rank(head_dim)
    return SharingPlan.for_config(cfg, layers_by_position(cfg.num_hidden_layers, spec.plan_fraction), rank=rank,
                                  meta={"origin": "pretrain", "config": Path(config["path"]).stem})


def main(spec: PretrainSpec) -> dict:
    import torch

    from adapters_hub import registry, settings
    from adapters_hub.backbone import load_backbone
    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa.convert import token_split

    t0 = time.perf_counter()
    config = load_config(spec.config)
    tok = tokenizer_of(config)
    cfg = model_config(config, len(tok))
    plan = plan_of(spec, cfg, config)
    name = spec.base_name()
    uri = settings.mlflow_uri() if spec.register else None
    if uri:
        registry.Registry(tracking_uri=uri).client()  # probe: fail before any work
    runtime.connect()  # settled in seconds, before the training
    runtime.use_all_cores()
    print(f"[pretrain] {name}: {config['path']} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}); {plan.summary(cfg.num_key_value_heads)}; {spec.steps} steps of "
          f"{spec.batch_size} x {spec.seq_len} tokens" + (", with a dense twin" if spec.dense else ""), flush=True)

    # 2. both models on Ray Train --------------------------------------------------------
    run_key = _run_key(spec, config)
    run_id = _start_run(uri, spec, name, plan) if uri else None
    train_cfg = {"spec": spec.model_dump(), "config": config, "plan": plan.to_dict(), "tracking_uri": uri,
                 "run_id": run_id}
    t = time.perf_counter()
    result = runtime.fit(train_loop, train_cfg, run_key=run_key, fresh_start=spec.fresh_start,
                         log_prefix="[pretrain]")
    train_seconds = time.perf_counter() - t
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / "state.pt", weights_only=True)

    # 3. the base folder and the backbone folder -------------------------------------------
    folder = settings.home() / "pretrained" / name
    shutil.rmtree(folder, ignore_errors=True)
    fp = _write_folders(folder, cfg, tok, plan, state["models"]["lisa"], config)

    # 4. evaluation: the LiSA model as serving loads it, the dense twin as trained ------------
    split = token_split(tok, eval_blocks=spec.eval_blocks, eval_len=spec.eval_len, calib_blocks=0,
                        train_len=spec.seq_len)
    lm, _ = load_backbone(name, folder / "backbone")
    if lm.base_fingerprint != fp:
        raise RuntimeError(f"{folder}: the reloaded base is not the one written (fingerprint {lm.base_fingerprint} "
                           f"vs {fp})")
    metrics = {"lisa.perplexity": perplexity(lm.eval(), split.eval, progress=False)}
    if spec.dense:
        dense = _fresh_model(cfg, spec.seed)
        dense.load_state_dict(state["models"]["dense"])
        metrics["dense.perplexity"] = perplexity(dense.eval(), split.eval, progress=False)
        metrics["ppl_ratio"] = metrics["lisa.perplexity"] / metrics["dense.perplexity"]
    kvh = cfg.num_key_value_heads
    metrics.update(kv_ratio=plan.kv_ratio(kvh), shared_layers=float(len(plan.shared)), steps=float(state["step"]),
                   train_seconds=train_seconds, **{"lisa.parameters_run": float(_weights(lm)["run"])})
    if spec.dense:
        metrics["dense.parameters_run"] = float(_weights(dense)["run"])
    for k, v in metrics.items():
        print(f"[eval] {k} = {v:.4f}", flush=True)
    (folder / "backbone" / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (folder / "history.json").write_text(json.dumps(state["history"]) + "\n")
    _plot_losses(state["history"], metrics, folder / "loss_curve.png")
    print(f"[pretrain] {folder}: base/, backbone/, loss_curve.png", flush=True)

    # 5. registration ---------------------------------------------------------------------
    out = {"base": name, "plan_hash": plan.hash, "layers": list(plan.layers), "metrics": metrics,
           "folder": str(folder), "seconds": round(time.perf_counter() - t0, 1)}
    if uri:
        out.update(_register(uri, run_id, name, folder, plan, fp, metrics))
    runtime.delete_run(run_key, "[pretrain]")  # done: a later run of this spec starts fresh
    runtime.print_result(out)
    return out


# ----------------------------------------------------------------------------- training


def train_loop(cfg: dict) -> None:
    """Runs on the Ray Train worker: both models, one AdamW each, the same batches, cosine
    decay after a linear warm-up; a checkpoint of both every `save_every` steps."""
    import ray.train
    import torch

    from adapters_hub.lisa.convert import token_split
    from adapters_hub.lisa.plan import SharingPlan

    spec, config = PretrainSpec(**cfg["spec"]), cfg["config"]
    tok = tokenizer_of(config)
    model_cfg = model_config(config, len(tok))
    models = _models(model_cfg, SharingPlan.from_dict(cfg["plan"]), spec)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=spec.lr, betas=(0.9, 0.95),
                                 weight_decay=spec.weight_decay) for k, m in models.items()}
    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", weights_only=True)
        for k, m in models.items():
            _hf(m).load_state_dict(state["models"][k])
            opts[k].load_state_dict(state["optimizers"][k])
        step, history = state["step"], state["history"]
        print(f"[train] resuming from checkpoint at step {step}", flush=True)
    for k, m in models.items():
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"[train] {k}: {trainable:,} trainable parameters ({_weights(m)['total']:,} in all)", flush=True)
    train = token_split(tok, eval_blocks=spec.eval_blocks, eval_len=spec.eval_len, calib_blocks=0,
                        train_len=spec.seq_len).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed))
    client = None
    if cfg["tracking_uri"] and cfg["run_id"]:
        import mlflow

        client = mlflow.MlflowClient(cfg["tracking_uri"])

    def save() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"models": {k: _hf(m).state_dict() for k, m in models.items()},
                        "optimizers": {k: o.state_dict() for k, o in opts.items()},
                        "step": step, "history": history}, Path(tmp) / "state.pt")
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    start = time.perf_counter()
    for m in models.values():
        m.train()
    while step < spec.steps:
        ids = train[order[(torch.arange(spec.batch_size) + step * spec.batch_size) % len(train)]]  # (B, T)
        lr = spec.lr * _schedule(step, spec.steps, spec.warmup_steps)
        losses = {}
        for k, m in models.items():
            for group in opts[k].param_groups:
                group["lr"] = lr
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            losses[k] = float(loss.detach())
        step += 1
        history.append({"step": step, **losses})
        if step == 1 or step % 10 == 0:
            took = time.perf_counter() - start
            print(f"[train] step {step:5d}/{spec.steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
                  + f"  lr {lr:.2e}  {took:.0f}s", flush=True)
            if client is not None:
                for k, v in losses.items():
                    client.log_metric(cfg["run_id"], f"{k}/train_loss", v, step=step)
        if step % spec.save_every == 0 or step == spec.steps:
            save()


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _fresh_model(cfg, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial weights for both models and on every restart
        return AutoModelForCausalLM.from_config(cfg)


def _models(cfg, plan, spec: PretrainSpec) -> dict:
    """{"lisa": the LiSA model, "dense": its twin}: the same initial weights. Every weight of
    the LiSA model trains but the W_q / W_k its shared layers never run."""
    from adapters_hub.lisa import LisaConfig, LisaModel

    base = _fresh_model(cfg, spec.seed)
    models = {"dense": copy.deepcopy(base)} if spec.dense else {}
    lm = LisaModel(base, LisaConfig(plan=plan), adapter_name=GENERAL)
    idle = _idle_names(lm)
    for name, p in lm.model.named_parameters():
        p.requires_grad_(not any(part in name for part in idle))
    return {"lisa": lm, **models}


def _hf(model):
    """The HF model inside (a LisaModel's state dict keys gain `model.`; its HF model's hold
    the lisa_ tensors under the base's own names)."""
    from adapters_hub.lisa import LisaModel

    return model.model if isinstance(model, LisaModel) else model


def _idle_names(model) -> tuple[str, ...]:
    """Parameter-name parts of the projections a LiSA model stores but never runs (none for a dense one)."""
    from adapters_hub.lisa import LisaModel

    if not isinstance(model, LisaModel):
        return ()
    return tuple(f"layers.{i}.self_attn.{proj}." for i, proj in model.idle_projections())


def _weights(model) -> dict[str, int]:
    """{"total": parameters, "run": those a forward step uses}: a LiSA model's idle W_q / W_k
    are stored, never run; of its adapters only the active one counts (a loaded backbone
    also holds the identity-initialised "fresh" one that new task adapters start from)."""
    hf, active = _hf(model), getattr(model, "active_adapter", None)
    idle = _idle_names(model)
    sizes = {n: p.numel() for n, p in hf.named_parameters() if "lisa_" not in n or f".{active}." in n}
    return {"total": sum(sizes.values()), "run": sum(v for n, v in sizes.items() if not any(i in n for i in idle))}


def _write_folders(folder: Path, cfg, tok, plan, lisa_state: dict, config: dict) -> str:
    """<folder>/base (the HF model: every trained weight; a shared layer's W_q / W_k stay at
    their initial values, never run) and <folder>/backbone (plan.json, adapter/ = the LiSA
    tensors as the general adapter, stamped with the base's fingerprint). Returns it."""
    from adapters_hub.lisa import LisaConfig, LisaModel
    from adapters_hub.models import fingerprint

    base = _fresh_model(cfg, 0)
    base.load_state_dict({k: v for k, v in lisa_state.items() if "lisa_" not in k})
    base.config.lisa_hub_pretrained = {"plan_hash": plan.hash, "config": Path(config["path"]).stem}
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    (folder / "base" / "README.md").write_text(
        "A LiSA model pre-trained from scratch by `lisa-hub pretrain`. Its shared layers never ran their "
        "own W_q / W_k: load it with its backbone (`../backbone`, or `backbone-<name>` in the registry), "
        "not as a dense model.\n")
    fp = fingerprint(base)
    lm = LisaModel(base, LisaConfig(plan=plan), adapter_name=GENERAL, fingerprint=fp)
    missing = lm.model.load_state_dict({k: v for k, v in lisa_state.items() if "lisa_" in k}, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"LiSA tensors the backbone does not have: {missing.unexpected_keys[:3]}")
    lm.save_adapter(folder / "backbone" / "adapter", GENERAL)
    plan.save(folder / "backbone" / "plan.json")
    return fp


# ----------------------------------------------------------------------------- MLflow


def _start_run(uri: str, spec: PretrainSpec, name: str, plan) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lisa-hub/pretrain")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("lisa-hub/pretrain")
    run = client.create_run(experiment_id, run_name=f"pretrain-{name}")
    for key, value in spec.model_dump().items():
        client.log_param(run.info.run_id, key, value)
    client.log_param(run.info.run_id, "plan_hash", plan.hash)
    return run.info.run_id


def _plot_losses(history: list[dict], metrics: dict, path: Path) -> None:
    """Training loss of both models against the step (a running mean over 20 steps), with
    their evaluation perplexities in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("lisa", "dense"):
        if history and key in history[0]:
            values = [h[key] for h in history]
            smooth = [sum(values[max(0, i - 19): i + 1]) / len(values[max(0, i - 19): i + 1])
                      for i in range(len(values))]
            ppl = metrics.get(f"{key}.perplexity")
            ax.plot([h["step"] for h in history], smooth,
                    label=key + (f" (eval perplexity {ppl:.2f})" if ppl else ""))
    ax.set(xlabel="step", ylabel="training loss (nats / token)", title="from scratch, same batches")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _register(uri: str, run_id: str, name: str, folder: Path, plan, fp: str, metrics: dict) -> dict:
    import mlflow

    from adapters_hub import registry

    client = mlflow.MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.log_artifact(run_id, str(folder / "loss_curve.png"))
    reg = registry.Registry(tracking_uri=uri)
    base = reg.register_base(name, folder / "base", run_id=run_id, base_fingerprint=fp)
    backbone = reg.register_backbone(name, folder / "backbone", run_id=run_id, plan_hash=plan.hash,
                                     base_fingerprint=fp, replace=True)
    client.set_terminated(run_id, "FINISHED")
    print(f"[pretrain] registered {base.name} version {base.version} and {backbone.name} version "
          f"{backbone.version} (alias champion)", flush=True)
    return {"model_name": backbone.name, "version": str(backbone.version), "base_model_name": base.name,
            "base_version": str(base.version), "run_id": run_id}


def _run_key(spec: PretrainSpec, config: dict) -> str:
    """The same spec and config content: the same run (a config file submitted through the
    SDK travels under another path, and resumes what a local run left)."""
    fields = {k: v for k, v in spec.model_dump().items() if k not in ("config", "register", "fresh_start")}
    content = {k: v for k, v in config.items() if k != "path"}
    return f"pretrain-{hashlib.sha256(json.dumps([fields, content], sort_keys=True).encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PretrainSpec()
    parser.add_argument("--config", default=d.config, help="a preset of manifests/pretrain or a JSON file")
    parser.add_argument("--name", default=None, help="the base's name (default <config>-lisa<percent>)")
    parser.add_argument("--plan-fraction", type=float, default=d.plan_fraction,
                        help="share this fraction of the layers, spread by position")
    parser.add_argument("--rank", type=int, default=None, help="low-rank Q/K rank (default: the config's lisa.rank)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=d.dense,
                        help="train the dense twin beside it (the comparison)")
    parser.add_argument("--eval-blocks", type=int, default=d.eval_blocks)
    parser.add_argument("--eval-len", type=int, default=d.eval_len)
    parser.add_argument("--save-every", type=int, default=d.save_every)
    parser.add_argument("--register", action="store_true", help="register base-<name> and backbone-<name> in MLflow")
    parser.add_argument("--fresh-start", action="store_true", help="ignore checkpoints of an interrupted run")


def parse_args(argv: list[str] | None = None) -> PretrainSpec:
    return runtime.parse_spec(argv, prog="python -m jobs.pretrain", description=__doc__.split("\n")[0],
                              add_arguments=add_arguments, spec_type=PretrainSpec)


if __name__ == "__main__":
    runtime.run_main(main, parse_args, "pretrain")
