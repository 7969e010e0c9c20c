"""The shardwise engine, task-agnostic: spec → plan (shards) → Ray execution → commit."""

__version__ = "0.1.0"

__all__ = ["__version__"]
