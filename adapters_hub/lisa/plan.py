"""The sharing plan of a backbone: per layer, keep its dense attention, share a donor's
attention scores (LiSA), or drop the attention branch (no attention, no KV cache).

A plan is made once per base model (usually from an `AttentionReport`) and shared by every
task adapter of that backbone; an adapter records the plan's hash and refuses a backbone
with another plan.

    plan = SharingPlan.from_report(report, fraction=0.6, protect_first=2)
    plan = SharingPlan.explicit(num_layers=30, num_heads=9, head_dim=64, layers=[5, 6, 7])
    plan = SharingPlan.explicit(..., layers=[5, 7], dropped=[6])   # hybrid: 7 takes 5's scores

A dropped layer is never a donor: a shared layer whose nearest layer below is dropped takes
the nearest kept-or-shared layer as its donor. KV cache per token and KV head: a kept layer
holds K and V (2 d), a shared layer its rank-r K and V (r + d), a dropped layer nothing.
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
    dropped: tuple[int, ...] = ()  # layers whose attention branch is skipped (no attention, no KV)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.shared):
            if not isinstance(s, SharedLayer):
                raise PlanError(f"shared[{i}]: must be a SharedLayer, got {type(s).__name__}")
        object.__setattr__(self, "shared", tuple(sorted(self.shared, key=lambda s: s.layer)))
        for i, layer in enumerate(self.dropped):
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise PlanError(f"dropped[{i}]: must be a layer index, got {layer!r}")
        object.__setattr__(self, "dropped", tuple(sorted(self.dropped)))
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
        dropped: Iterable[int] = (),
    ) -> "SharingPlan":
        """A plan given by hand: donor defaults to the nearest layer below that is not
        dropped, perm to the identity; `rank` is one rank for every layer or {layer: rank}
        (missing layers: default_rank); `dropped` lists layers whose attention is skipped."""
        donors, perms = donors or {}, perms or {}
        dropped = tuple(int(l) for l in dropped)
        ranks = rank if isinstance(rank, dict) else {}
        r = default_rank(head_dim) if rank is None or isinstance(rank, dict) else rank
        shared = tuple(
            SharedLayer(
                layer=int(l),
                donor=int(donors.get(l, nearest_donor(int(l), dropped))),
                perm=tuple(int(p) for p in perms.get(l, range(num_heads))),
                rank=int(ranks.get(l, r)),
            )
            for l in layers
        )
        return cls(num_layers, num_heads, head_dim, shared, dict(meta or {}), dropped)

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
        predecessor, never one of the first `protect_first` layers (and never layer 0), and
        only `shareable_layers` (the predecessor has the same attention kind).
        `aligned=False` keeps identity permutations ("unaligned direct sharing")."""
        if not 0.0 <= fraction < 1.0:
            raise PlanError(f"fraction: must be in [0, 1), got {fraction}")
        if protect_first < 1:
            raise PlanError(f"protect_first: must be >= 1 (layer 0 has no donor), got {protect_first}")
        n_layers = report.num_layers
        count = math.floor(fraction * n_layers)
        candidates = [l for l in shareable_layers(n_layers, report.layer_types) if l >= protect_first]
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
                    rank: "int | dict[int, int] | None" = None, meta: dict[str, Any] | None = None,
                    dropped: Iterable[int] = ()) -> "SharingPlan":
        """Substitute exactly `layers`, each sharing its predecessor's aligned attention (the
        report's head permutation is measured against layer - 1; a layer whose donor is
        further down, past dropped layers, starts from the identity and its aligner learns
        the mix), and skip the attention of `dropped`."""
        layers = sorted(int(l) for l in layers)
        dropped = sorted(int(l) for l in dropped)
        perms = {l: report.perm[l] for l in layers if nearest_donor(l, dropped) == l - 1}
        return cls.explicit(num_layers=report.num_layers, num_heads=report.num_heads, head_dim=report.head_dim,
                            layers=layers, perms=perms, rank=rank, dropped=dropped,
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
        for i, layer in enumerate(self.dropped):
            where = f"dropped[{i}]"
            if layer == 0:
                raise PlanError(f"{where}: layer 0 cannot be dropped (transformers reads the sequence length "
                                "from its KV-cache slot)")
            if not 0 < layer < self.num_layers:
                raise PlanError(f"{where}: {layer} is out of range 1..{self.num_layers - 1}")
            if layer in seen:
                raise PlanError(f"{where}: layer {layer} is both shared and dropped" if self.get(layer)
                                else f"{where}: layer {layer} appears twice")
            seen.add(layer)
        for i, s in enumerate(self.shared):
            if s.donor in self.dropped:
                raise PlanError(f"shared[{i}].donor: layer {s.layer}'s donor {s.donor} is dropped; a donor must "
                                f"keep its attention (nearest kept-or-shared layer below: "
                                f"{nearest_donor(s.layer, self.dropped)})")

    def check_model(self, model) -> None:
        """Raise if this plan does not fit the shape of a HF model."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        got = {"num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads, "head_dim": head_dim}
        for name, value in got.items():
            if getattr(self, name) != value:
                raise PlanError(f"{name}: plan has {getattr(self, name)}, the model has {value}")
        types = getattr(cfg, "layer_types", None)  # per-layer attention kinds (sliding windows)
        if types is not None and self.dropped:
            firsts = {types.index(kind): kind for kind in set(types)}
            for layer in self.dropped:
                if layer in firsts:
                    raise PlanError(f"dropped: layer {layer} is the first {firsts[layer]} layer; transformers reads "
                                    "that kind's mask sizes from its KV-cache slot, so it cannot be dropped")
        kinds = attention_kinds(cfg)
        if kinds is not None:
            for shared in self.shared:
                if kinds[shared.layer] != kinds[shared.donor]:
                    raise PlanError(f"shared: layer {shared.layer} ({kinds[shared.layer]}) cannot take the scores of "
                                    f"layer {shared.donor} ({kinds[shared.donor]}): their KV caches span different "
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

    def choice(self, layer: int) -> str:
        """What the plan does with `layer`'s attention: "keep", "share" or "drop"."""
        return "drop" if layer in self.dropped else "share" if self.get(layer) else "keep"

    @property
    def fraction(self) -> float:
        """The share of layers whose own attention is gone (shared or dropped)."""
        return (len(self.shared) + len(self.dropped)) / self.num_layers

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "shared": [s.to_dict() for s in self.shared], "dropped": list(self.dropped), "meta": self.meta,
                "hash": self.hash}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SharingPlan":
        try:
            shared = tuple(SharedLayer(int(s["layer"]), int(s["donor"]), tuple(int(p) for p in s["perm"]),
                                       int(s["rank"])) for s in data["shared"])
            plan = cls(int(data["num_layers"]), int(data["num_heads"]), int(data["head_dim"]), shared,
                       dict(data.get("meta") or {}), tuple(int(l) for l in data.get("dropped") or ()))
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
        """Stable content hash (shape + shared + dropped layers; `meta` excluded), 16 hex
        digits. A plan that drops nothing hashes as plans did before `dropped` existed."""
        core = {"num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "shared": [s.to_dict() for s in self.shared]}
        if self.dropped:
            core["dropped"] = list(self.dropped)
        return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    def kv_bytes_per_token(self, num_kv_heads: int, itemsize: int = 4) -> int:
        """Bytes of KV cache one token costs: a dense layer caches K and V (head_dim each per
        KV head), a substituted layer its rank-r K and its V, a dropped layer nothing."""
        ranks = {s.layer: s.rank for s in self.shared}
        return num_kv_heads * itemsize * _kv_units(ranks, self.dropped, self.num_layers, self.head_dim)

    def kv_ratio(self, num_kv_heads: int) -> float:
        """Dense KV bytes per token / this plan's (2.0: a cache half the size)."""
        dense = self.num_layers * num_kv_heads * 2 * self.head_dim
        return dense * 4 / self.kv_bytes_per_token(num_kv_heads)

    def summary(self, num_kv_heads: int | None = None) -> str:
        layers = ",".join(str(l) for l in self.layers)
        dropped = f", {len(self.dropped)} dropped [{','.join(map(str, self.dropped))}]" if self.dropped else ""
        ranks = sorted({s.rank for s in self.shared})
        rank = (f"rank {ranks}" if len(ranks) <= 1 else
                "ranks " + ",".join(f"{s.layer}:{s.rank}" for s in self.shared if s.rank != min(ranks))
                + f" (others {min(ranks)})")
        kv = ""
        if num_kv_heads:
            kv = (f", KV {self.kv_bytes_per_token(num_kv_heads):,} B/token fp32 "
                  f"({self.kv_ratio(num_kv_heads):.2f}x less than dense)")
        return (f"SharingPlan({len(self.shared)}/{self.num_layers} layers shared [{layers}]{dropped}, {rank}{kv}, "
                f"hash {self.hash})")


def layers_by_position(num_layers: int, fraction: float) -> list[int]:
    """The layers a plan fixed before training shares (`lisa-hub pretrain`: no trained
    attention to analyse): round(fraction x num_layers) of layers 1..L-1 (at least one),
    spread evenly, so that shared and dense layers alternate up to half the layers shared.

    >>> layers_by_position(6, 0.5), layers_by_position(6, 0.3)
    ([1, 3, 5], [2, 4])
    """
    if not 0 < fraction < 1:
        raise PlanError(f"fraction: must be in (0, 1), got {fraction}")
    candidates = num_layers - 1  # layer 0 has no layer below to read
    n = max(1, min(candidates, round(fraction * num_layers)))
    return sorted({1 + min(candidates - 1, int((k + 0.5) * candidates / n)) for k in range(n)})


def attention_kinds(cfg) -> list[str] | None:
    """Each layer's attention kind ("sliding_attention", "full_attention") where a model mixes
    windows (Gemma 3: five sliding layers to one full), else None (every layer alike)."""
    types = getattr(cfg, "layer_types", None)
    if types is None or not getattr(cfg, "sliding_window", None) or len(set(types)) < 2:
        return None
    return list(types)


def shareable_layers(num_layers: int, kinds: list[str] | None = None) -> list[int]:
    """The layers that may share their predecessor's attention: every layer but 0, less, in a
    model that mixes attention kinds, each layer whose predecessor is of another kind (their
    KV caches span different tokens). Gemma 3 270M: 12 of 18 (not 0, 5, 6, 11, 12, 17)."""
    if kinds is None:
        return list(range(1, num_layers))
    return [l for l in range(1, num_layers) if kinds[l] == kinds[l - 1]]


def nearest_donor(layer: int, dropped: Iterable[int]) -> int:
    """The donor a shared `layer` takes by default: the nearest layer below it that keeps
    or shares its attention (a dropped layer has no scores to give)."""
    dropped = set(dropped)
    donor = layer - 1
    while donor in dropped:
        donor -= 1
    return donor


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


def hybrid_steps(share: dict[int, float], drop: dict[int, float], *, head_dim: int,
                 ranks: dict[int, int]) -> list[tuple[dict[int, int], list[int]]]:
    """The greedy path from the dense model to every candidate layer changed: at each step
    the move with the least sensitivity per KV byte saved, among sharing a kept layer
    (saves d - r per KV head), dropping a kept layer (saves 2 d) and dropping a shared one
    (saves d + r; its cost is the difference of its two sensitivities). `share` and `drop`
    are each layer's measured sensitivity (perplexity increase, one layer changed alone);
    layers absent from either are never changed that way. Returns the plans after each
    step, as ({shared layer: rank}, sorted dropped layers); every step saves bytes."""
    shared: dict[int, int] = {}
    dropped: set[int] = set()
    steps: list[tuple[dict[int, int], list[int]]] = []
    while True:
        moves = []  # (cost per unit saved, layer, what)
        for l in sorted(set(share) | set(drop)):
            if l in dropped:
                continue
            if l in shared:
                if l in drop:
                    moves.append(((drop[l] - share[l]) / (head_dim + shared[l]), l, "drop"))
                continue
            if l in share:
                moves.append((share[l] / (head_dim - ranks[l]), l, "share"))
            if l in drop:
                moves.append((drop[l] / (2 * head_dim), l, "drop"))
        if not moves:
            return steps
        _, layer, what = min(moves)
        if what == "share":
            shared[layer] = ranks[layer]
        else:
            shared.pop(layer, None)
            dropped.add(layer)
        steps.append((dict(sorted(shared.items())), sorted(dropped)))


def _kv_units(shared: dict[int, int], dropped, num_layers: int, head_dim: int) -> int:
    """KV cache entries per token and KV head: 2 d for a kept layer, r + d shared, 0 dropped."""
    return sum(0 if l in dropped else head_dim + shared[l] if l in shared else 2 * head_dim
               for l in range(num_layers))


def _kv_fraction(shared: dict[int, int], dropped, num_layers: int, head_dim: int) -> float:
    return _kv_units(shared, dropped, num_layers, head_dim) / (num_layers * 2 * head_dim)


def choose_hybrid(share: dict[int, float], drop: dict[int, float], *, num_layers: int, head_dim: int,
                  ranks: dict[int, int], kv_budget: float | None = None, max_ppl_increase: float | None = None,
                  base_ppl: float | None = None,
                  combined_ppl: Callable[[dict[int, int], list[int]], float] | None = None
                  ) -> tuple[dict[int, int], list[int]]:
    """({shared layer: rank}, dropped layers) along `hybrid_steps`:

    kv_budget         the first plan whose KV cache is at most kv_budget x dense
    max_ppl_increase  the plan with the least KV whose combined perplexity, measured by
                      `combined_ppl(shared, dropped)`, stays <= (1 + max_ppl_increase) x
                      base_ppl; searched by bisection over the steps (perplexity grows
                      along them), about log2(steps) measurements.
    """
    if (kv_budget is None) == (max_ppl_increase is None):
        raise PlanError("kv_budget: give exactly one of kv_budget and max_ppl_increase")
    steps = hybrid_steps(share, drop, head_dim=head_dim, ranks=ranks)
    if kv_budget is not None:
        if not 0 < kv_budget < 1:
            raise PlanError(f"kv_budget: must be in (0, 1) (a fraction of the dense KV cache), got {kv_budget}")
        for shared, dropped in steps:
            if _kv_fraction(shared, dropped, num_layers, head_dim) <= kv_budget + 1e-12:
                return shared, dropped
        smallest = _kv_fraction(*steps[-1], num_layers, head_dim) if steps else 1.0
        raise PlanError(f"kv_budget: {kv_budget} is out of reach; changing every candidate layer leaves "
                        f"{smallest:.3f} of the dense KV cache")
    if not max_ppl_increase >= 0:
        raise PlanError(f"max_ppl_increase: must be >= 0, got {max_ppl_increase}")
    if combined_ppl is None or base_ppl is None:
        raise PlanError("max_ppl_increase: needs base_ppl and a combined_ppl(shared, dropped) measurement")
    limit = (1.0 + max_ppl_increase) * base_ppl
    lo, hi = 0, len(steps)  # steps[:lo] are within budget (lo = 0: the dense model); past hi are not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if combined_ppl(*steps[mid - 1]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return steps[lo - 1] if lo else ({}, [])


__all__ = ["PlanError", "SharedLayer", "SharingPlan", "choose_hybrid", "choose_layers", "default_rank",
           "attention_kinds", "hybrid_steps", "nearest_donor", "shareable_layers", "predicted_converted_ppl", "ranks_by_sensitivity"]
