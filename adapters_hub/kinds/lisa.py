"""The `lisa` kind: per-task LiSA modules (head aligners + low-rank Q/K) on a LiSA backbone."""

from __future__ import annotations

from adapters_hub.kinds import only_trainable


class LisaKind:
    """Native LiSA adapters: LisaModel already keeps them per name."""

    name = "lisa"
    trainable = True
    prefix = "lisa_"
    needs_plan = True
    batches_per_row = True        # one adapter per row: LisaAttention routes rows by name
    composes_with_sharing = True

    def add(self, lm, adapter_name, options):
        from dataclasses import replace

        config = replace(next(iter(lm.peft_config.values())), **options)
        lm.add_adapter(adapter_name, config)
        only_trainable(lm, self, adapter_name)

    def save(self, lm, adapter_name, directory):
        return lm.save_adapter(directory, adapter_name)

    def load(self, lm, directory, adapter_name):
        lm.load_adapter(directory, adapter_name)

    def activate(self, lm, adapter_name):
        lm.set_adapter(adapter_name)

    def deactivate(self, lm, adapter_name):
        pass  # the next activate replaces it; LiSA layers always need some adapter

    def delete(self, lm, adapter_name):
        lm.delete_adapter(adapter_name)
