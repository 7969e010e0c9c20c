"""Machine-level helpers that are not part of a job: fetching the real model and data the demo and tests use
(`infra.assets`)."""

__all__ = []
