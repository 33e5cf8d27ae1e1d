"""Errors about adapters, shared by every kind (one type per meaning)."""

from __future__ import annotations


class AdapterError(ValueError):
    """A corrupted adapter folder, an unknown kind, or an adapter for another backbone."""


class AdapterMismatchError(AdapterError):
    """An adapter made for another base model (fingerprint) or another sharing plan."""
