"""Shared-attention backbones: one per base model, made once, shared by every task adapter.

  plan = backbone_plan("smollm2-135m")     # from the registry, or analysed + registered now
  folder = backbone_folder("smollm2-135m") # the registered folder: plan.json [, adapter/]
  lm, tok = load_lisa_model("smollm2-135m", plan, general_adapter=folder / "adapter",
                            healing=healing_of(folder))   # healing merged into the weights first

The fresh adapter FRESH (permutation aligner, zero low-rank difference) is "aligned
direct sharing". A converted backbone (`jobs/convert.py`) also holds a general adapter,
fitted to keep the base's quality; when given, it is loaded as GENERAL and made active:
task adapters start from it and `lora` adapters train on top of it.

A converted backbone may also be *healed* (`healing/`: low-rank updates of its own linears
and norm scales, trained with the general adapter); `load_lisa_model` merges them into the
weights before anything else, so a token costs what it costs on an unhealed backbone, and
the backbone's fingerprint includes the healing digest (adapters of healed and unhealed
backbones never cross).

A *dense* backbone (`dense_plan`: no layer shared) is the unmodified base model, for the
`lora` baseline; its plan hash differs, so adapters never cross between the two.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

FRESH = "fresh"
GENERAL = "general"
ATTENTIONS = ("lisa", "dense")  # the backbone an adapter is trained on
CALIBRATION = {"data": "wikitext2", "n_blocks": 4, "block_len": 256, "fraction": 0.6}


def backbone_plan(base: str, *, create: bool = True, tracking_uri: str | None = None, log=print):
    """The base model's registered sharing plan; when none exists (and `create`), analyse the
    base on calibration text, register the plan as `backbone-<base>@champion`, and return it."""
    from adapters_hub import registry
    from adapters_hub.lisa.plan import SharingPlan

    folder = registry.get_backbone(base, tracking_uri=tracking_uri)
    if folder is not None:
        return SharingPlan.load(Path(folder) / "plan.json")
    if not create:
        raise LookupError(f"no backbone registered for base {base!r}; run `lisa-hub analyze --base {base} --register`")
    from adapters_hub.models import pretrained_folder

    if pretrained_folder(base) is not None:  # its plan is part of it: a plan analysed now would be another model
        raise LookupError(f"base {base!r} was pre-trained with its own plan, and backbone-{base} is not in this "
                          f"registry ({tracking_uri or 'MLFLOW_TRACKING_URI'}); register it with `lisa-hub pretrain "
                          f"... --name {base} --register`, or point MLFLOW_TRACKING_URI at the registry that has it")
    log(f"[backbone] no plan registered for {base}: analysing attention ({CALIBRATION}) ...")
    plan, report = analyse_base(base)
    with tempfile.TemporaryDirectory() as tmp:
        report.save(tmp)
        plan.save(Path(tmp) / "plan.json")
        try:
            registry.register_backbone(base, tmp, tracking_uri=tracking_uri, plan_hash=plan.hash)
        except registry.PlanExistsError:  # a job racing us registered its plan first: one plan per base
            folder = registry.get_backbone(base, tracking_uri=tracking_uri)
            log(f"[backbone] another job registered the plan of {base} first; using it")
            return SharingPlan.load(Path(folder) / "plan.json")
    log(f"[backbone] registered plan {plan.hash}: {plan.summary()}")
    return plan


def backbone_folder(base: str, *, tracking_uri: str | None = None) -> Path | None:
    """The verified local folder of the base's registered backbone (None if there is none)."""
    from adapters_hub import registry

    folder = registry.get_backbone(base, tracking_uri=tracking_uri)
    return Path(folder) if folder is not None else None


def registered_backbone_folder(base: str, *, tracking_uri: str | None = None) -> Path:
    """`backbone_folder`, or LookupError saying how to make one."""
    folder = backbone_folder(base, tracking_uri=tracking_uri)
    if folder is None:
        raise LookupError(f"no backbone registered for base {base!r}; run `lisa-hub convert --base {base} "
                          f"--register` (or `lisa-hub analyze --base {base} --register`)")
    return folder


def load_backbone(base: str, folder: Path, *, dtype=None, prune: bool = False):
    """(LisaModel, tokenizer) of a backbone folder (plan.json [, healing/, adapter/]): the
    healing merged, the general adapter active. `load_lisa_model` for the pieces."""
    from adapters_hub.lisa.plan import SharingPlan

    folder = Path(folder)
    return load_lisa_model(base, SharingPlan.load(folder / "plan.json"), dtype=dtype,
                           general_adapter=general_adapter_of(folder), healing=healing_of(folder), prune=prune)


def general_adapter_of(folder: Path | None) -> Path | None:
    """The general adapter inside a backbone folder, when it is a converted backbone."""
    if folder is None or not (Path(folder) / "adapter" / "adapter_config.json").is_file():
        return None
    return Path(folder) / "adapter"


def healing_of(folder: Path | None) -> Path | None:
    """The healing inside a backbone folder, when the conversion healed it."""
    from adapters_hub.lisa.healing import CONFIG_NAME

    if folder is None or not (Path(folder) / "healing" / CONFIG_NAME).is_file():
        return None
    return Path(folder) / "healing"


def dense_plan(base: str):
    """The plan of the dense backbone of `base`: the same shape, no layer shared."""
    from adapters_hub.lisa.plan import SharingPlan
    from adapters_hub.models import base_config

    return SharingPlan.for_config(base_config(base), [], meta={"source": "dense"})


def analyse_base(base: str, *, fraction: float = CALIBRATION["fraction"]):
    """(plan, report) from the attention analysis of `base` on the calibration text."""
    from adapters_hub.data import token_blocks, trainable_text
    from adapters_hub.lisa.analysis import analyze_attention
    from adapters_hub.lisa.plan import SharingPlan
    from adapters_hub.models import load_base

    model, tok = load_base(base)
    n, t = CALIBRATION["n_blocks"], CALIBRATION["block_len"]
    # Calibrate past the first 8 x 1024 tokens, which the perplexity benchmarks score.
    blocks = token_blocks(tok, trainable_text(CALIBRATION["data"]), n_blocks=8 * 1024 // t + n, block_len=t)[-n:]
    report = analyze_attention(model, [blocks[i : i + 1] for i in range(n)])
    return SharingPlan.from_report(report, fraction=fraction), report


def load_lisa_model(base: str, plan, *, dtype=None, general_adapter: str | Path | None = None,
                   healing: str | Path | None = None, prune: bool = False):
    """(LisaModel, tokenizer) for `base` and `plan`: the FRESH adapter, and GENERAL (active)
    when `general_adapter` is given. `healing` (a backbone's healing/ folder) is merged into
    the weights first; the model's fingerprint then names base + healing. `prune` drops
    W_q/W_k of the substituted layers (serving: the memory LiSA saves; no dense teacher or
    distillation afterwards)."""
    from adapters_hub.lisa import healing as heal
    from adapters_hub.lisa.config import LisaConfig
    from adapters_hub.lisa.model import LisaModel
    from adapters_hub import architectures
    from adapters_hub.models import base_config, fingerprint, load_base

    architectures.check(base_config(base))  # before the weights load: one line, the supported list
    model, tok = load_base(base, dtype=dtype)
    fp = None
    if healing is not None:
        fp = heal.healed_fingerprint(fingerprint(model), heal.merge(model, healing))
    aligner = "linear"
    if general_adapter is not None:  # the fresh adapter takes the general one's aligner kind
        import json

        aligner = json.loads((Path(general_adapter) / "adapter_config.json").read_text()).get("aligner", "ffn")
    lm = LisaModel(model, LisaConfig(plan=plan, aligner=aligner), adapter_name=FRESH, fingerprint=fp)
    lm.healing = str(healing) if healing is not None else None
    if general_adapter is not None:
        lm.load_adapter(general_adapter, GENERAL, activate=True)
        lm.base_adapter = GENERAL  # rows of lora-kind adapters run the LiSA layers on it
    for p in lm.parameters():
        p.requires_grad_(False)
    if prune:
        lm.prune_qk()
    return lm, tok
