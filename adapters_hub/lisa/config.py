"""`LisaConfig`: the hyper-parameters of one LiSA adapter, validated when constructed.

The plan is part of the config (every adapter of a backbone carries the same plan); the
base model name and fingerprint are filled in by `LisaModel` at wrap time and written to
`adapter_config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from adapters_hub.lisa.plan import PlanError, SharingPlan
from adapters_hub.multi_lora import LoraParts, LoraPartsError

ACTIVATIONS = ("gelu", "silu", "relu", "tanh")
# "linear": align(z) = W P z, a learned mix over the head axis; it folds into the query side,
#           so the fast path runs substituted layers as one SDPA call (scores.ScoreFactors).
# "ffn":    align(z) = P z + W2 act(W1 P z), the LiSA paper's head-axis FFN; it needs every
#           (B, H, Tq, Tk) score materialised (reference path only).
ALIGNERS = ("linear", "ffn")
KIND = "lisa"


class LisaConfigError(ValueError):
    """An invalid LisaConfig field; the message starts with the field name."""


@dataclass(frozen=True)
class LisaConfig:
    plan: SharingPlan
    aligner: str = "linear"             # one of ALIGNERS
    aligner_hidden: int | None = None   # h_ff of the head-axis FFN; None = 2 * num_heads
    aligner_act: str = "gelu"
    aligner_init_std: float = 0.02      # W1 init (W2 is zero, so a fresh adapter is exact)
    lowrank_init_std: float | None = None  # k_r init; None = 1/sqrt(hidden_size) (q_r is zero)
    lora_parts: LoraParts | None = None  # low-rank updates of chosen linears (multi_lora), trained with it
    base_model: str | None = None       # filled by LisaModel
    base_fingerprint: str | None = None  # filled by LisaModel (fingerprint of the unmodified base)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, saved as is (task, lr, ...)

    def __post_init__(self) -> None:
        if not isinstance(self.plan, SharingPlan):
            raise LisaConfigError(f"plan: must be a SharingPlan, got {type(self.plan).__name__}")
        if self.aligner not in ALIGNERS:
            raise LisaConfigError(f"aligner: {self.aligner!r} is not one of {', '.join(ALIGNERS)}")
        if self.aligner_hidden is not None and (not isinstance(self.aligner_hidden, int) or self.aligner_hidden < 1):
            raise LisaConfigError(f"aligner_hidden: must be a positive integer or None, got {self.aligner_hidden!r}")
        if self.aligner_act not in ACTIVATIONS:
            raise LisaConfigError(f"aligner_act: {self.aligner_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if not self.aligner_init_std > 0:
            raise LisaConfigError(f"aligner_init_std: must be > 0, got {self.aligner_init_std}")
        if self.lora_parts is not None and not isinstance(self.lora_parts, LoraParts):
            raise LisaConfigError(f"lora_parts: must be a LoraParts or None, got {type(self.lora_parts).__name__}")
        if self.lowrank_init_std is not None and not self.lowrank_init_std > 0:
            raise LisaConfigError(f"lowrank_init_std: must be > 0 or None, got {self.lowrank_init_std}")

    @property
    def h_ff(self) -> int:
        return self.aligner_hidden or 2 * self.plan.num_heads

    def with_base(self, name: str | None, fingerprint: str) -> "LisaConfig":
        return replace(self, base_model=name, base_fingerprint=fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "plan": self.plan.to_dict(),
            "plan_hash": self.plan.hash,
            "aligner": self.aligner,
            "aligner_hidden": self.aligner_hidden,
            "aligner_act": self.aligner_act,
            "aligner_init_std": self.aligner_init_std,
            "lowrank_init_std": self.lowrank_init_std,
            "lora_parts": self.lora_parts.to_dict() if self.lora_parts else None,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LisaConfig":
        if data.get("kind", KIND) != KIND:
            raise LisaConfigError(f"kind: expected {KIND!r}, got {data.get('kind')!r}")
        if "plan" not in data:
            raise LisaConfigError("plan: missing from the adapter config")
        try:
            plan = SharingPlan.from_dict(data["plan"])
        except PlanError as err:
            raise LisaConfigError(f"plan.{err}") from None
        data = {"aligner": "ffn", **data}  # adapters saved before `aligner` existed are FFN ones
        try:
            data["lora_parts"] = LoraParts.from_dict(data.get("lora_parts"))
        except (LoraPartsError, TypeError) as err:
            raise LisaConfigError(f"lora_parts.{err}") from None
        known = {"aligner", "aligner_hidden", "aligner_act", "aligner_init_std", "lowrank_init_std", "lora_parts",
                 "base_model", "base_fingerprint", "extra"}
        return cls(plan=plan, **{k: v for k, v in data.items() if k in known})
