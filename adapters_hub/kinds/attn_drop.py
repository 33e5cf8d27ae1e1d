"""The `attn_drop` kind: a training-free drop plan (adapters_hub/drop), no tensors."""

from __future__ import annotations

from adapters_hub.kinds import AdapterError, check_compatible, kind_state, read_config


class AttnDropKind:
    """A training-free drop plan; activating applies it, deactivating restores the layers."""

    name = "attn_drop"
    trainable = False
    prefix = ""
    needs_plan = False
    batches_per_row = False       # a structural change of the whole model
    composes_with_sharing = True

    def add(self, lm, adapter_name, options):
        raise AdapterError("attn_drop adapters are made by `lisa-hub drop`, not trained; load one instead")

    def save(self, lm, adapter_name, directory):
        return kind_state(lm, self.name)[adapter_name].save(directory)

    def load(self, lm, directory, adapter_name):
        from adapters_hub.drop.model import DropAdapter

        config = read_config(directory)
        check_compatible(config, lm, str(directory), needs_plan=False)
        kind_state(lm, self.name)[adapter_name] = DropAdapter.load(directory)

    def activate(self, lm, adapter_name):
        # `load` checked the adapter against the backbone's fingerprint; the live model's own
        # fingerprint differs once W_q/W_k are pruned or healing is merged, so not again here.
        kind_state(lm, self.name)[adapter_name].activate(lm.get_base_model(), check=False)

    def deactivate(self, lm, adapter_name):
        kind_state(lm, self.name)[adapter_name].deactivate(lm.get_base_model())

    def delete(self, lm, adapter_name):
        kind_state(lm, self.name).pop(adapter_name, None)
