"""The sharing plan of a backbone: which layers reuse which donor's attention scores.

A plan is made once per base model (usually from an `AttentionReport`) and shared by every
task adapter of that backbone; an adapter records the plan's hash and refuses a backbone
with another plan.

    plan = SharingPlan.from_report(report, fraction=0.6, protect_first=2)
    plan = SharingPlan.explicit(num_layers=30, num_heads=9, head_dim=64, layers=[5, 6, 7])
    plan.save("plan.json"); SharingPlan.load("plan.json").hash == plan.hash
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from adapters_hub.lisa.analysis import AttentionReport


class PlanError(ValueError):
    """An invalid sharing plan; the message starts with the offending field."""


def default_rank(head_dim: int) -> int:
    """Rank of the low-rank Q/K of a substituted layer: floor(head_dim / 6), at least 1
    (floor, so that Q/K shrink at least 6x)."""
    return max(1, head_dim // 6)


@dataclass(frozen=True)
class SharedLayer:
    """One substituted layer: its scores are `align(Z[donor]) + q_r k_r^T / sqrt(rank)`.

    perm[h] is the donor head whose scores feed this layer's head h (the P of the aligner).
    """

    layer: int
    donor: int
    perm: tuple[int, ...]
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "donor": self.donor, "perm": list(self.perm), "rank": self.rank}


@dataclass(frozen=True)
class SharingPlan:
    num_layers: int
    num_heads: int
    head_dim: int
    shared: tuple[SharedLayer, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance; not hashed

    def __post_init__(self) -> None:
        for i, s in enumerate(self.shared):
            if not isinstance(s, SharedLayer):
                raise PlanError(f"shared[{i}]: must be a SharedLayer, got {type(s).__name__}")
        object.__setattr__(self, "shared", tuple(sorted(self.shared, key=lambda s: s.layer)))
        self.validate()

    # ---- construction -------------------------------------------------------------
    @classmethod
    def explicit(
        cls,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        layers: Iterable[int],
        donors: dict[int, int] | None = None,
        perms: dict[int, Iterable[int]] | None = None,
        rank: "int | dict[int, int] | None" = None,
        meta: dict[str, Any] | None = None,
    ) -> "SharingPlan":
        """A plan given by hand: donor defaults to layer - 1, perm to the identity; `rank` is
        one rank for every layer or {layer: rank} (missing layers: default_rank)."""
        donors, perms = donors or {}, perms or {}
        ranks = rank if isinstance(rank, dict) else {}
        r = default_rank(head_dim) if rank is None or isinstance(rank, dict) else rank
        shared = tuple(
            SharedLayer(
                layer=int(l),
                donor=int(donors.get(l, l - 1)),
                perm=tuple(int(p) for p in perms.get(l, range(num_heads))),
                rank=int(ranks.get(l, r)),
            )
            for l in layers
        )
        return cls(num_layers, num_heads, head_dim, shared, dict(meta or {}))

    @classmethod
    def for_model(cls, model, layers: Iterable[int], **kwargs) -> "SharingPlan":
        """`explicit` with the shape read from a HF model's config."""
        return cls.for_config(model.config, layers, **kwargs)

    @classmethod
    def for_config(cls, cfg, layers: Iterable[int], **kwargs) -> "SharingPlan":
        """`explicit` with the shape read from a HF config."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        meta = {"model_type": getattr(cfg, "model_type", None), **(kwargs.pop("meta", None) or {})}
        return cls.explicit(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                            head_dim=head_dim, layers=layers, meta=meta, **kwargs)

    @classmethod
    def from_report(
        cls,
        report: "AttentionReport",
        *,
        fraction: float = 0.6,
        protect_first: int = 2,
        rank: int | None = None,
        aligned: bool = True,
    ) -> "SharingPlan":
        """Substitute the floor(fraction * L) layers with the lowest aligned divergence to their
        predecessor, never one of the first `protect_first` layers (and never layer 0).
        `aligned=False` keeps identity permutations ("unaligned direct sharing")."""
        if not 0.0 <= fraction < 1.0:
            raise PlanError(f"fraction: must be in [0, 1), got {fraction}")
        if protect_first < 1:
            raise PlanError(f"protect_first: must be >= 1 (layer 0 has no donor), got {protect_first}")
        n_layers = report.num_layers
        count = math.floor(fraction * n_layers)
        candidates = [l for l in range(max(1, protect_first), n_layers)]
        if count > len(candidates):
            raise PlanError(
                f"fraction: {fraction} asks for {count} of {n_layers} layers but only {len(candidates)} "
                f"are eligible with protect_first={protect_first}"
            )
        by_divergence = sorted(candidates, key=lambda l: (report.aligned_mean[l], l))
        chosen = sorted(by_divergence[:count])
        perms = {l: report.perm[l] for l in chosen} if aligned else {}
        meta = {"source": "analysis", "fraction": fraction, "protect_first": protect_first,
                "aligned": aligned, "base": report.base, "report_fingerprint": report.fingerprint}
        return cls.explicit(num_layers=n_layers, num_heads=report.num_heads, head_dim=report.head_dim,
                            layers=chosen, perms=perms, rank=rank, meta=meta)

    @classmethod
    def from_layers(cls, report: "AttentionReport", layers: Iterable[int], *,
                    rank: "int | dict[int, int] | None" = None, meta: dict[str, Any] | None = None) -> "SharingPlan":
        """Substitute exactly `layers`, each sharing its predecessor's aligned attention."""
        layers = sorted(int(l) for l in layers)
        return cls.explicit(num_layers=report.num_layers, num_heads=report.num_heads, head_dim=report.head_dim,
                            layers=layers, perms={l: report.perm[l] for l in layers}, rank=rank,
                            meta={"base": report.base, "report_fingerprint": report.fingerprint, **(meta or {})})

    # ---- checks -------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"{name}: must be a positive integer, got {value!r}")
        seen: set[int] = set()
        for i, s in enumerate(self.shared):
            where = f"shared[{i}]"
            if s.layer == 0:
                raise PlanError(f"{where}.layer: layer 0 cannot be substituted (it has no donor)")
            if not 0 < s.layer < self.num_layers:
                raise PlanError(f"{where}.layer: {s.layer} is out of range 1..{self.num_layers - 1}")
            if s.layer in seen:
                raise PlanError(f"{where}.layer: layer {s.layer} appears twice")
            seen.add(s.layer)
            if not 0 <= s.donor < s.layer:
                raise PlanError(f"{where}.donor: {s.donor} must be an earlier layer (0..{s.layer - 1})")
            if not 1 <= s.rank < self.head_dim:
                raise PlanError(f"{where}.rank: {s.rank} must be >= 1 and < head_dim={self.head_dim}")
            if sorted(s.perm) != list(range(self.num_heads)):
                raise PlanError(f"{where}.perm: {list(s.perm)} is not a permutation of 0..{self.num_heads - 1}")

    def check_model(self, model) -> None:
        """Raise if this plan does not fit the shape of a HF model."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        got = {"num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads, "head_dim": head_dim}
        for name, value in got.items():
            if getattr(self, name) != value:
                raise PlanError(f"{name}: plan has {getattr(self, name)}, the model has {value}")
        types = getattr(cfg, "layer_types", None)  # per-layer attention kinds (sliding windows)
        if types is not None and getattr(cfg, "sliding_window", None):
            for shared in self.shared:
                if types[shared.layer] != types[shared.donor]:
                    raise PlanError(f"shared: layer {shared.layer} ({types[shared.layer]}) cannot take the scores of "
                                    f"layer {shared.donor} ({types[shared.donor]}): their KV caches span different "
                                    "tokens; share within one attention kind")
        made_for = self.meta.get("model_type")
        if made_for and getattr(cfg, "model_type", None) and made_for != cfg.model_type:
            raise PlanError(f"model_type: the plan was made for a {made_for} model, this one is {cfg.model_type}")

    # ---- queries ------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.shared)

    @property
    def donors(self) -> set[int]:
        return {s.donor for s in self.shared}

    def get(self, layer: int) -> SharedLayer | None:
        return next((s for s in self.shared if s.layer == layer), None)

    @property
    def fraction(self) -> float:
        return len(self.shared) / self.num_layers

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "shared": [s.to_dict() for s in self.shared], "meta": self.meta, "hash": self.hash}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SharingPlan":
        try:
            shared = tuple(SharedLayer(int(s["layer"]), int(s["donor"]), tuple(int(p) for p in s["perm"]),
                                       int(s["rank"])) for s in data["shared"])
            plan = cls(int(data["num_layers"]), int(data["num_heads"]), int(data["head_dim"]), shared,
                       dict(data.get("meta") or {}))
        except KeyError as err:
            raise PlanError(f"{err.args[0]}: missing from the plan JSON") from None
        if "hash" in data and data["hash"] != plan.hash:
            raise PlanError(f"hash: the JSON says {data['hash']} but its content hashes to {plan.hash}")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SharingPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SharingPlan":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    @property
    def hash(self) -> str:
        """Stable content hash (shape + shared layers; `meta` excluded), 16 hex digits."""
        core = {"num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "shared": [s.to_dict() for s in self.shared]}
        return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    def kv_bytes_per_token(self, num_kv_heads: int, itemsize: int = 4) -> int:
        """Bytes of KV cache one token costs: a dense layer caches K and V (head_dim each per
        KV head), a substituted layer its rank-r K and its V."""
        return sum(num_kv_heads * ((s.rank if s else self.head_dim) + self.head_dim) * itemsize
                   for s in (self.get(i) for i in range(self.num_layers)))

    def summary(self, num_kv_heads: int | None = None) -> str:
        layers = ",".join(str(l) for l in self.layers)
        ranks = sorted({s.rank for s in self.shared})
        rank = (f"rank {ranks}" if len(ranks) <= 1 else
                "ranks " + ",".join(f"{s.layer}:{s.rank}" for s in self.shared if s.rank != min(ranks))
                + f" (others {min(ranks)})")
        kv = ""
        if num_kv_heads:
            dense = self.num_layers * num_kv_heads * 2 * self.head_dim * 4
            mine = self.kv_bytes_per_token(num_kv_heads)
            kv = f", KV {mine:,} B/token fp32 ({dense / mine:.2f}x less than dense)"
        return f"SharingPlan({len(self.shared)}/{self.num_layers} layers shared [{layers}], {rank}{kv}, hash {self.hash})"


def ranks_by_sensitivity(layers: Iterable[int], sensitivity: dict[int, float], *, base_rank: int,
                         boost: float = 2.0, share: float = 1 / 3, max_rank: int | None = None) -> dict[int, int]:
    """{layer: rank}: the most sensitive `share` of `layers` get `boost` x `base_rank` (capped
    at max_rank), the rest base_rank. Fragile layers get the capacity; the KV cost of the
    extra rank is small (r of 2 d per KV head)."""
    layers = sorted(int(l) for l in layers)
    fragile = set(sorted(layers, key=lambda l: (-sensitivity.get(l, 0.0), l))[: math.ceil(share * len(layers))])
    high = int(round(base_rank * boost))
    if max_rank is not None:
        high = min(high, max_rank)
    return {l: (high if l in fragile else base_rank) for l in layers}


def predicted_converted_ppl(probe_ppl: float, base_ppl: float, exponent: float) -> float:
    """The converted (healed) perplexity the budget planner expects from a probe (combined
    calibration perplexity after local initialisation): base * (probe / base) ** exponent.
    `exponent` < 1 says conversion removes that share of the probe's log-perplexity
    increase; it is fitted and checked against full conversions by
    benchmarks/convert_smollm2.py (its table prints probe, prediction and measurement)."""
    if not exponent > 0:
        raise PlanError(f"planner_exponent: must be > 0, got {exponent}")
    return base_ppl * (probe_ppl / base_ppl) ** exponent


def choose_layers(sensitivity: dict[int, float], *, num_layers: int, fraction: float | None = None,
                  max_ppl_increase: float | None = None, base_ppl: float | None = None,
                  combined_ppl: Callable[[list[int]], float] | None = None) -> list[int]:
    """The layers to substitute, by measured sensitivity (lowest first, ties by layer):

    fraction          the floor(fraction * num_layers) least sensitive layers;
    max_ppl_increase  the longest such prefix whose *combined* perplexity, measured by
                      `combined_ppl(layers)`, stays <= (1 + max_ppl_increase) * base_ppl.
                      Prefixes are searched by bisection (combined perplexity grows with
                      the prefix), so a 30-layer model costs about five measurements.
    Layers absent from `sensitivity` (layer 0, protected layers) are never chosen.
    """
    if (fraction is None) == (max_ppl_increase is None):
        raise PlanError("fraction: give exactly one of fraction and max_ppl_increase")
    order = sorted(sensitivity, key=lambda l: (sensitivity[l], l))
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise PlanError(f"fraction: must be in [0, 1), got {fraction}")
        count = math.floor(fraction * num_layers)
        if count > len(order):
            raise PlanError(f"fraction: {fraction} asks for {count} layers, only {len(order)} are candidates")
        return sorted(order[:count])
    if not max_ppl_increase >= 0:
        raise PlanError(f"max_ppl_increase: must be >= 0, got {max_ppl_increase}")
    if combined_ppl is None or base_ppl is None:
        raise PlanError("max_ppl_increase: needs base_ppl and a combined_ppl(layers) measurement")
    limit = (1.0 + max_ppl_increase) * base_ppl
    lo, hi = 0, len(order)  # invariant: prefix lo is within budget; prefixes longer than hi are not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if combined_ppl(sorted(order[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return sorted(order[:lo])


__all__ = ["PlanError", "SharedLayer", "SharingPlan", "choose_layers", "default_rank", "predicted_converted_ppl",
           "ranks_by_sensitivity"]
