"""Registry errors: one type per meaning, each message says which object and why."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry operation failed; the message says which and why."""


class RegistryUnavailableError(RegistryError):
    """The MLflow tracking server does not answer."""


class AdapterNotFoundError(RegistryError, LookupError):
    """No registered model / version / alias of that name; the message lists what exists."""


class ChecksumError(RegistryError):
    """Downloaded files do not match the manifest or the version's sha256 tag."""


class PlanExistsError(RegistryError):
    """The base already has a registered sharing plan (its `champion`); replacing it is explicit."""
