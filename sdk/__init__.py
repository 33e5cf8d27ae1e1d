"""lisa-hub SDK: submit adaptations, follow jobs, browse adapters, hot-swap them.

    import sdk
    sdk.submit_conversion(base_model="smollm2-135m", fraction=0.6).wait()  # the LiSA backbone
    sdk.submit_pretraining(config="bytes-6l", plan_fraction=0.5).wait()     # a LiSA model from scratch
    job = sdk.submit_adaptation(task="gsm8k")      # a Ray job on the cluster
    result = job.wait()                            # registered model version + metrics
    sdk.list_adapters(task="gsm8k")                # MLflow registry
    bb = sdk.Backbone.load(base_model="smollm2-135m"); bb.use("gsm8k"); bb.generate("...")

Imports are light: torch, Ray and MLflow load when a call needs them.
"""

from sdk.client import (AdaptationJob, AdaptationResult, ClusterUnavailableError, ConversionJob, ConversionResult,
                        JobFailedError, JobStatus, JobSummary, PretrainingJob, PretrainingResult, get_job, list_jobs,
                        submit_adaptation, submit_conversion, submit_pretraining)
from sdk.batch import BatchResult, batch_generate
from sdk.evaluate import HarnessResult, evaluate_harness
from sdk.hotswap import ActiveAdapter, Backbone


def list_adapters(*, task: str | None = None, tracking_uri: str | None = None):
    """Registered adapter versions (newest first), optionally of one task.

    >>> [a.ref for a in list_adapters(task="gsm8k")]  # doctest: +SKIP
    ['gsm8k-lisa/2', 'gsm8k-lisa/1']
    """
    from adapters_hub import registry

    records = registry.list_adapters(task=task, tracking_uri=tracking_uri)
    return sorted(records, key=lambda r: (r.name, -int(r.version)))


def get_adapter(ref: str, *, tracking_uri: str | None = None):
    """One adapter version: "gsm8k-lisa@champion", "gsm8k-lisa/3" or "gsm8k-lisa"."""
    from adapters_hub import registry

    return registry.get_adapter(ref, tracking_uri=tracking_uri)


def promote(*, name: str, version: str | int, alias: str = "champion", tracking_uri: str | None = None):
    """Point `alias` of registered model `name` at `version`."""
    from adapters_hub import registry

    return registry.promote(name, version, alias, tracking_uri=tracking_uri)


__all__ = ["submit_adaptation", "submit_conversion", "submit_pretraining", "ConversionJob", "ConversionResult",
           "PretrainingJob", "PretrainingResult", "get_job", "list_jobs", "AdaptationJob", "AdaptationResult", "JobStatus",
           "JobSummary", "JobFailedError", "ClusterUnavailableError", "Backbone", "ActiveAdapter",
           "list_adapters", "get_adapter", "promote", "evaluate_harness", "HarnessResult",
           "batch_generate", "BatchResult"]
