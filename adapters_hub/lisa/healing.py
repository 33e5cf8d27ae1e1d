"""Healing: low-rank updates of a backbone's own weights, trained during conversion and
merged into the weights before serving, so a healed backbone costs exactly what an
unhealed one costs per token.

Why: a substituted layer's attention differs from the original, and when only the LiSA
tensors train (aligner, rank-r Q/K), nothing downstream can compensate; conversion
plateaus (SmolLM2, 60% shared: 1.31x the base perplexity after 10 or 15 minutes). Like
SwiftKV (which trains the affected layers' projections) and pruning work (which heals the
remaining weights with low-rank updates), healing lets o_proj, v_proj and the MLP of the
chosen layers, and the RMSNorm scales, move a little.

    cfg = HealingConfig(rank=8, targets=("o_proj", "v_proj", "mlp"), layers="all", norms=True)
    attach(lm.model, cfg, shared_layers=lm.plan.layers)   # trainable wrappers, zero update at start
    with disabled(lm.model): teacher = lm(...)            # the dense teacher: no update
    save(lm.model, "backbone/healing")                    # healing.json + healing.safetensors (small)
    detach(lm.model)                                      # remove the wrappers (no merge)
    merge(model, "backbone/healing")                      # at load: W += (alpha / r) B A; norm.w += delta

What a registered backbone carries is the small deltas (`healing/`), not merged weights:
a version is a few MB instead of a copy of the base, the base weights stay referenced by
name, and merging costs milliseconds at load. The healing digest (sha256 of the tensors
file) enters the backbone's fingerprint (`healed_fingerprint`), so a task adapter trained
on a healed backbone refuses the unhealed one and the reverse.

Tensor names: `<module path>.heal_A` (r, in), `<module path>.heal_B` (out, r) for a
linear; `<norm path>.heal_delta` (hidden,) for a norm. Module paths are those of the
plain HF model (LiSA's attention wrappers keep the projections' attribute names).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

PREFIX = "heal_"
CONFIG_NAME = "healing.json"
WEIGHTS_NAME = "healing.safetensors"
# Names a spec may use; "mlp" is gate_proj, up_proj and down_proj together.
TARGETS = ("o_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "mlp")
LAYERS = ("shared", "all")
_MLP = ("gate_proj", "up_proj", "down_proj")


class HealingError(ValueError):
    """An invalid healing config or artifact; the message starts with the field or file."""


@dataclass(frozen=True)
class HealingConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("o_proj", "v_proj", "mlp")
    layers: str = "all"        # "shared": only substituted layers; "all": every layer
    norms: bool = True         # train additive deltas of the RMSNorm scales too

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise HealingError(f"heal_rank: must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise HealingError(f"heal_alpha: must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise HealingError(f"heal_targets: {unknown or 'empty'} not among {', '.join(TARGETS)}")
        if self.layers not in LAYERS:
            raise HealingError(f"heal_layers: {self.layers!r} is not one of {', '.join(LAYERS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def projections(self) -> tuple[str, ...]:
        """The attribute names of the linears to heal, "mlp" expanded."""
        out: list[str] = []
        for t in self.targets:
            out.extend(_MLP if t == "mlp" else (t,))
        return tuple(dict.fromkeys(out))

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> "HealingConfig":
        known = {"rank", "alpha", "targets", "layers", "norms"}
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in data.items() if k in known})


class _Switch:
    """One on/off flag shared by every wrapper of a model (off = the dense teacher)."""

    def __init__(self) -> None:
        self.on = True


class HealedLinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T, B = 0 at start (a fresh update changes nothing)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, switch: _Switch) -> None:
        super().__init__()
        self.base, self.scale, self._switch = base, scale, switch
        w = base.weight
        self.heal_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=w.device))
        self.heal_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.heal_A, a=5**0.5)  # PEFT's LoRA init

    @property
    def weight(self) -> torch.Tensor:  # code that reads proj.weight (dtype, device) still works
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self._switch.on:
            return y
        return y + ((x.to(self.heal_A.dtype) @ self.heal_A.T) @ self.heal_B.T * self.scale).to(y.dtype)


class HealedNorm(nn.Module):
    """RMSNorm with an additive delta on its scale: base(x) + rms_normalise(x) * delta.
    Right for both scale conventions (LLaMA's w * n(x), Gemma's (1 + w) * n(x)), so the
    merge is always weight += delta."""

    def __init__(self, base: nn.Module, switch: _Switch) -> None:
        super().__init__()
        self.base, self._switch = base, switch
        self.eps = getattr(base, "variance_epsilon", None) or getattr(base, "eps", 1e-6)
        self.heal_delta = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self._switch.on:
            return y
        h = x.float()
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return y + (n * self.heal_delta).to(y.dtype)


def _layers(model: nn.Module):
    from adapters_hub.lisa.model import decoder_of

    return decoder_of(model).layers


def _sites(model: nn.Module, cfg: HealingConfig, shared_layers) -> Iterator[tuple[str, nn.Module, str, str]]:
    """(path of the parent module, parent, attribute, "linear" | "norm") of every healed site,
    paths relative to `model`."""
    prefix = next(n for n, m in model.named_modules() if m is _layers(model)) + "."
    chosen = set(shared_layers) if cfg.layers == "shared" else None
    for i, layer in enumerate(_layers(model)):
        if chosen is not None and i not in chosen:
            continue
        # A dropped attention (DroppedAttention) never runs, nor does the norm before it: no site there.
        dropped = getattr(getattr(layer, "self_attn", None), "dropped", False)
        for parent_name in ("mlp",) if dropped else ("self_attn", "mlp"):
            parent = getattr(layer, parent_name, None)
            for attr in cfg.projections():
                if parent is not None and isinstance(getattr(parent, attr, None), (nn.Linear, HealedLinear)):
                    yield f"{prefix}{i}.{parent_name}", parent, attr, "linear"
        if cfg.norms:
            for attr in ("post_attention_layernorm",) if dropped else ("input_layernorm", "post_attention_layernorm"):
                if hasattr(layer, attr):
                    yield f"{prefix}{i}", layer, attr, "norm"


def attach(model: nn.Module, cfg: HealingConfig, *, shared_layers=()) -> list[nn.Parameter]:
    """Wrap the healed linears and norms of `model` in place; returns the new (trainable)
    parameters. The model's own weights are untouched until `merge`."""
    if getattr(model, "_lisa_healing", None) is not None:
        raise RuntimeError("healing: already attached to this model")
    switch = _Switch()
    params: list[nn.Parameter] = []
    for _, parent, attr, what in list(_sites(model, cfg, shared_layers)):
        base = getattr(parent, attr)
        wrapped = HealedLinear(base, cfg.rank, cfg.scale, switch) if what == "linear" else HealedNorm(base, switch)
        setattr(parent, attr, wrapped)
        params.extend(p for n, p in wrapped.named_parameters() if n.startswith(PREFIX))
    for p in params:
        p.requires_grad_(True)
    model._lisa_healing = (cfg, switch, list(shared_layers))
    return params


def parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if PREFIX in n.rsplit(".", 1)[-1]]


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block every healed module computes as the plain model (the dense teacher)."""
    state = getattr(model, "_lisa_healing", None)
    if state is None:
        yield
        return
    switch = state[1]
    previous, switch.on = switch.on, False
    try:
        yield
    finally:
        switch.on = previous


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The healing tensors, keyed by the plain model's module paths (`...o_proj.heal_A`)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (HealedLinear, HealedNorm)):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p.detach()
    return out


def digest_of(folder: str | Path) -> str:
    return hashlib.sha256((Path(folder) / WEIGHTS_NAME).read_bytes()).hexdigest()


def healed_fingerprint(base_fingerprint: str, digest: str | None) -> str:
    """The fingerprint of a base with healing merged: adapters record it, so adapters of a
    healed and an unhealed backbone of one plan never load into each other."""
    if not digest:
        return base_fingerprint
    return hashlib.sha256(f"{base_fingerprint}|healing:{digest}".encode()).hexdigest()[:16]


def stamp_adapter(adapter_dir: str | Path, healing_dir: str | Path) -> str:
    """An adapter trained beside a healing (the general adapter of a conversion) belongs to
    the healed backbone: rewrite its recorded fingerprint to base + healing; returns it."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    fp = healed_fingerprint(config["base_fingerprint"], digest_of(healing_dir))
    path.write_text(json.dumps({**config, "base_fingerprint": fp}, indent=2, sort_keys=True) + "\n")
    return fp


def save(model: nn.Module, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    state = getattr(model, "_lisa_healing", None)
    if state is None:
        raise RuntimeError("healing: nothing attached to this model")
    cfg, _, shared = state
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in state_dict(model).items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg.to_dict(), "shared_layers": shared}, indent=2) + "\n")
    return folder


def load_into(model: nn.Module, folder: str | Path) -> None:
    """Copy a saved healing state into the attached wrappers (resuming a conversion)."""
    tensors = _read(folder)[1]
    own = dict(model.named_parameters())
    missing = sorted(set(state_dict(model)) - set(tensors))
    if missing:
        raise HealingError(f"{Path(folder) / WEIGHTS_NAME}: missing {missing[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def _read(folder: str | Path) -> tuple[HealingConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise HealingError(f"{folder / name}: missing; not a healing folder")
    try:
        cfg = HealingConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except Exception as err:  # JSON, OS, or safetensors' own error on a corrupt file
        if isinstance(err, HealingError):
            raise
        raise HealingError(f"{folder}: unreadable healing artifact ({err})") from None
    return cfg, tensors


def detach(model: nn.Module) -> None:
    """Remove the wrappers, restoring the plain modules (no merge)."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, (HealedLinear, HealedNorm)):
                setattr(module, attr, child.base)
    model._lisa_healing = None


@torch.no_grad()
def merge(model: nn.Module, folder: str | Path) -> str:
    """Add a saved healing into `model`'s own weights (W += scale B A; norm.w += delta), in
    the weights' dtype; returns the healing digest. The model has no wrapper afterwards:
    a forward costs what it cost before."""
    cfg, tensors = _read(folder)
    modules = dict(model.named_modules())
    for key, value in tensors.items():
        path, name = key.rsplit(".", 1)
        module = modules.get(path)
        if module is None or not hasattr(module, "weight"):
            raise HealingError(f"{Path(folder) / WEIGHTS_NAME}: {path} is not a module of this model")
        w = module.weight
        if name == "heal_A":
            b = tensors[f"{path}.heal_B"]
            if (b.shape[0], value.shape[1]) != tuple(w.shape):
                raise HealingError(f"{key}: update {(b.shape[0], value.shape[1])} for weight {tuple(w.shape)}")
            w.add_(((b.float() @ value.float()) * cfg.scale).to(w.dtype))
        elif name == "heal_delta":
            if value.shape != w.shape:
                raise HealingError(f"{key}: delta {tuple(value.shape)} for weight {tuple(w.shape)}")
            w.add_(value.to(w.dtype))
        elif name != "heal_B":
            raise HealingError(f"{key}: unknown healing tensor")
    return digest_of(folder)
