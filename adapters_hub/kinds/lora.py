"""The `lora` kind: PEFT LoRA injected into the backbone's linears, one per adapter name."""

from __future__ import annotations

import json
from pathlib import Path

from adapters_hub.kinds import (CONFIG_NAME, WEIGHTS_NAME, AdapterError, check_compatible, kind_state, only_trainable,
                                read_config)


class LoraKind:
    """PEFT LoRA injected into the backbone's modules (no PeftModel wrapper), one per name.

    The LiSA layers stay on the backbone's fresh adapter (aligned direct sharing), so a
    LoRA adapter is comparable to a LiSA one trained on the same backbone."""

    name = "lora"
    trainable = True
    prefix = "lora_"
    needs_plan = True
    batches_per_row = False       # PEFT activates one LoRA for every row (served in-process by Backbone.use)
    composes_with_sharing = True
    defaults = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}

    def add(self, lm, adapter_name, options):
        from peft import LoraConfig, inject_adapter_in_model

        options = {**self.defaults, **options}
        inject_adapter_in_model(LoraConfig(**options), lm.get_base_model(), adapter_name=adapter_name)
        kind_state(lm, self.name)[adapter_name] = options
        only_trainable(lm, self, adapter_name)
        self.activate(lm, adapter_name)

    def save(self, lm, adapter_name, directory):
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = f".{adapter_name}."
        tensors = {k.replace(tag, "."): v.detach().cpu().contiguous()
                   for k, v in lm.get_base_model().state_dict().items() if "lora_" in k and tag in k}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        config = {"kind": self.name, "base_model": lm.base_name, "base_fingerprint": lm.base_fingerprint,
                  "plan_hash": lm.plan.hash, "lora": kind_state(lm, self.name)[adapter_name]}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return directory

    def load(self, lm, directory, adapter_name):
        from safetensors.torch import load_file

        config = read_config(directory)
        check_compatible(config, lm, str(directory), needs_plan=True)
        try:
            tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
        except Exception as err:
            raise AdapterError(f"{directory}: corrupted {WEIGHTS_NAME} ({err})") from None
        self.add(lm, adapter_name, config["lora"])
        state = {_insert_name(k, adapter_name): v for k, v in tensors.items()}
        if lm.pruned:  # LoRA on a pruned W_q/W_k of a substituted layer never ran: nothing to load there
            pruned = tuple(f"layers.{i}.self_attn.{proj}." for i in lm.lisa_layers for proj in ("q_proj", "k_proj"))
            state = {k: v for k, v in state.items() if not any(p in k for p in pruned)}
        missing = set(state) - set(lm.get_base_model().state_dict())
        if missing:
            self.delete(lm, adapter_name)
            raise AdapterError(f"{directory}: tensors do not fit this backbone: {sorted(missing)[:3]}")
        lm.get_base_model().load_state_dict(state, strict=False)
        for p in lm.get_base_model().parameters():
            p.requires_grad_(False)

    def activate(self, lm, adapter_name):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in lm.get_base_model().modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(True)
                module.set_adapter(adapter_name)

    def deactivate(self, lm, adapter_name):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in lm.get_base_model().modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)

    def delete(self, lm, adapter_name):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in lm.get_base_model().modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A:
                module.delete_adapter(adapter_name)
        kind_state(lm, self.name).pop(adapter_name, None)


def _insert_name(key: str, adapter_name: str) -> str:
    # "...q_proj.lora_A.weight" -> "...q_proj.lora_A.<name>.weight"
    head, _, leaf = key.rpartition(".")
    return f"{head}.{adapter_name}.{leaf}"
