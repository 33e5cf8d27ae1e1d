"""`LisaModel`: a HF causal LM turned into a LiSA backbone carrying PEFT-style adapters.

    lm = LisaModel(model, LisaConfig(plan=plan))           # wraps in place, base frozen
    out = lm(input_ids=ids, attention_mask=am, labels=ids) # HF CausalLMOutputWithPast
    lm.save_adapter("out/gsm8k")                           # adapter_config.json + adapter_model.safetensors
    lm.load_adapter("out/gsm8k", "gsm8k"); lm.set_adapter("gsm8k")
    with lm.adapter_per_row(["a", "b", "a"]): lm.generate(...)   # one adapter per row
    lm.add_lora_parts("gsm8k", LoraParts(r=4))            # + low-rank updates of o/v/MLP linears
    lm.prune_qk()                                          # free W_q/W_k of substituted layers
                                                           # (and all of a dropped layer's attention)

Like PEFT's tuners, every adapter tensor sits in a `lisa_*` ModuleDict keyed by adapter
name inside the replaced attention modules (and, for an adapter's LoRA parts, inside the
target linears: `o_proj.lisa_lora_A.<name>`, see `adapters_hub.multi_lora`); saving,
loading and `requires_grad` all filter on the `lisa_` prefix. Base weights keep their
state-dict names.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from adapters_hub import multi_lora
from adapters_hub.errors import AdapterMismatchError
from adapters_hub.lisa.config import LisaConfig
from adapters_hub.lisa.layer import DroppedAttention, LisaAttention, ScoredAttention
from adapters_hub.lisa.scores import ScoreBus
from adapters_hub.lisa.plan import SharingPlan

PREFIX = "lisa_"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SUPPORTED_ATTN = (None, "eager", "sdpa")


def decoder_of(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise TypeError(f"{type(model).__name__}: no decoder `.layers`; LiSA supports HF LLaMA-family models")
    return decoder


class SharingPatch:
    """The structural part: swaps attention modules for a plan and back (no adapters).
    Dense donors become `ScoredAttention`, substituted layers `LisaAttention`, dropped layers
    `DroppedAttention`."""

    def __init__(self, model: nn.Module, plan: SharingPlan, bus: ScoreBus | None = None,
                 score_all: bool = False) -> None:
        from adapters_hub import architectures

        architectures.check(model.config)  # an unsupported family fails here, before any module is touched
        plan.check_model(model)
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTN:  # flash / flex masks are not 4-D tensors we can add to scores
            warnings.warn(f"LiSA: attention implementation {impl!r} replaced by 'sdpa'", stacklevel=3)
            model.set_attn_implementation("sdpa")
        self.model, self.plan = model, plan
        consumers: dict[int, int] = {}
        for s in plan.shared:
            consumers[s.donor] = consumers.get(s.donor, 0) + 1
        self.bus = bus or ScoreBus(consumers)
        self.bus.consumers = consumers
        decoder = decoder_of(model)
        self.layers = decoder.layers
        self.originals: dict[int, nn.Module] = {}
        for i, layer in enumerate(self.layers):
            shared = plan.get(i)
            if isinstance(layer.self_attn, (LisaAttention, ScoredAttention)):
                raise RuntimeError(f"layer {i} is already wrapped by LiSA; unload the other wrapper first")
            dropped = i in plan.dropped
            if shared is None and not (dropped or score_all or i in consumers):
                continue
            self.originals[i] = layer.self_attn
            layer.self_attn = (LisaAttention(layer.self_attn, shared, self.bus) if shared
                               else DroppedAttention(layer.self_attn, self.bus) if dropped
                               else ScoredAttention(layer.self_attn, self.bus))
            if dropped and hasattr(layer, "input_layernorm"):
                _gate_norm(layer.input_layernorm, layer.self_attn)
            layer.self_attn.train(self.originals[i].training)  # the model's mode, and with it the route
        # Reset the bus at the start of every decoder pass (not per layer: checkpoint recomputation
        # of a layer during backward must still find its donor's scores).
        self._hook = decoder.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, module, args) -> None:
        bus = self.bus
        bus.reset()
        bus.keep = torch.is_grad_enabled() or module.training
        if (bus.distill is not None or bus.observer is not None) and any(
                a.route != "reference" for a in self.wrapped()):
            raise RuntimeError("LiSA: a distillation collector or observer reads the score tensors, but layers are "
                               "bound to the fast route; set it through `distillation(...)` or call "
                               "`bind_routes()` after setting it")

    def wrapped(self) -> list[ScoredAttention | LisaAttention | DroppedAttention]:
        return [l.self_attn for l in self.layers if isinstance(l.self_attn, ScoredAttention | LisaAttention)]

    def bind_routes(self) -> None:
        """Bind every wrapped layer's forward route again (`layer._AttentionBase.bind_route`):
        after the bus's fast/kernel settings or its distillation collector changed. Mode
        changes (`train()`, `eval()`) bind by themselves."""
        for attn in self.wrapped():
            attn.bind_route()

    def lisa_layers(self) -> dict[int, LisaAttention]:
        return {i: l.self_attn for i, l in enumerate(self.layers) if isinstance(l.self_attn, LisaAttention)}

    def gated_layers(self) -> list[LisaAttention | DroppedAttention]:
        """The layers that act differently while an adapter is active (shared and dropped)."""
        return [l.self_attn for l in self.layers if isinstance(l.self_attn, (LisaAttention, DroppedAttention))]

    def restore(self) -> nn.Module:
        for i, original in self.originals.items():
            if original.q_proj is None:
                raise RuntimeError(f"layer {i}: W_q/W_k were pruned; the dense model cannot be restored")
            self.layers[i].self_attn = original
            norm = getattr(self.layers[i], "input_layernorm", None)
            if norm is not None and hasattr(norm, _GATED):  # a dropped layer's norm (see _gate_norm)
                previous = getattr(norm, _GATED)
                delattr(norm, _GATED)
                if previous is None:
                    del norm.forward  # the class's forward again
                else:
                    norm.forward = previous
        self.originals.clear()
        self._hook.remove()
        return self.model


_GATED = "_lisa_gated_previous_forward"  # on a gated norm: the instance forward it had before (or None)


def _gate_norm(norm: nn.Module, attn: DroppedAttention) -> None:
    """While `attn` drops its attention, the norm before it has no reader: skip it too (an
    instance forward, as adapters_hub/drop/layer.py does for whole layers, so state-dict
    keys stay). With adapters disabled it normalises again, for the dense teacher. A
    forward the instance had before (another tool's hook) runs then, and comes back on
    restore."""
    from types import MethodType

    previous = norm.__dict__.get("forward")
    setattr(norm, _GATED, previous)

    def forward(self, x):
        if attn.dropping:
            return x
        return previous(x) if previous is not None else type(self).forward(self, x)

    norm.forward = MethodType(forward, norm)


class LisaModel(nn.Module):
    """PEFT-style wrapper (`self.model` is the HF model, as in PEFT's BaseTuner); `forward`,
    `generate` and other attribute access go to it, so HF/TRL code sees a causal LM."""

    def __init__(self, model: nn.Module, config: LisaConfig, adapter_name: str = "default", *,
                 fingerprint: str | None = None) -> None:
        super().__init__()
        from adapters_hub.models import fingerprint as base_fingerprint

        if isinstance(model, LisaModel):
            raise TypeError("model is already a LisaModel")
        # Fingerprint first, on the unmodified base (adapter and pruned tensors do not exist yet).
        self.base_fingerprint = fingerprint or base_fingerprint(model)
        self.base_name = getattr(model.config, "lisa_hub_base", None) or getattr(model.config, "_name_or_path", None)
        self.model = model
        self.plan = config.plan
        self._patch = SharingPatch(model, config.plan)
        self._router = multi_lora.router_of(model)
        self.base_adapter = adapter_name  # the LiSA adapter of rows whose adapter has none (lora kind)
        self.peft_config: dict[str, LisaConfig] = {}
        self._active: str | None = None
        self.pruned = False
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ---- delegation ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped HF model (PEFT's name); `base_model` is, as in HF, its decoder."""
        return self.model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self.adapter_per_row(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self.adapter_per_row(adapter_names):
            return self.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        # Non-reentrant: the recomputed layer reads its donor's scores with their autograd graph.
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- adapters -----------------------------------------------------------------
    @property
    def lisa_layers(self) -> dict[int, LisaAttention]:
        return self._patch.lisa_layers()

    @property
    def bus(self):
        """The per-forward side channel of this model's layers (`scores.ScoreBus`)."""
        return self._patch.bus

    @property
    def fast_path(self) -> bool:
        """Inference (eval mode) runs the fast path (see `adapters_hub.lisa.scores`); False
        binds the reference path, which materialises every score tensor, in eval mode too."""
        return self._patch.bus.fast

    @fast_path.setter
    def fast_path(self, value: bool) -> None:
        self._patch.bus.fast = bool(value)
        self._patch.bind_routes()
        self._router.route = "gather" if value else "loop"

    @property
    def fast_kernel(self) -> str:
        """How the fast path attends over factored scores: "blocks" (query blocks, the
        root's head mix in score space), "fused" (one SDPA call over mixed queries) or
        "auto" (blocks on CPU, fused elsewhere). Same results; benchmarks compare them."""
        return self._patch.bus.kernel

    @fast_kernel.setter
    def fast_kernel(self, value: str) -> None:
        if value not in ("auto", "blocks", "fused"):
            raise ValueError(f"fast_kernel: {value!r} is not one of auto, blocks, fused")
        self._patch.bus.kernel = value
        self._patch.bind_routes()

    def bind_routes(self) -> None:
        """Bind every LiSA layer's forward route again from the mode and the bus settings
        (what `train()`, `eval()`, `fast_path` and `fast_kernel` do themselves): after moving
        the model to another device, whose kind "auto" resolves by."""
        self._patch.bind_routes()

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def adapters(self) -> list[str]:
        return list(self.peft_config)

    def add_adapter(self, adapter_name: str, config: LisaConfig) -> None:
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name: {adapter_name!r} must be non-empty and contain no '.'")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name: {adapter_name!r} is already loaded")
        if config.plan.hash != self.plan.hash:
            raise AdapterMismatchError(
                f"plan: adapter {adapter_name!r} was made for plan {config.plan.hash}, this backbone has plan "
                f"{self.plan.hash}")
        config = config.with_base(self.base_name, self.base_fingerprint)
        for layer in self.lisa_layers.values():
            layer.add_adapter(adapter_name, aligner=config.aligner, aligner_hidden=config.h_ff, act=config.aligner_act,
                              aligner_init_std=config.aligner_init_std, lowrank_init_std=config.lowrank_init_std)
        self.peft_config[adapter_name] = config
        if config.lora_parts is not None:
            self._add_parts(adapter_name, config.lora_parts)
        self._refresh_grad()

    def add_lora_parts(self, adapter_name: str, parts: "multi_lora.LoraParts") -> int:
        """Give a loaded adapter fresh LoRA parts (B = 0: its outputs do not change); a task
        adapter that starts from the general adapter gets them this way. Returns their size."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"adapter_name: {adapter_name!r} is not loaded")
        if self.peft_config[adapter_name].lora_parts is not None:
            raise ValueError(f"adapter_name: {adapter_name!r} already has LoRA parts")
        from dataclasses import replace

        self.peft_config[adapter_name] = replace(self.peft_config[adapter_name], lora_parts=parts)
        count = self._add_parts(adapter_name, parts)
        self._refresh_grad()
        return count

    def _add_parts(self, adapter_name: str, parts: "multi_lora.LoraParts") -> int:
        layers = None if parts.layers == "all" else list(self.plan.layers)
        return multi_lora.add(self.model, adapter_name, parts, prefix="lisa_lora_", layers=layers,
                              skip=self.idle_projections())

    def idle_projections(self) -> set[tuple[int, str]]:
        """(layer, projection) pairs that never run while an adapter is active: W_q / W_k of a
        substituted layer, every projection of a dropped layer's attention (what `prune_qk`
        frees; no LoRA update goes there)."""
        idle = {(i, proj) for i in self.plan.layers for proj in ("q_proj", "k_proj")}
        return idle | {(i, proj) for i in self.plan.dropped for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def set_adapter(self, adapter_name: str) -> None:
        """Activate one adapter; only its tensors require grad."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"adapter_name: {adapter_name!r} is not loaded (loaded: {', '.join(self.peft_config)})")
        self._active = adapter_name
        self._router.active["lisa"] = adapter_name
        for layer in self._patch.gated_layers():
            layer.active_adapter = adapter_name
        self._refresh_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise KeyError(f"adapter_name: {adapter_name!r} is not loaded")
        for layer in self.lisa_layers.values():
            layer.delete_adapter(adapter_name)
        multi_lora.delete(self.model, adapter_name)
        del self.peft_config[adapter_name]
        if self._active == adapter_name:
            self._active = None
            for layer in self._patch.gated_layers():
                layer.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def _refresh_grad(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(PREFIX in name and self._active is not None and f".{self._active}." in name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Substituted and dropped layers run their original dense attention (needs W_q/W_k);
        no LoRA update of any adapter applies."""
        layers = self._patch.gated_layers()
        active = dict(self._router.active)
        for layer in layers:
            layer.active_adapter = None
        self._router.active.clear()
        try:
            yield
        finally:
            for layer in layers:
                layer.active_adapter = self._active
            self._router.active.update(active)

    @contextlib.contextmanager
    def adapter_per_row(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Route row b of every forward inside the block through adapter adapter_names[b]
        (generate's expanded batches, e.g. num_return_sequences, repeat each name). A name
        may be a LiSA adapter (its LiSA tensors and LoRA parts) or a `lora`-kind adapter (its
        LoRA updates, the LiSA layers on `base_adapter`)."""
        if adapter_names is None:
            yield
            return
        names = [str(n) for n in adapter_names]
        unknown = sorted(n for n in set(names) - set(self.peft_config) if not multi_lora.has_parts(self.model, n))
        if unknown:
            raise KeyError(f"adapter_names: {unknown} not loaded (loaded: {', '.join(self.peft_config)})")
        bus, router = self._patch.bus, self._router
        lisa_names = [n if n in self.peft_config else self.base_adapter for n in names]
        previous = bus.row_adapters, router.rows, router.unique
        bus.row_adapters, router.rows, router.unique = lisa_names, names, frozenset(names)
        try:
            yield
        finally:
            bus.row_adapters, router.rows, router.unique = previous

    # ---- state --------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keys without the adapter name (PEFT style)."""
        name = adapter_name or self._active
        if name not in self.peft_config:
            raise KeyError(f"adapter_name: {name!r} is not loaded")
        out = {}
        for key, tensor in self.model.state_dict().items():
            parts = key.split(".")
            for i, part in enumerate(parts[:-1]):
                if part.startswith(PREFIX) and parts[i + 1] == name:
                    out[".".join(parts[: i + 1] + parts[i + 2 :])] = tensor
                    break
        return out

    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        from safetensors.torch import save_file

        name = adapter_name or self._active
        state = self.adapter_state_dict(name)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS_NAME),
                  metadata={"format": "pt", "plan_hash": self.plan.hash, "base_fingerprint": self.base_fingerprint})
        data = self.peft_config[name].to_dict()
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return directory

    def load_adapter(self, directory: str | Path, adapter_name: str = "default", *, activate: bool = False) -> str:
        """Load a saved adapter under `adapter_name`; refuses another base or plan."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory / CONFIG_NAME} does not exist: not a saved LiSA adapter")
        config = LisaConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")))
        if config.base_fingerprint != self.base_fingerprint:
            raise AdapterMismatchError(
                f"base_fingerprint: adapter {directory} was made for base {config.base_model!r} with fingerprint "
                f"{config.base_fingerprint}, this backbone is {self.base_name!r} with fingerprint {self.base_fingerprint}")
        if config.plan.hash != self.plan.hash:
            raise AdapterMismatchError(
                f"plan: adapter {directory} was made for plan {config.plan.hash}, this backbone has plan "
                f"{self.plan.hash} ({config.plan.summary()} vs {self.plan.summary()})")
        state = load_file(str(directory / WEIGHTS_NAME))
        self.add_adapter(adapter_name, config)
        try:
            expected = self.adapter_state_dict(adapter_name)
            if set(expected) != set(state):
                missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
                raise AdapterMismatchError(f"{WEIGHTS_NAME}: missing {missing[:3]}, unexpected {extra[:3]}")
            with torch.no_grad():
                for key, target in expected.items():
                    if target.shape != state[key].shape:
                        raise AdapterMismatchError(f"{key}: shape {tuple(state[key].shape)} != {tuple(target.shape)}")
                    target.copy_(state[key])
            multi_lora.changed(self.model)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if activate or self._active is None:
            self.set_adapter(adapter_name)
        return adapter_name

    # ---- backbone -----------------------------------------------------------------
    def prune_qk(self) -> int:
        """Free the full W_q and W_k of every substituted layer, and every projection of a
        dropped layer's attention (none of them runs while an adapter is active); returns
        the parameters freed."""
        freed = 0
        for i, proj in sorted(self.idle_projections()):
            attn = self._patch.layers[i].self_attn
            if getattr(attn, proj) is None:  # pruned before
                continue
            freed += sum(p.numel() for p in getattr(attn, proj).parameters())
            setattr(attn, proj, None)
            setattr(self._patch.originals[i], proj, None)
        self.pruned = True
        return freed

    def unload(self) -> nn.Module:
        """Remove LiSA: the base model with its original attention modules (not after prune_qk)."""
        for name in list(self.peft_config):
            self.delete_adapter(name)
        return self._patch.restore()

    def trainable_report(self) -> dict[str, Any]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        adapter = sum(t.numel() for t in self.adapter_state_dict().values()) if self._active else 0
        return {"adapter": self._active, "trainable": trainable, "total": total,
                "fraction": trainable / total if total else 0.0, "adapter_params": adapter,
                "shared_layers": len(self.plan.shared), "num_layers": self.plan.num_layers}

    def print_trainable_parameters(self) -> None:
        r = self.trainable_report()
        print(f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || "
              f"trainable%: {100 * r['fraction']:.4f} ({r['shared_layers']}/{r['num_layers']} layers shared)")
