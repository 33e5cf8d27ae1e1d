"""Conversion job: turn a dense base model into a LiSA backbone that keeps its quality, and
register it (sharing plan + general adapter) as the base's backbone.

Run (from the repository root):

    python -m jobs.convert --base smollm2-135m --fraction 0.6 --minutes 15 --out runs/smollm2-60
    lisa-hub convert --base smollm2-135m --max-ppl-increase 0.05 --register     # same thing
    sdk.submit_conversion(base_model="smollm2-135m", fraction=0.6)             # as a Ray job (registers)

Steps: 1 tokens: eval / calibration / training (adapters_hub.lisa.convert.token_split; the
held-out tail of WikiText-2 is never read)   2 attention analysis (head permutations)
3 sensitivity of every layer after local initialisation, and the plan: the --fraction
least sensitive layers, or the most whose combined perplexity stays within
--max-ppl-increase of the base   4 local initialisation of the plan's layers (no backward
through the model)   5 self-distillation in Ray Train: KL to the dense teacher (the same
weights, adapters disabled), adapter-only checkpoints, a re-run resumes   6 perplexity of
base / aligned sharing / local init / converted   7 --out folder (plan.json, report.json,
local_init.json, adapter/, README.md) and, with --register, an MLflow run and a new
version of `backbone-<base>` (alias champion) whose adapter/ every task adapter of this
base starts from. The last line printed is `LISA_HUB_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from pydantic import Field, model_validator

from jobs import runtime
GENERAL = "general"  # adapter name of the general adapter inside a converted backbone
# Fitted by benchmarks/convert_smollm2.py on SmolLM2 (two healed conversions, 40% for 10 and 60% for 20
# CPU-minutes: 0.855 and 0.459, mean 0.657; a weak proxy, see the README):
# log(converted / base) = PLANNER_EXPONENT * log(probe / base); see the README's table.
PLANNER_EXPONENT = 0.66


# `register` (the CLI's --register) shadows ABCMeta.register of pydantic's metaclass, which no
# one calls on a spec; pydantic warns once at class creation.
warnings.filterwarnings("ignore", message='Field name "register" in "ConvertSpec" shadows', category=UserWarning)


class ConvertSpec(runtime.JobSpec):
    base: str = "smollm2-135m"
    fraction: float | None = None          # default 0.6 when max_ppl_increase is not given either
    max_ppl_increase: float | None = None  # e.g. 0.05: predicted converted perplexity <= 1.05 x base
    planner: str = "converted"             # what --max-ppl-increase judges: "converted" (the perplexity a
                                           # conversion is predicted to reach from the local-init probe) or
                                           # "init" (the probe itself, as before)
    planner_exponent: float = PLANNER_EXPONENT  # converted = base * (probe / base) ** exponent
    kv_budget: float | None = None         # e.g. 0.5: the first plan (greedy by sensitivity per KV byte saved)
                                           # whose KV cache is at most this fraction of dense
    drop_attention: bool = False           # --kv-budget / --max-ppl-increase may also drop layers' attention
                                           # (a hybrid plan: keep, share or drop each layer; a drop scan is
                                           # added to the sensitivity scan, ~1 CPU-min on SmolLM2)
    layers: list[int] | None = None        # substitute exactly these layers (no sensitivity scan)
    dropped: list[int] | None = None       # with --layers: drop exactly these layers' attention
    choose_by: str = "sensitivity"         # --fraction's layers: "sensitivity" (a scan of every layer after
                                           # local init, ~9 CPU-min on SmolLM2) or "analysis" (attention
                                           # divergence to the donor: seconds; the demo's choice)
    ranks: str = "uniform"                 # "uniform": floor(head_dim / 6) everywhere; "sensitivity": the most
    rank_boost: float = 2.0                #   sensitive third of the shared layers get rank_boost x that rank
    init_only: bool = False                # stop after local initialisation
    minutes: float = 15.0                  # wall-clock budget of the self-distillation
    max_steps: int = 100_000
    tokens: int | None = None              # a token budget instead of minutes: steps = tokens / (batch x seq_len)
    device: str = "cpu"                    # "cuda": the driver and the Train worker on the GPU
    dtype: str = "auto"                    # autocast of the distillation step: "bfloat16", "float32", or "auto"
                                           # (bf16 where its matmuls are native: runtime.amp_dtype)
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-3                       # LiSA tensors (aligner, rank-r Q/K)
    # objective (adapters_hub.lisa.convert.Objective); defaults: the winner of
    # benchmarks/objectives_smollm2.py on the dev blocks
    kd_weight: float = 1.0                 # KL to the teacher's next-token distribution
    kd_temperature: float = 1.0            # softened KL, scaled by T^2 (SwiftKV: 2; not better here, see README)
    hidden_weight: float = 0.0             # relative MSE of the last hidden states
    attn_weight: float = 0.0               # attention KL of the substituted layers
    lm_weight: float = 0.0                 # next-token cross-entropy
    # healing (adapters_hub.lisa.healing): low-rank updates of the model's own weights,
    # merged into the backbone; heal_targets [] turns it off
    heal_targets: list[str] = Field(default_factory=lambda: ["o_proj", "v_proj", "mlp"])
    heal_layers: str = "all"               # "all" | "shared" (substituted layers only)
    heal_rank: int = 8
    heal_alpha: float = 16.0
    heal_norms: bool = True                # RMSNorm scales too
    heal_lr: float = 4e-3                  # benchmarks/objectives_smollm2.py --heal-lrs: best of 2e-4, 1e-3, 4e-3 on dev
    init_steps: int = 150                  # Adam steps of local initialisation per layer
    sensitivity_steps: int = 50            # the same, for each one-layer plan of the sensitivity scan
    aligner: str = "linear"
    eval_blocks: int = 8
    eval_len: int = 1024
    calib_blocks: int = 16
    calib_len: int = 256                   # tokens per calibration block; past 256 local initialisation samples
                                           # 256 x 256 / calib_len queries a step (same cost, far distances fitted)
    save_every: int = 25                   # checkpoint every N steps
    out: str | None = None
    register: bool = False
    fresh_start: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ConvertSpec":
        from adapters_hub.lisa.config import ALIGNERS

        if sum(x is not None for x in (self.fraction, self.max_ppl_increase, self.kv_budget, self.layers)) > 1:
            raise ValueError("fraction: give one of --fraction, --max-ppl-increase, --kv-budget and --layers")
        if self.dropped is not None and self.layers is None:
            raise ValueError("dropped: give it with --layers (an explicit plan); the planner drops by itself "
                             "with --drop-attention")
        if self.drop_attention and self.max_ppl_increase is None and self.kv_budget is None:
            raise ValueError("drop_attention: needs --kv-budget or --max-ppl-increase (the planner's target)")
        if self.kv_budget is not None and not 0 < self.kv_budget < 1:
            raise ValueError(f"kv_budget: must be in (0, 1) (a fraction of the dense KV cache), got {self.kv_budget}")
        if (self.fraction is None and self.max_ppl_increase is None and self.kv_budget is None
                and self.layers is None):
            self.fraction = 0.6
        if self.layers is not None and not all(isinstance(l, int) and l >= 1 for l in self.layers):
            raise ValueError(f"layers: must be a list of layer indices >= 1, got {self.layers!r}")
        if self.layers is not None and not self.layers and not self.dropped:
            raise ValueError("layers: an empty plan; give layers to share (or --dropped layers to drop)")
        if self.dropped is not None:
            if not all(l >= 1 for l in self.dropped) or len(set(self.dropped)) != len(self.dropped):
                raise ValueError(f"dropped: must be distinct layer indices >= 1, got {self.dropped!r}")
            if both := sorted(set(self.dropped) & set(self.layers or ())):
                raise ValueError(f"dropped: layers {both} are also in --layers; a layer is shared or dropped")
            if not self.layers and not self.heal_targets:
                raise ValueError("dropped: a plan that only drops has nothing to train without healing; "
                                 "keep --heal-targets or give --layers")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"fraction: must be in (0, 1), got {self.fraction}")
        if self.max_ppl_increase is not None and not self.max_ppl_increase >= 0:
            raise ValueError(f"max_ppl_increase: must be >= 0, got {self.max_ppl_increase}")
        if self.aligner not in ALIGNERS:
            raise ValueError(f"aligner: {self.aligner!r} is not one of {', '.join(ALIGNERS)}")
        for name in ("minutes", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "batch_size", "seq_len", "init_steps", "eval_blocks", "eval_len", "calib_len",
                     "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.calib_blocks < 4:
            raise ValueError(f"calib_blocks: need at least 4 calibration blocks, got {self.calib_blocks}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not one of cpu, cuda")
        if self.dtype not in runtime.DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(runtime.DTYPES)}")
        if self.tokens is not None and not (isinstance(self.tokens, int) and self.tokens >= self.batch_size * self.seq_len):
            raise ValueError(f"tokens: must be an integer >= batch_size x seq_len = {self.batch_size * self.seq_len}, "
                             f"got {self.tokens!r}")
        if self.planner not in ("converted", "init"):
            raise ValueError(f"planner: {self.planner!r} is not one of converted, init")
        if not self.planner_exponent > 0:
            raise ValueError(f"planner_exponent: must be > 0, got {self.planner_exponent}")
        if self.choose_by not in ("sensitivity", "analysis"):
            raise ValueError(f"choose_by: {self.choose_by!r} is not one of sensitivity, analysis")
        if self.choose_by == "analysis" and self.fraction is None:
            raise ValueError("choose_by: 'analysis' picks --fraction's layers; give --fraction")
        if self.ranks not in ("uniform", "sensitivity"):
            raise ValueError(f"ranks: {self.ranks!r} is not one of uniform, sensitivity")
        if self.ranks == "sensitivity" and (self.layers is not None or self.choose_by == "analysis"):
            raise ValueError("ranks: 'sensitivity' needs the sensitivity scan (no --layers, --choose-by sensitivity)")
        if not self.rank_boost >= 1:
            raise ValueError(f"rank_boost: must be >= 1, got {self.rank_boost}")
        if not self.heal_lr > 0:
            raise ValueError(f"heal_lr: must be > 0, got {self.heal_lr}")
        self.objective()
        self.healing()
        return self

    def budget(self) -> tuple[float, int]:
        """(minutes, max_steps) of the distillation: a token budget fixes the steps, not the time."""
        if self.tokens is not None:
            return 1e9, min(self.max_steps, self.tokens // (self.batch_size * self.seq_len))
        return self.minutes, self.max_steps

    def objective(self):
        from adapters_hub.lisa.convert import Objective

        return Objective(kd_weight=self.kd_weight, kd_temperature=self.kd_temperature, hidden_weight=self.hidden_weight,
                         attn_weight=self.attn_weight, lm_weight=self.lm_weight)

    def healing(self):
        """The HealingConfig, or None when heal_targets is empty."""
        from adapters_hub.lisa.healing import HealingConfig

        if not self.heal_targets:
            return None
        return HealingConfig(rank=self.heal_rank, alpha=self.heal_alpha, targets=tuple(self.heal_targets),
                             layers=self.heal_layers, norms=self.heal_norms)


def main(spec: ConvertSpec) -> dict:
    import torch

    from adapters_hub import registry, settings
    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, analyze_attention
    from adapters_hub.lisa.convert import token_split
    from adapters_hub.lisa.local_init import local_init, queries_for
    from adapters_hub.models import fingerprint, load_base

    t0 = time.perf_counter()
    uri = settings.mlflow_uri() if spec.register else None
    if uri:
        registry.Registry(tracking_uri=uri).client()  # probe: fail before any work
    if not spec.init_only:  # settle the Ray connection (in seconds) before minutes of analysis, not after them
        runtime.connect()
    runtime.use_all_cores()
    torch.manual_seed(0)
    choice = {"fraction": spec.fraction, "max_ppl_increase": spec.max_ppl_increase, "kv_budget": spec.kv_budget,
              "drop_attention": spec.drop_attention or None, "layers": spec.layers, "dropped": spec.dropped}
    print(f"[convert] base={spec.base} " + " ".join(f"{k}={v}" for k, v in choice.items() if v is not None), flush=True)
    model, tok = load_base(spec.base)
    fp = fingerprint(model)
    model.to(_device(spec.device))
    split = token_split(tok, eval_blocks=spec.eval_blocks, eval_len=spec.eval_len,
                        calib_blocks=spec.calib_blocks, calib_len=spec.calib_len, train_len=spec.seq_len)
    print(f"[convert] tokens: eval {tuple(split.eval.shape)}, calibration {tuple(split.calib.shape)}, "
          f"training {tuple(split.train.shape)}", flush=True)

    # 2-3. analysis, sensitivities after local init, plan --------------------------------
    report = analyze_attention(model, [split.calib[i : i + 1] for i in range(4)], progress=False, base=spec.base)
    plan, sensitivity = _choose_plan(spec, model, report, split.calib, fp)
    print(f"[convert] {plan.summary(model.config.num_key_value_heads)}", flush=True)

    # 4. local initialisation --------------------------------------------------------------
    lm = LisaModel(model, LisaConfig(plan=plan, aligner=spec.aligner), adapter_name=GENERAL, fingerprint=fp)
    t = time.perf_counter()
    fits = local_init(lm, split.calib, steps=spec.init_steps, queries=queries_for(spec.calib_len))
    init_seconds = time.perf_counter() - t
    work = Path(tempfile.mkdtemp(prefix="lisa-convert-"))
    lm.save_adapter(work / "init", GENERAL)

    # 5. self-distillation on Ray Train ----------------------------------------------------
    run_key = _run_key(spec, plan.hash)
    run_id = _start_run(uri, spec, plan) if uri else None
    history: list[dict] = []
    adapter_dir, healing_dir = work / "init", None
    train_seconds = 0.0
    if not spec.init_only:
        cfg = {"spec": spec.model_dump(), "plan": plan.to_dict(), "init_dir": str(work / "init"), "tracking_uri": uri,
               "run_id": run_id}
        t = time.perf_counter()
        adapter_dir, healing_dir, history = _train_on_ray(cfg, run_key=run_key, fresh_start=spec.fresh_start)
        train_seconds = time.perf_counter() - t

    # 6. evaluation ------------------------------------------------------------------------
    metrics = _evaluate(lm, split.eval, adapter_dir, healing_dir, perplexity)
    if healing_dir is not None:  # the general adapter, and every adapter of this backbone, name base + healing
        from adapters_hub.lisa.healing import stamp_adapter

        fp = stamp_adapter(adapter_dir, healing_dir)
    kvh = model.config.num_key_value_heads
    metrics.update(kv_bytes_per_token=float(plan.kv_bytes_per_token(kvh)),
                   kv_ratio=plan.kv_ratio(kvh))
    metrics.update(init_seconds=init_seconds, train_seconds=train_seconds, shared_layers=len(plan.shared),
                   dropped_layers=len(plan.dropped), fraction=plan.fraction, steps=float(history[-1]["step"]) if history else 0.0)
    for k, v in metrics.items():
        print(f"[eval] {k} = {v:.4f}", flush=True)

    # 7. the backbone folder, registration ---------------------------------------------------
    folder = _write_backbone(Path(spec.out) if spec.out else work / "backbone", plan, report, fits,
                             sensitivity, adapter_dir, healing_dir, metrics, spec)
    result = {"base": spec.base, "plan_hash": plan.hash, "layers": list(plan.layers), "dropped": list(plan.dropped),
              "metrics": metrics,
              "folder": str(folder), "seconds": round(time.perf_counter() - t0, 1)}
    if uri:
        result.update(_register(uri, spec, plan, fp, folder, metrics, history, run_id=run_id))
    if not spec.init_only:
        runtime.delete_run(run_key, "[convert]")  # done: a later run starts fresh
        shutil.rmtree(adapter_dir.parent, ignore_errors=True)  # this run's copy of its last checkpoint
    runtime.print_result(result)
    return result


# ----------------------------------------------------------------------------- pieces


def _choose_plan(spec: ConvertSpec, model, report, calib, fp):
    """(plan, {layer: perplexity increase}) from sensitivities after local initialisation
    (or the given `layers`, unmeasured)."""
    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel
    from adapters_hub.lisa.analysis import layer_sensitivity
    from adapters_hub.lisa.local_init import local_init, queries_for
    from adapters_hub.lisa.plan import SharingPlan, choose_layers, predicted_converted_ppl

    if spec.layers is not None:
        if max(spec.layers + (spec.dropped or [])) >= report.num_layers:
            raise ValueError(f"layers: {spec.layers} / dropped {spec.dropped} has a layer past the last one "
                             f"({report.num_layers - 1})")
        return SharingPlan.from_layers(report, spec.layers, dropped=spec.dropped or (),
                                       meta={"source": "convert", "aligner": spec.aligner}), {}
    if spec.choose_by == "analysis":
        plan = SharingPlan.from_report(report, fraction=spec.fraction)
        return SharingPlan.from_layers(report, plan.layers, meta={"source": "convert", "choose_by": "analysis",
                                                                  "fraction": spec.fraction, "aligner": spec.aligner}), {}
    half = len(calib) // 2  # fit on the first half, measure on the second
    fit, measure = calib[:half], calib[half:]
    t = time.perf_counter()
    queries = queries_for(spec.calib_len)
    base_ppl, sensitivity = layer_sensitivity(model, report, measure, fit_blocks=fit, fit_steps=spec.sensitivity_steps,
                                              fit_queries=queries, aligner=spec.aligner, fingerprint=fp, progress=True)
    report.base_ppl, report.sensitivity = base_ppl, sensitivity
    print(f"[convert] sensitivities of {len(sensitivity)} layers after local init ({time.perf_counter() - t:.0f}s); "
          f"base calibration perplexity {base_ppl:.2f}", flush=True)

    def combined_ppl(layers, dropped=()) -> float:
        plan = SharingPlan.from_layers(report, layers, rank=dict(layers) if isinstance(layers, dict) else None,
                                       dropped=dropped)
        lm = LisaModel(model, LisaConfig(plan=plan, aligner=spec.aligner), fingerprint=fp)
        try:
            local_init(lm, fit, steps=spec.sensitivity_steps, queries=queries, log=None)
            ppl = perplexity(lm, measure, progress=False)
        finally:
            lm.unload()
        what = f"{len(layers)} shared" + (f" + {len(dropped)} dropped" if dropped else "")
        if spec.planner == "init":
            print(f"[convert]   {what}: calibration perplexity after local init {ppl:.2f} "
                  f"({ppl / base_ppl - 1:+.1%})", flush=True)
            return ppl
        predicted = predicted_converted_ppl(ppl, base_ppl, spec.planner_exponent)
        print(f"[convert]   {what}: after local init {ppl:.2f} ({ppl / base_ppl - 1:+.1%}), predicted "
              f"converted {predicted:.2f} ({predicted / base_ppl - 1:+.1%})", flush=True)
        return predicted

    from adapters_hub.lisa.plan import default_rank, ranks_by_sensitivity

    meta = {"source": "convert", "fraction": spec.fraction, "max_ppl_increase": spec.max_ppl_increase,
            "kv_budget": spec.kv_budget, "drop_attention": spec.drop_attention, "aligner": spec.aligner,
            "ranks": spec.ranks}
    if spec.kv_budget is not None or spec.drop_attention:  # the hybrid planner (sharing only without drops)
        from adapters_hub.lisa.analysis import drop_sensitivity
        from adapters_hub.lisa.plan import choose_hybrid

        drops: dict[int, float] = {}
        if spec.drop_attention:
            t = time.perf_counter()
            _, drops = drop_sensitivity(model, measure, fingerprint=fp, progress=True)
            report.drop_sensitivity = drops
            print(f"[convert] drop sensitivities of {len(drops)} layers ({time.perf_counter() - t:.0f}s)", flush=True)
        base_rank = default_rank(report.head_dim)
        ranks = (ranks_by_sensitivity(sensitivity, sensitivity, base_rank=base_rank, boost=spec.rank_boost,
                                      max_rank=report.head_dim - 1) if spec.ranks == "sensitivity"
                 else {l: base_rank for l in sensitivity})
        shared, dropped = choose_hybrid(sensitivity, drops, num_layers=report.num_layers, head_dim=report.head_dim,
                                        ranks=ranks, kv_budget=spec.kv_budget, max_ppl_increase=spec.max_ppl_increase,
                                        base_ppl=base_ppl, combined_ppl=combined_ppl)
        return SharingPlan.from_layers(report, shared, rank=shared, dropped=dropped, meta=meta), sensitivity
    layers = choose_layers(sensitivity, num_layers=report.num_layers, fraction=spec.fraction,
                           max_ppl_increase=spec.max_ppl_increase, base_ppl=base_ppl, combined_ppl=combined_ppl)
    rank = None
    if spec.ranks == "sensitivity":
        rank = ranks_by_sensitivity(layers, sensitivity, base_rank=default_rank(report.head_dim),
                                    boost=spec.rank_boost, max_rank=report.head_dim - 1)
    return SharingPlan.from_layers(report, layers, rank=rank, meta=meta), sensitivity


def _evaluate(lm, blocks, adapter_dir: Path, healing_dir: Path | None, perplexity) -> dict[str, float]:
    """WikiText-2 perplexity of the dense base, aligned direct sharing (fresh adapter), the
    local initialisation and the converted backbone (healing merged, as serving loads it),
    on the same eval blocks. Merging is last: it changes `lm`'s weights for good."""
    from adapters_hub.lisa import LisaConfig
    from adapters_hub.lisa.healing import merge

    metrics = {}
    with lm.disable_adapter():
        metrics["base.perplexity"] = perplexity(lm, blocks, progress=False)
    lm.add_adapter("aligned", LisaConfig(plan=lm.plan, aligner=lm.peft_config[GENERAL].aligner))
    lm.set_adapter("aligned")
    metrics["aligned.perplexity"] = perplexity(lm, blocks, progress=False)
    lm.set_adapter(GENERAL)
    metrics["init.perplexity"] = perplexity(lm, blocks, progress=False)
    if adapter_dir.name != "init":
        lm.load_adapter(adapter_dir, "converted", activate=True)
        if healing_dir is not None:
            merge(lm.model, healing_dir)
        metrics["converted.perplexity"] = perplexity(lm, blocks, progress=False)
    else:
        metrics["converted.perplexity"] = metrics["init.perplexity"]
    metrics["converted.ppl_ratio"] = metrics["converted.perplexity"] / metrics["base.perplexity"]
    return metrics


def _write_backbone(folder: Path, plan, report, fits, sensitivity, adapter_dir, healing_dir, metrics, spec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plan.save(folder / "plan.json")
    report.save(folder)  # report.json (+ heatmap.png with the sensitivities)
    if report.sensitivity or report.drop_sensitivity:
        from adapters_hub.lisa.analysis import plan_figure

        plan_figure(plan, report, folder / "plan.png")  # per layer: keep / share / drop, and both sensitivities
    (folder / "local_init.json").write_text(json.dumps([f.to_dict() for f in fits], indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder / "adapter", ignore_errors=True)
    shutil.copytree(adapter_dir, folder / "adapter")
    shutil.rmtree(folder / "healing", ignore_errors=True)
    if healing_dir is not None:
        shutil.copytree(healing_dir, folder / "healing")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    heal_note = ("healing/: low-rank updates of the model's own linears and norm scales, merged into the "
                 "weights at load (a served token costs what it costs unhealed)." if healing_dir else "No healing.")
    fit_rows = "\n".join(f"| {f.layer} | {f.donor} | {f.kl_before:.4f} | {f.kl_after:.4f} |" for f in fits)
    (folder / "README.md").write_text(
        f"# LiSA backbone of {spec.base}\n\n{plan.summary()}\n\n"
        f"Load it as serving does: `sdk.Backbone.load(base_model=\"{spec.base}\", plan_path=\"<this folder>\")`.\n"
        f"{heal_note}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        f"Local initialisation, attention KL to the original layer (held-out calibration blocks):\n\n"
        f"| layer | donor | before | after |\n|---|---|---|---|\n{fit_rows}\n")
    return folder


def _start_run(uri: str, spec: ConvertSpec, plan) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lisa-hub/convert")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("lisa-hub/convert")
    run = client.create_run(experiment_id, run_name=f"convert-{spec.base}",
                            tags={"base_model": spec.base, "plan_hash": plan.hash,
                                  "ray_job_id": os.environ.get("RAY_JOB_SUBMISSION_ID", "")})
    for key, value in spec.model_dump().items():
        if value is not None:
            client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def _register(uri, spec, plan, fp, folder, metrics, history, *, run_id) -> dict:
    import mlflow

    from adapters_hub import registry

    client = mlflow.MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.log_artifacts(run_id, str(folder), "backbone")
    _log_curve(client, run_id, history)
    registered = registry.register_backbone(spec.base, folder, tracking_uri=uri, run_id=run_id, plan_hash=plan.hash,
                                            base_fingerprint=fp, replace=True)  # fp names base + healing
    client.set_terminated(run_id, "FINISHED")
    print(f"[convert] registered {registered.name} version {registered.version} (alias champion)", flush=True)
    return {"model_name": registered.name, "version": str(registered.version), "run_id": run_id}


def _log_curve(client, run_id: str, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        ax.plot([h["step"] for h in history], [h["kd"] for h in history], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("KL to the dense teacher (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    client.log_figure(run_id, fig, "distillation_curve.png")
    plt.close(fig)


def _run_key(spec: ConvertSpec, plan_hash: str) -> str:
    fields = {k: v for k, v in spec.model_dump().items() if k not in ("out", "register", "fresh_start")}
    return f"convert-{hashlib.sha256(json.dumps([fields, plan_hash], sort_keys=True).encode()).hexdigest()[:10]}"


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but torch sees no GPU here")
    return torch.device(name)


def _train_on_ray(cfg: dict, *, run_key: str, fresh_start: bool) -> tuple[Path, Path | None, list[dict]]:
    """Run `train_loop` on Ray Train (jobs.runtime.fit: shared-storage check, retries of a
    failed worker from its newest checkpoint, GPU when asked); (adapter dir, healing dir or
    None, history)."""
    spec = cfg["spec"]
    result = runtime.fit(train_loop, cfg, run_key=run_key, use_gpu=spec["device"] == "cuda",
                         fresh_start=fresh_start, log_prefix="[convert]")
    runtime.run_dir(run_key).parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"{run_key}-", dir=runtime.run_dir(run_key).parent))
    healing_out = None
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "adapter", out / "adapter")
        if (Path(ckpt) / "healing").is_dir():
            healing_out = out / "healing"
            shutil.copytree(Path(ckpt) / "healing", healing_out)
        history = json.loads((Path(ckpt) / "state.json").read_text())["history"]
    return out / "adapter", healing_out, history


def train_loop(cfg: dict) -> None:
    """Runs on the Ray Train worker: self-distillation of the general adapter only, with
    adapter-only checkpoints (adapter, optimizer, DistillState) every `save_every` steps."""
    import ray.train
    import torch

    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, healing
    from adapters_hub.lisa.convert import DistillState, distill_optimizer, self_distill, token_split
    from adapters_hub.models import load_base

    spec = ConvertSpec(**cfg["spec"])
    model, tok = load_base(spec.base)
    model.to(_device(spec.device))
    lm = LisaModel(model, LisaConfig(plan=SharingPlan.from_dict(cfg["plan"]), aligner=spec.aligner),
                   adapter_name="fresh")
    state = DistillState()
    with contextlib.ExitStack() as stack:
        ckpt = ray.train.get_checkpoint()
        resume = Path(stack.enter_context(ckpt.as_directory())) if ckpt else None
        lm.load_adapter(resume / "adapter" if resume else Path(cfg["init_dir"]), GENERAL, activate=True)
        lm.delete_adapter("fresh")
        heal_cfg = spec.healing()
        if heal_cfg is not None:  # after the adapter: set_adapter resets requires_grad of non-LiSA tensors
            healing.attach(lm.model, heal_cfg, shared_layers=lm.plan.layers + lm.plan.dropped)  # the changed layers
            if resume and (resume / "healing").is_dir():
                healing.load_into(lm.model, resume / "healing")
        opt = distill_optimizer(lm, lr=spec.lr, heal_lr=spec.heal_lr)
        if resume:
            state = DistillState(**json.loads((resume / "state.json").read_text()))
            opt.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
            print(f"[train] resuming from checkpoint at step {state.step}", flush=True)
    train = token_split(tok, eval_blocks=spec.eval_blocks, eval_len=spec.eval_len, calib_blocks=spec.calib_blocks,
                        calib_len=spec.calib_len,
                        train_len=spec.seq_len).train
    minutes, max_steps = spec.budget()
    amp = runtime.amp_dtype(spec.dtype, spec.device)  # resolved here: the worker's hardware decides
    print(f"[train] {sum(p.numel() for p in lm.parameters() if p.requires_grad):,} trainable parameters "
          f"({'healing ' + str(heal_cfg) if heal_cfg else 'no healing'}); {len(train)} training blocks of "
          f"{spec.seq_len}; budget " + (f"{spec.tokens:,} tokens ({max_steps} steps)" if spec.tokens else
                                         f"{minutes:g} min or {max_steps} steps")
          + f" on {spec.device} ({torch.get_num_threads()} threads, {'bf16 autocast' if amp else 'fp32'})", flush=True)
    client = None
    if cfg["tracking_uri"] and cfg["run_id"]:
        import mlflow

        client = mlflow.MlflowClient(cfg["tracking_uri"])

    def save(state: DistillState) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            lm.save_adapter(Path(tmp) / "adapter", GENERAL)
            if heal_cfg is not None:
                healing.save(lm.model, Path(tmp) / "healing")
            torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
            (Path(tmp) / "state.json").write_text(json.dumps(asdict(state)))
            ray.train.report({"step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def on_step(state: DistillState, parts: dict) -> None:
        if state.step == 1 or state.step % 5 == 0:
            print(f"[train] step {state.step:5d}  " + "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
                  + f"  {state.elapsed:.0f}s", flush=True)
            if client is not None:
                for key, value in parts.items():
                    client.log_metric(cfg["run_id"], f"train/{key}", value, step=state.step)
        if state.step % spec.save_every == 0:
            save(state)

    state = self_distill(lm, train, minutes=minutes, max_steps=max_steps, batch_size=spec.batch_size,
                         amp_dtype=amp,
                         lr=spec.lr, heal_lr=spec.heal_lr, objective=spec.objective(), optimizer=opt, state=state,
                         on_step=on_step)
    if state.step % spec.save_every:  # the last step's checkpoint is the result
        save(state)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from adapters_hub.models import BASE_MODELS

    d = ConvertSpec()
    parser.add_argument("--base", default=d.base, help=f"base model ({', '.join(BASE_MODELS)} or a HF id)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, default=None, help="share this fraction of the layers (default 0.6)")
    group.add_argument("--max-ppl-increase", type=float, default=None,
                       help="share the most layers whose predicted converted perplexity stays within this of the base")
    group.add_argument("--kv-budget", type=float, default=None,
                       help="the first plan whose KV cache is at most this fraction of dense, e.g. 0.5")
    group.add_argument("--layers", type=_layer_list, default=None, help="share exactly these layers, e.g. 2,3,5")
    parser.add_argument("--drop-attention", action="store_true",
                        help="let --kv-budget / --max-ppl-increase drop layers' attention too (a hybrid plan)")
    parser.add_argument("--dropped", type=_layer_list, default=None,
                        help="with --layers: drop exactly these layers' attention, e.g. 4,7")
    parser.add_argument("--planner", default=d.planner, choices=("converted", "init"),
                        help="what --max-ppl-increase judges: predicted converted perplexity, or the local-init one")
    parser.add_argument("--planner-exponent", type=float, default=d.planner_exponent)
    parser.add_argument("--choose-by", default=d.choose_by, choices=("sensitivity", "analysis"),
                        help="how --fraction picks layers: measured sensitivity (slow) or attention divergence (fast)")
    parser.add_argument("--ranks", default=d.ranks, choices=("uniform", "sensitivity"),
                        help="rank of each shared layer's Q/K: one rank, or more for the most sensitive third")
    parser.add_argument("--rank-boost", type=float, default=d.rank_boost)
    parser.add_argument("--init-only", action="store_true", help="stop after local initialisation")
    parser.add_argument("--minutes", type=float, default=d.minutes, help="self-distillation wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=d.max_steps)
    parser.add_argument("--tokens", type=int, default=None, help="token budget of the distillation (instead of --minutes)")
    parser.add_argument("--device", default=d.device, choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=d.dtype, choices=runtime.DTYPES,
                        help="the distillation step's precision; auto: bf16 autocast where bf16 is native")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate of the LiSA tensors")
    parser.add_argument("--kd-weight", type=float, default=d.kd_weight)
    parser.add_argument("--kd-temperature", type=float, default=d.kd_temperature)
    parser.add_argument("--hidden-weight", type=float, default=d.hidden_weight)
    parser.add_argument("--attn-weight", type=float, default=d.attn_weight)
    parser.add_argument("--lm-weight", type=float, default=d.lm_weight)
    parser.add_argument("--heal-targets", type=_name_list, default=d.heal_targets,
                        help="linears to heal: o_proj,v_proj,mlp (gate/up/down_proj); 'none' turns healing off")
    parser.add_argument("--heal-layers", default=d.heal_layers, choices=("all", "shared"))
    parser.add_argument("--heal-rank", type=int, default=d.heal_rank)
    parser.add_argument("--heal-alpha", type=float, default=d.heal_alpha)
    parser.add_argument("--heal-norms", action=argparse.BooleanOptionalAction, default=d.heal_norms)
    parser.add_argument("--heal-lr", type=float, default=d.heal_lr)
    parser.add_argument("--init-steps", type=int, default=d.init_steps)
    parser.add_argument("--sensitivity-steps", type=int, default=d.sensitivity_steps)
    parser.add_argument("--aligner", default=d.aligner, choices=("linear", "ffn"))
    parser.add_argument("--eval-blocks", type=int, default=d.eval_blocks)
    parser.add_argument("--eval-len", type=int, default=d.eval_len)
    parser.add_argument("--calib-blocks", type=int, default=d.calib_blocks)
    parser.add_argument("--calib-len", type=int, default=d.calib_len,
                        help="tokens per calibration block (1024: local init fits far distances, same cost)")
    parser.add_argument("--save-every", type=int, default=d.save_every)
    parser.add_argument("--out", default=None, help="write the backbone folder here (plan.json, adapter/, ...)")
    parser.add_argument("--register", action="store_true", help="register it as backbone-<base> in MLflow")
    parser.add_argument("--fresh-start", action="store_true", help="ignore checkpoints of an interrupted run")


def _name_list(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [x.strip() for x in text.split(",") if x.strip()]


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> ConvertSpec:
    return runtime.parse_spec(argv, prog="python -m jobs.convert", description=__doc__.split("\n")[0],
                              add_arguments=add_arguments, spec_type=ConvertSpec)


if __name__ == "__main__":
    runtime.run_main(main, parse_args, "convert")
