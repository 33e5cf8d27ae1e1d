"""Training-free attention / MLP / block drop (He et al., arXiv 2406.15786) as adapter kind "attn_drop".

    from adapters_hub.drop import DropPlan, apply_drop, restore, module_importance
    scores = module_importance(model, calib_ids)              # {"attn": [...], "mlp": [...], "block": [...]}
    plan = DropPlan.top_n(scores, n=8, target="attn")         # or iterative_plan(model, calib_ids, n=8)
    apply_drop(model, plan); ...; restore(model)

Importing this package is cheap: torch and transformers load inside the functions.
"""

from adapters_hub.drop.plan import DropConfig, DropPlan
from adapters_hub.drop.importance import (
    calibration_blocks,
    iterative_plan,
    layer_importance,
    make_plan,
    module_importance,
)
from adapters_hub.drop.model import (
    KIND,
    AdapterMismatchError,
    DropAdapter,
    active_plan,
    apply_drop,
    cache_bytes,
    kv_cache_bytes_per_token,
    restore,
)

__all__ = [
    "KIND", "AdapterMismatchError", "DropAdapter", "DropConfig", "DropPlan", "active_plan", "apply_drop",
    "cache_bytes", "calibration_blocks", "iterative_plan", "kv_cache_bytes_per_token", "layer_importance",
    "make_plan", "module_importance", "restore",
]
