"""Many LoRA adapters on one model, routed row by row (S-LoRA / Punica's idea in plain torch).

A target `nn.Linear` keeps its weight and its state-dict names. `add(...)` gives it, per
adapter name, a low-rank update W x + scale * B (A x) (A: (r, in), B: (out, r), B = 0 at
start, PEFT's init) in ModuleDicts under the adapter kind's prefix:

    q_proj.lora_A.<name>.weight        a `lora`-kind adapter (PEFT's own key names)
    o_proj.lisa_lora_A.<name>.weight   the LoRA parts of a `lisa` adapter (saved, loaded and
                                       trained with its other `lisa_` tensors)

and one forward hook per linear adds the updates. Which adapters apply comes from the
model's `LoraRouter`:

    router.rows is None   every row gets the active adapters (training, `Backbone.use`):
                          two matmuls per active adapter
    router.rows = names   row b gets names[b]'s update, if that adapter has one here:
      route "gather"      rows' A and B gathered by adapter index from the stacked factors
                          (cached while the batch's names stay the same: a decode step
                          costs two bmm per linear, whatever the mix)
      route "loop"        row by row, the reference path the tests compare against

Rows whose adapter has no update on a linear (a lisa-only adapter, the bare backbone) get a
zero slot, so any mix of adapters decodes in one batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PREFIXES = ("lora_", "lisa_lora_")  # kinds: lora, lisa (its LoRA parts)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class LoraPartsError(ValueError):
    """An invalid LoRA-parts field; the message starts with the field name."""


@dataclass(frozen=True)
class LoraParts:
    """Which linears of which layers get a low-rank update, and its rank.

    targets: projection names (`PROJECTIONS`; "mlp" = gate/up/down_proj); layers: "all" or
    "shared" (only the LiSA-substituted layers)."""

    r: int = 4
    alpha: float | None = None          # None = 2 r (scale 2, as our LoRA default r=8, alpha=16)
    targets: tuple[str, ...] = ("o_proj", "v_proj", "mlp")
    layers: str = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise LoraPartsError(f"r: must be a positive integer, got {self.r!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise LoraPartsError(f"alpha: must be > 0 or None, got {self.alpha!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in (*PROJECTIONS, "mlp")]
        if unknown or not self.targets:
            raise LoraPartsError(f"targets: {unknown or 'none'} not among {', '.join((*PROJECTIONS, 'mlp'))}")
        if self.layers not in ("all", "shared"):
            raise LoraPartsError(f"layers: {self.layers!r} is not one of all, shared")

    @property
    def scale(self) -> float:
        return (self.alpha or 2 * self.r) / self.r

    @property
    def projections(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.targets:
            out += list(MLP) if t == "mlp" else [t]
        return tuple(dict.fromkeys(out))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> "LoraParts | None":
        if data is None:
            return None
        known = {"r", "alpha", "targets", "layers"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraPartsError(f"{unknown[0]}: unknown field of lora_parts (known: {', '.join(sorted(known))})")
        return cls(**data)


class LoraRouter:
    """Which adapters a model's LoRA hooks apply: `active` (kind -> name, for all rows) or,
    inside `LisaModel.adapter_per_row`, one name per row (`rows`). `route`: "gather" (fast)
    or "loop" (reference); bound with the model's fast_path."""

    def __init__(self) -> None:
        self.active: dict[str, str | None] = {}
        self.rows: list[str] | None = None
        self.unique: frozenset[str] = frozenset()  # set(rows), computed once per batch, not per linear
        self.route = "gather"
        self.linears: list["_Site"] = []


def router_of(model: nn.Module) -> LoraRouter:
    """The model's router (created on first use; it lives on the model object)."""
    router = model.__dict__.get("_lora_router")
    if router is None:
        router = model.__dict__["_lora_router"] = LoraRouter()
    return router


class _Site:
    """The hook state of one target linear: adapter name -> (prefix, scale)."""

    def __init__(self, linear: nn.Linear, router: LoraRouter) -> None:
        self.linear, self.router = linear, router
        self.adapters: dict[str, tuple[str, float]] = {}
        self._stack_key: tuple | None = None
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None  # rows' A^T (B, in, r), scale*B^T (B, r, out)
        self.handle = linear.register_forward_hook(self._hook)

    def factors(self, name: str) -> tuple[nn.Linear, nn.Linear, float]:
        prefix, scale = self.adapters[name]
        return getattr(self.linear, f"{prefix}A")[name], getattr(self.linear, f"{prefix}B")[name], scale

    def changed(self) -> None:
        self._stack_key = self._stack = None

    def _hook(self, module, args, out: torch.Tensor) -> torch.Tensor:
        if not self.adapters:
            return out
        x = args[0]
        router = self.router
        names = router.rows
        if names is None:
            for name in {n for n in router.active.values() if n in self.adapters}:
                out = self._add_delta(out, name, x)
            return out
        unique = router.unique
        if not any(n in self.adapters for n in unique):
            return out
        if len(unique) == 1:
            return self._add_delta(out, names[0], x)
        if router.route == "loop" or x.dim() != 3 or torch.is_grad_enabled():  # the stack holds no graph
            return self._per_row_loop(names, x, out)
        a_t, b_t = self._gathered(names, x)
        # x (B, T, in) @ A^T (B, in, r) -> (B, T, r) @ scale B^T (B, r, out) -> (B, T, out)
        return out + torch.bmm(torch.bmm(x, a_t), b_t)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b, scale = self.factors(name)
        return F.linear(F.linear(x.to(a.weight.dtype), a.weight), b.weight) * scale

    def _add_delta(self, out: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """out + scale B (A x): in place at inference (few ops: this runs on every target linear)."""
        if torch.is_grad_enabled():
            return out + self._delta(name, x)
        a, b, scale = self.factors(name)
        return out.add_(F.linear(F.linear(x.to(a.weight.dtype), a.weight), b.weight), alpha=scale)

    def _per_row_loop(self, names, x, out):
        rows = []
        for i, name in enumerate(names):
            row = out[i : i + 1]
            rows.append(row + self._delta(name, x[i : i + 1]) if name in self.adapters else row)
        return torch.cat(rows, 0)

    def _gathered(self, names, x) -> tuple[torch.Tensor, torch.Tensor]:
        # the weights' in-place versions too: factors changed without `changed()` are restacked
        versions = tuple(self.factors(n)[i].weight._version for n in sorted(set(names) & set(self.adapters))
                         for i in (0, 1))
        key = (tuple(names), x.dtype, x.device, versions)
        if self._stack_key != key:
            order = sorted({n for n in names if n in self.adapters})
            slot = {n: i + 1 for i, n in enumerate(order)}          # 0: the zero slot
            r = max(self.factors(n)[0].out_features for n in order)
            d_in, d_out = self.linear.in_features, self.linear.out_features
            a_all = x.new_zeros(len(order) + 1, d_in, r)             # (N+1, in, r)
            b_all = x.new_zeros(len(order) + 1, r, d_out)            # (N+1, r, out)
            with torch.no_grad():
                for n in order:
                    a, b, scale = self.factors(n)
                    rank = a.out_features
                    a_all[slot[n], :, :rank] = a.weight.t().to(x.dtype)
                    b_all[slot[n], :rank] = (b.weight.t() * scale).to(x.dtype)
            index = torch.tensor([slot.get(n, 0) for n in names], device=x.device)
            self._stack = (a_all.index_select(0, index), b_all.index_select(0, index))  # (B, in, r), (B, r, out)
            self._stack_key = key
        return self._stack


def _decoder_layers(model: nn.Module):
    from adapters_hub.lisa.model import decoder_of

    return decoder_of(model).layers


def _linear(layer: nn.Module, proj: str) -> nn.Linear | None:
    parent = layer.mlp if proj in MLP else layer.self_attn
    linear = getattr(parent, proj, None)
    return linear if isinstance(linear, nn.Linear) else None


def add(model: nn.Module, adapter_name: str, parts: LoraParts, *, prefix: str, layers: list[int] | None = None,
        skip: set[tuple[int, str]] = frozenset(), dtype: torch.dtype | None = None) -> int:
    """Give `adapter_name` a fresh low-rank update (B = 0) on every target linear of `layers`
    (None: all) but the (layer, projection) pairs in `skip`; returns the number of new
    parameters. requires_grad is the caller's to set (the kinds do)."""
    if prefix not in PREFIXES:
        raise ValueError(f"prefix: {prefix!r} is not one of {', '.join(PREFIXES)}")
    router = router_of(model)
    count = 0
    for i, layer in enumerate(_decoder_layers(model)):
        if layers is not None and i not in layers:
            continue
        for proj in parts.projections:
            linear = None if (i, proj) in skip else _linear(layer, proj)
            if linear is None:  # pruned (W_q/W_k of a substituted layer): nothing runs there
                continue
            site = getattr(linear, "_lora_site", None)
            if site is None:
                site = linear._lora_site = _Site(linear, router)
                router.linears.append(site)
            if adapter_name in site.adapters:
                raise ValueError(f"adapter_name: {adapter_name!r} already has a LoRA update on layer {i} {proj}")
            for side in ("A", "B"):
                if not hasattr(linear, f"{prefix}{side}"):
                    linear.add_module(f"{prefix}{side}", nn.ModuleDict())
            w = linear.weight
            a = nn.Linear(linear.in_features, parts.r, bias=False, device=w.device, dtype=dtype or w.dtype)
            b = nn.Linear(parts.r, linear.out_features, bias=False, device=w.device, dtype=dtype or w.dtype)
            nn.init.kaiming_uniform_(a.weight, a=5 ** 0.5)  # PEFT's init: A random, B zero
            nn.init.zeros_(b.weight)
            getattr(linear, f"{prefix}A")[adapter_name] = a
            getattr(linear, f"{prefix}B")[adapter_name] = b
            site.adapters[adapter_name] = (prefix, parts.scale)
            site.changed()
            count += a.weight.numel() + b.weight.numel()
    return count


def delete(model: nn.Module, adapter_name: str) -> None:
    """Remove every LoRA update of `adapter_name` (nothing if it has none)."""
    router = router_of(model)
    for site in router.linears:
        if adapter_name in site.adapters:
            prefix, _ = site.adapters.pop(adapter_name)
            del getattr(site.linear, f"{prefix}A")[adapter_name]
            del getattr(site.linear, f"{prefix}B")[adapter_name]
            site.changed()
    for kind, name in list(router.active.items()):
        if name == adapter_name:
            router.active[kind] = None


def changed(model: nn.Module) -> None:
    """Weights of some adapter were replaced (load): drop the stacked per-row factors."""
    for site in router_of(model).linears:
        site.changed()


def has_parts(model: nn.Module, adapter_name: str) -> bool:
    return any(adapter_name in site.adapters for site in router_of(model).linears)
