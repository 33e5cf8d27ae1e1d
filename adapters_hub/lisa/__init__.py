"""LiSA (cross-layer attention sharing) for HF LLaMA-family models.

    report = analyze_attention(model, blocks)               # analysis.py
    plan = SharingPlan.from_report(report, fraction=0.6)    # plan.py
    lm = LisaModel(model, LisaConfig(plan=plan))            # model.py (modules in layer.py)
    with distillation(lm) as d: ...                         # distill.py

The sharing scheme is sketched in the docstring of `adapters_hub.lisa.layer`. Names are
imported lazily so that `import adapters_hub.lisa` (e.g. by the CLI) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SharingPlan": "plan", "SharedLayer": "plan", "PlanError": "plan", "default_rank": "plan",
    "LisaConfig": "config", "LisaConfigError": "config",
    "LisaModel": "model", "AdapterMismatchError": "model", "SharingPatch": "model",
    "analyze_attention": "analysis", "AttentionReport": "analysis", "layer_sensitivity": "analysis",
    "distillation": "distill", "AttentionDistiller": "distill",
    "LisaAttention": "layer", "ScoredAttention": "layer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"adapters_hub.lisa.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'adapters_hub.lisa' has no attribute {name!r}")
