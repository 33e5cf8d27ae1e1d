"""Apply a `DropPlan` to a loaded HF LLaMA-family model, undo it, save/load it as an adapter.

    apply_drop(model, plan)      skip the plan's branches (reversible, in place)
    restore(model)               the original model again (exact logits)
    active_plan(model)           the applied plan, or None
    kv_cache_bytes_per_token(m)  K+V bytes per token, measured on a real cache after a forward
    DropAdapter                  adapter kind "attn_drop": a folder with adapter_config.json only

KV cache slots. With a dropped attention a layer never writes the cache, but transformers
asks the cache for the sequence length and the mask size at slot 0 (the first full-attention
slot): if layer 0's attention were dropped, an empty slot 0 would give wrong positions and
masks while decoding. So while a plan is applied, the kept attention layers are renumbered
to consecutive cache slots 0..K-1 (`self_attn.layer_idx`); slots K.. stay empty (a
DynamicCache allocates nothing for a slot that is never updated). `restore` puts the
original indices back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapters_hub.drop import layer as drop_layer
from adapters_hub.drop.plan import DropConfig, DropPlan
from adapters_hub.errors import AdapterMismatchError

if TYPE_CHECKING:
    from torch import nn

KIND = "attn_drop"
CONFIG_FILE = "adapter_config.json"
_PLAN_ATTR = "_lisa_hub_drop_plan"        # on the top-level model while a plan is applied
_LAYER_IDX_ATTR = "_lisa_hub_orig_layer_idx"  # on self_attn modules that were renumbered


def decoder_layers(model: "nn.Module") -> "nn.ModuleList":
    """The decoder layers of a causal LM (`model.model.layers` in the LLaMA family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"{type(model).__name__}: no decoder layers at model.model.layers; attention drop supports LLaMA-family models"
        )
    return layers


def active_plan(model: "nn.Module") -> DropPlan | None:
    return getattr(model, _PLAN_ATTR, None)


def apply_drop(model: "nn.Module", plan: DropPlan) -> "nn.Module":
    """Make `model` skip what `plan` drops, in place. Raises if a plan is already applied."""
    if not isinstance(plan, DropPlan):
        raise TypeError(f"apply_drop: plan must be a DropPlan, got {type(plan).__name__}")
    if active_plan(model) is not None:
        raise RuntimeError("apply_drop: a drop plan is already applied to this model; call restore(model) first")
    layers = decoder_layers(model)
    if plan.num_layers != len(layers):
        raise ValueError(f"DropPlan.num_layers: plan is for {plan.num_layers} layers, the model has {len(layers)}")
    for i, layer in enumerate(layers):
        drop_layer.check_llama_like(layer, i)
    if plan.attn or plan.block:
        _check_uniform_layer_types(model)

    for i, layer in enumerate(layers):
        attn, mlp = plan.skips_attention(i), plan.skips_mlp(i)
        if attn or mlp:
            drop_layer.install(layer, attn=attn, mlp=mlp)
    # Kept attention layers -> consecutive cache slots (see the module docstring).
    slot = 0
    for i, layer in enumerate(layers):
        if plan.skips_attention(i) or getattr(layer.self_attn, "dropped", False):  # (or dropped by a LiSA plan)
            continue
        attn_module = layer.self_attn
        setattr(attn_module, _LAYER_IDX_ATTR, attn_module.layer_idx)
        attn_module.layer_idx = slot
        slot += 1
    setattr(model, _PLAN_ATTR, plan)
    return model


def restore(model: "nn.Module") -> DropPlan | None:
    """Undo `apply_drop`; returns the plan that was applied (None when there was none)."""
    plan = active_plan(model)
    if plan is None:
        return None
    for layer in decoder_layers(model):
        drop_layer.uninstall(layer)
        attn_module = layer.self_attn
        if hasattr(attn_module, _LAYER_IDX_ATTR):
            attn_module.layer_idx = getattr(attn_module, _LAYER_IDX_ATTR)
            delattr(attn_module, _LAYER_IDX_ATTR)
    delattr(model, _PLAN_ATTR)
    return plan


def _check_uniform_layer_types(model) -> None:
    # Renumbering cache slots is only sound when every slot has the same kind of cache layer.
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise NotImplementedError(
            f"attention drop: config.layer_types mixes {sorted(set(types))}; only models whose layers all use "
            "the same attention kind are supported (cache slots are renumbered)"
        )


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers Cache."""
    total = 0
    for cache_layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(cache_layer, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def kv_cache_bytes_per_token(model: "nn.Module", *, n_tokens: int = 16) -> float:
    """K+V cache bytes per token, measured: one forward of `n_tokens` with use_cache=True,
    then the bytes in the returned cache / n_tokens."""
    import torch

    device = next(model.parameters()).device
    ids = torch.arange(n_tokens, device=device).remainder(model.config.vocab_size).unsqueeze(0)  # (1, n)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return cache_bytes(cache) / n_tokens


def base_name(model) -> str:
    cfg = model.config
    return getattr(cfg, "lisa_hub_base", None) or getattr(cfg, "_name_or_path", "") or type(model).__name__


@dataclass
class DropAdapter:
    """Adapter kind "attn_drop": a training-free plan for one base model. No tensors.

    >>> adapter = DropAdapter.for_model(model, plan)
    >>> adapter.save("out/drop8"); adapter = DropAdapter.load("out/drop8", model=model)
    >>> adapter.activate(model); ...; adapter.deactivate(model)
    """

    plan: DropPlan
    base: str
    base_fingerprint: str
    drop_config: DropConfig | None = None
    extra: dict = field(default_factory=dict)  # free-form metadata (e.g. calibration summary)

    kind = KIND

    @classmethod
    def for_model(cls, model, plan: DropPlan, *, drop_config: DropConfig | None = None, **extra) -> "DropAdapter":
        """An adapter of `plan` for this base (fingerprint taken from `model`, plan or not:
        applying a plan does not change the weights or their names)."""
        from adapters_hub.models import fingerprint

        if plan.num_layers != len(decoder_layers(model)):
            raise ValueError(f"DropPlan.num_layers: plan is for {plan.num_layers} layers, the model has "
                             f"{len(decoder_layers(model))}")
        return cls(plan, base_name(model), fingerprint(model), drop_config, dict(extra))

    def to_dict(self) -> dict:
        return {
            "kind": KIND,
            "base_model": self.base,
            "base_fingerprint": self.base_fingerprint,
            "plan": self.plan.to_dict(),
            "plan_hash": self.plan.hash(),
            "drop_config": self.drop_config.to_dict() if self.drop_config else None,
            "extra": self.extra,
        }

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model=None) -> "DropAdapter":
        """Read an adapter folder; with `model`, also refuse it unless it was made for that base."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not an adapter folder")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("kind") != KIND:
            raise ValueError(f"{path}: kind: expected {KIND!r}, got {data.get('kind')!r}")
        for key in ("base_model", "base_fingerprint", "plan", "plan_hash"):
            if key not in data:
                raise ValueError(f"{path}: {key}: missing")
        plan = DropPlan.from_dict(data["plan"])
        if plan.hash() != data["plan_hash"]:
            raise ValueError(f"{path}: plan_hash: {data['plan_hash']} does not match the plan ({plan.hash()}); "
                             "the file was edited or is corrupt")
        cfg = DropConfig.from_dict(data["drop_config"]) if data.get("drop_config") else None
        adapter = cls(plan, data["base_model"], data["base_fingerprint"], cfg, data.get("extra") or {})
        if model is not None:
            adapter.check_base(model)
        return adapter

    def check_base(self, model) -> None:
        from adapters_hub.models import fingerprint

        actual = fingerprint(model)
        if actual != self.base_fingerprint:
            raise AdapterMismatchError(
                f"attn_drop adapter was made for base {self.base!r} (fingerprint {self.base_fingerprint}); "
                f"this model is {base_name(model)!r} with fingerprint {actual}. Refusing to apply it to another base."
            )

    def activate(self, model, *, check: bool = True) -> None:
        """Switch the plan on (replacing another drop plan if one is active)."""
        current = active_plan(model)
        if current is not None and current == self.plan:
            return
        if check:
            self.check_base(model)
        restore(model)
        apply_drop(model, self.plan)

    def deactivate(self, model) -> None:
        """Switch the plan off: the base model again, exactly."""
        if active_plan(model) is not None and active_plan(model) != self.plan:
            raise RuntimeError("deactivate: the model has a different drop plan applied")
        restore(model)
