"""One exception root for everything shardwise raises on purpose.

    ShardwiseError
    ├── SpecError            a job spec key is missing, unknown or has a bad value (names the key)
    ├── SourceError          the input cannot be listed or read (names the URI)
    ├── ModelError           a model or processor cannot be loaded (names the path)
    ├── OutputError          the output location is in a state the job may not touch (names the fix)
    │   ├── FingerprintMismatch  the output holds shards of a different job
    │   ├── OutputLocked         another run holds the output's lease (names the holder)
    │   └── CorruptOutput        a manifest or commit record cannot be read (names the file)
    ├── ErrorRateExceeded    more bad rows than `max_error_rate` allows
    ├── ClusterError         (jobs.submit) the Ray job server cannot be reached or refuses the request
    └── JobFailed            the Ray job failed for a reason that is not a bad row

Messages say what happened, why, and how to fix it, in one paragraph: the CLI prints them as they are.
Row-level failures are not exceptions that escape: they become error records (see `pipeline.commit`).
"""

from __future__ import annotations

__all__ = [
    "CorruptOutput",
    "ErrorRateExceeded",
    "FingerprintMismatch",
    "JobFailed",
    "ModelError",
    "OutputError",
    "OutputLocked",
    "ShardwiseError",
    "SourceError",
    "SpecError",
]


class ShardwiseError(Exception):
    """Root of every error shardwise raises on purpose."""


class SpecError(ShardwiseError):
    """A job spec is invalid. `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class SourceError(ShardwiseError):
    """The input cannot be listed or read."""


class ModelError(ShardwiseError):
    """A model, tokenizer or processor cannot be loaded."""


class OutputError(ShardwiseError):
    """The output location cannot be used as asked."""


class FingerprintMismatch(OutputError):
    """The output already holds shards written by a different job."""


class OutputLocked(OutputError):
    """Another run holds the output's lease."""


class CorruptOutput(OutputError):
    """A file shardwise wrote in the output (manifest, commit record) cannot be read back."""


class ErrorRateExceeded(ShardwiseError):
    """The share of error rows is above the job's `max_error_rate`."""


class JobFailed(ShardwiseError):
    """The distributed job failed for a reason other than bad rows."""
