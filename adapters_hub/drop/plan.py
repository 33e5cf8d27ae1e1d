"""What to drop (`DropPlan`) and how a plan is made (`DropConfig`). Pure Python: no torch.

He et al. ("What Matters in Transformers? Not All Attention is Needed") score every module by
importance = 1 - cos(X, X + F(norm(X))) on calibration text and remove the least important
ones, training-free. A plan names what is removed, per decoder layer:

  attn   layers whose self-attention branch is skipped (residual passes through, no KV cache)
  mlp    layers whose MLP branch is skipped
  block  layers skipped entirely (both branches)

`target` says which kind of modules were candidates: "attn", "mlp", "block", or "joint"
(attention and MLP ranked together in one list, so a plan may drop some of each).
Plans are made one-shot (`DropPlan.top_n`: rank once, drop the n least important) or
iteratively (`DropPlan.iterative`: drop one, re-measure on the dropped model, repeat).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

TARGETS = ("attn", "mlp", "block", "joint")
KINDS = ("attn", "mlp", "block")  # the module kinds a plan lists
METHODS = ("one_shot", "iterative", "manual")
PLAN_VERSION = 1

# A score table: kind -> one importance value per decoder layer (lower = less important).
Scores = Mapping[str, Sequence[float]]


def _candidate_kinds(target: str) -> tuple[str, ...]:
    return ("attn", "mlp") if target == "joint" else (target,)


def _check_target(target: str, where: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"{where}: unknown target {target!r}; use one of {', '.join(TARGETS)}")


@dataclass(frozen=True)
class DropPlan:
    """The modules removed from a model with `num_layers` decoder layers.

    Layer lists are stored sorted; `order` (optional) keeps the order in which they were
    picked, as ("attn", 27) pairs, for reports. Validation happens on construction.
    """

    num_layers: int
    target: str = "attn"
    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    block: tuple[int, ...] = ()
    method: str = "manual"
    order: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"DropPlan.num_layers: must be a positive int, got {self.num_layers!r}")
        _check_target(self.target, "DropPlan.target")
        if self.method not in METHODS:
            raise ValueError(f"DropPlan.method: unknown {self.method!r}; use one of {', '.join(METHODS)}")
        for kind in KINDS:
            object.__setattr__(self, kind, self._checked_layers(kind, getattr(self, kind)))
        allowed = set(_candidate_kinds(self.target))
        for kind in KINDS:
            if getattr(self, kind) and kind not in allowed:
                raise ValueError(f"DropPlan.{kind}: a plan with target {self.target!r} may not drop {kind} modules")
        order = tuple((str(k), int(i)) for k, i in self.order)
        if order and sorted(order) != sorted(self.dropped()):
            raise ValueError(f"DropPlan.order: {list(order)} is not an ordering of the dropped modules {self.dropped()}")
        object.__setattr__(self, "order", order)

    def _checked_layers(self, kind: str, layers) -> tuple[int, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
            raise ValueError(f"DropPlan.{kind}: must be a list of layer indices, got {layers!r}")
        seen: set[int] = set()
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"DropPlan.{kind}: layer indices must be ints, got {layer!r}")
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"DropPlan.{kind}: layer {layer} is out of range [0, {self.num_layers})")
            if layer in seen:
                raise ValueError(f"DropPlan.{kind}: duplicate layer {layer}")
            seen.add(layer)
        return tuple(sorted(seen))

    # -- views ---------------------------------------------------------------------------

    def dropped(self) -> list[tuple[str, int]]:
        """All dropped modules as sorted (kind, layer) pairs."""
        return sorted((kind, i) for kind in KINDS for i in getattr(self, kind))

    def __len__(self) -> int:
        return len(self.attn) + len(self.mlp) + len(self.block)

    def skips_attention(self, layer: int) -> bool:
        return layer in self.attn or layer in self.block

    def skips_mlp(self, layer: int) -> bool:
        return layer in self.mlp or layer in self.block

    def with_dropped(self, kind: str, layer: int, *, method: str | None = None) -> "DropPlan":
        """A copy that also drops `kind` of `layer` (appended to `order`)."""
        lists = {k: list(getattr(self, k)) for k in KINDS}
        lists[kind].append(layer)
        order = self.order or tuple(self.dropped())
        return DropPlan(self.num_layers, self.target, method=method or self.method,
                        order=order + ((kind, layer),), **lists)

    # -- making plans --------------------------------------------------------------------

    @classmethod
    def top_n(cls, scores: Scores | Sequence[float], *, n: int, target: str = "attn") -> "DropPlan":
        """One-shot: drop the `n` least important candidates.

        `scores` is {kind: [importance per layer]}; a plain list is taken as the scores of
        `target`. For target "joint", attention and MLP scores form one ranking. Ties go to
        the shallower layer, then attention before MLP (deterministic).
        """
        _check_target(target, "DropPlan.top_n target")
        table = _score_table(scores, target)
        num_layers = len(next(iter(table.values())))
        ranked = _ranked(table, exclude=())
        _check_n(n, len(ranked), target, num_layers)
        picked = ranked[:n]
        lists = {kind: [i for k, i in picked if k == kind] for kind in KINDS}
        return cls(num_layers, target, method="one_shot", order=tuple(picked), **lists)

    @classmethod
    def iterative(cls, score_fn: Callable[["DropPlan"], Scores], *, n: int, target: str = "attn",
                  num_layers: int) -> "DropPlan":
        """Iterative: n rounds of "measure importance on the model with the current plan
        applied, drop the least important module not yet dropped".

        `score_fn(plan) -> {kind: [importance per layer]}` does the measuring (see
        `importance.iterative_plan` for the model-backed one); injecting it keeps this loop
        testable without a model.
        """
        _check_target(target, "DropPlan.iterative target")
        plan = cls(num_layers, target, method="iterative")
        _check_n(n, num_layers * len(_candidate_kinds(target)), target, num_layers)
        for _ in range(n):
            table = _score_table(score_fn(plan), target)
            for kind, values in table.items():
                if len(values) != num_layers:
                    raise ValueError(f"score_fn: {kind} scores have {len(values)} values, expected {num_layers}")
            kind, layer = _ranked(table, exclude=plan.dropped())[0]
            plan = plan.with_dropped(kind, layer)
        return plan

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "num_layers": self.num_layers,
            "target": self.target,
            "method": self.method,
            "attn": list(self.attn),
            "mlp": list(self.mlp),
            "block": list(self.block),
            "order": [list(pair) for pair in self.order],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "DropPlan":
        if not isinstance(data, Mapping):
            raise ValueError(f"DropPlan: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise ValueError(f"DropPlan.version: unsupported {version!r} (this code reads {PLAN_VERSION})")
        known = {"version", "num_layers", "target", "method", "attn", "mlp", "block", "order"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DropPlan: unknown field(s) {', '.join(unknown)}")
        if "num_layers" not in data:
            raise ValueError("DropPlan.num_layers: missing")
        return cls(
            data["num_layers"], data.get("target", "attn"),
            attn=tuple(data.get("attn", ())), mlp=tuple(data.get("mlp", ())), block=tuple(data.get("block", ())),
            method=data.get("method", "manual"), order=tuple(tuple(p) for p in data.get("order", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DropPlan":
        return cls.from_dict(json.loads(text))

    def hash(self) -> str:
        """Stable id of what the plan does: num_layers and the dropped modules (not how it was
        found: a manual and an iterative plan dropping the same modules are the same plan)."""
        key = {"num_layers": self.num_layers, **{kind: list(getattr(self, kind)) for kind in KINDS}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        parts = [f"{kind} {list(getattr(self, kind))}" for kind in KINDS if getattr(self, kind)]
        return f"drop {len(self)} of {self.num_layers} layers' modules ({self.method}, {self.target}): " + (
            "; ".join(parts) or "nothing")


def _score_table(scores, target: str) -> dict[str, list[float]]:
    """Normalise scores to {kind: [float per layer]} for the candidate kinds of `target`."""
    kinds = _candidate_kinds(target)
    if not isinstance(scores, Mapping):
        if target == "joint":
            raise ValueError("scores: target 'joint' needs {'attn': [...], 'mlp': [...]}, got a plain list")
        scores = {target: scores}
    missing = [k for k in kinds if k not in scores]
    if missing:
        raise ValueError(f"scores: missing {', '.join(missing)} (target {target!r})")
    table = {k: [float(v) for v in scores[k]] for k in kinds}
    lengths = {len(v) for v in table.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"scores: need one non-empty value per layer for each of {kinds}, got lengths {sorted(lengths)}")
    return table


def _ranked(table: dict[str, list[float]], exclude) -> list[tuple[str, int]]:
    """Candidates (kind, layer), least important first; ties: shallower layer, then attn."""
    excluded = set(exclude)
    kind_rank = {k: r for r, k in enumerate(KINDS)}
    items = [(v, i, kind_rank[k], k) for k, values in table.items() for i, v in enumerate(values)
             if (k, i) not in excluded]
    return [(k, i) for _, i, _, k in sorted(items)]


def _check_n(n, available: int, target: str, num_layers: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: must be a non-negative int, got {n!r}")
    if n > available:
        what = f"{available} attention + MLP modules" if target == "joint" else f"{num_layers} {target} layers"
        raise ValueError(f"n: {n} is larger than the {what} of the model")


@dataclass(frozen=True)
class DropConfig:
    """How a plan is made: what to rank, how many to drop, and the calibration text.

    Calibration uses `n_blocks` x `block_len` tokens of `data`, after skipping the first
    `skip_tokens` (so calibration text can differ from evaluation blocks at the start).
    """

    target: str = "attn"
    n: int = 8
    iterative: bool = False
    data: str = "wikitext2"
    n_blocks: int = 8
    block_len: int = 256
    skip_tokens: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        _check_target(self.target, "DropConfig.target")
        for name in ("n", "skip_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DropConfig.{name}: must be a non-negative int, got {value!r}")
        for name in ("n_blocks", "block_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DropConfig.{name}: must be a positive int, got {value!r}")
        if not isinstance(self.iterative, bool):
            raise ValueError(f"DropConfig.iterative: must be a bool, got {self.iterative!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"DropConfig.data: must be a corpus name, got {self.data!r}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping) -> "DropConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"DropConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)
