"""Shared-attention backbones: one per base model, made once, shared by every task adapter.

  plan = backbone_plan("smollm2-135m")     # from the registry, or analysed + registered now
  lm, tok = build_backbone("smollm2-135m", plan)   # LisaModel with the fresh adapter FRESH

The fresh adapter (permutation aligner, zero low-rank difference) is "aligned direct
sharing": what every new task adapter starts from, and what the `lora` baseline runs on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

FRESH = "fresh"
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
    log(f"[backbone] no plan registered for {base}: analysing attention ({CALIBRATION}) ...")
    plan, report = analyse_base(base)
    with tempfile.TemporaryDirectory() as tmp:
        report.save(tmp)
        plan.save(Path(tmp) / "plan.json")
        registry.register_backbone(base, tmp, tracking_uri=tracking_uri, plan_hash=plan.hash)
    log(f"[backbone] registered plan {plan.hash}: {plan.summary()}")
    return plan


def analyse_base(base: str, *, fraction: float = CALIBRATION["fraction"]):
    """(plan, report) from the attention analysis of `base` on the calibration text."""
    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.lisa.analysis import analyze_attention
    from adapters_hub.lisa.plan import SharingPlan
    from adapters_hub.models import load_base

    model, tok = load_base(base)
    n, t = CALIBRATION["n_blocks"], CALIBRATION["block_len"]
    # Calibrate past the first 8 x 1024 tokens, which the perplexity benchmarks score.
    blocks = token_blocks(tok, load_text(CALIBRATION["data"]), n_blocks=8 * 1024 // t + n, block_len=t)[-n:]
    report = analyze_attention(model, [blocks[i : i + 1] for i in range(n)])
    return SharingPlan.from_report(report, fraction=fraction), report


def build_backbone(base: str, plan, *, dtype=None):
    """(LisaModel with the FRESH adapter active, tokenizer) for `base` and `plan`."""
    from adapters_hub.lisa.config import LisaConfig
    from adapters_hub.lisa.model import LisaModel
    from adapters_hub.models import load_base

    model, tok = load_base(base, dtype=dtype)
    lm = LisaModel(model, LisaConfig(plan=plan), adapter_name=FRESH)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok
