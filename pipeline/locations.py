"""Where a job may write: refuse, before anything runs, an output that could destroy what is not its own.

An output folder is refused when it is the filesystem root, the working directory, the home folder, a bare
bucket, or when it is the same as, inside, or above the job's input or any model folder it reads (an
`--overwrite` there would delete them; a write there would mix outputs into the inputs). The rules hold for
inference outputs, fine-tune outputs and fine-tune checkpoints alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import SpecError

__all__ = ["check_output_location", "location"]

_GLOB = re.compile(r"[*?\[]")


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def location(uri: str) -> tuple[str, str]:
    """(scheme, normalised absolute path) to compare locations: local paths resolved (symlinks, `~`, `..`),
    remote ones as `bucket/key` without trailing slashes. A glob stands for its fixed prefix folder."""
    if _GLOB.search(uri):
        uri = _GLOB.split(uri, maxsplit=1)[0].rsplit("/", 1)[0] or "."
    if _is_remote(uri):
        scheme, _, rest = uri.partition("://")
        parts = [p for p in rest.split("/") if p and p != "."]
        if ".." in parts:
            raise SpecError("", f"{uri!r} contains '..'; give the location without it")
        return scheme.lower(), "/".join(parts)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return "file", str(Path(os.path.expanduser(path or ".")).resolve())


def _relation(out: tuple[str, str], other: tuple[str, str]) -> str | None:
    if out[0] != other[0]:
        return None
    a, b = out[1].rstrip("/"), other[1].rstrip("/")
    if a == b:
        return "the same folder as"
    if b.startswith(a + "/") or (out[0] == "file" and a == "/"):
        return "a folder above"
    if a.startswith(b + "/"):
        return "inside"
    return None


def check_output_location(uri: str, *, key: str, protected: Sequence[tuple[str, str]] = ()) -> None:
    """Raise SpecError naming `key` when `uri` is not a safe place for shardwise to write (and, with
    --overwrite, delete its own files). `protected` lists (spec key, location) pairs it must stay clear of:
    the input, every model, the checkpoint folder."""
    if not uri.strip():
        raise SpecError(key, "is empty; give a folder for the job's output, e.g. out/my-job")
    if _GLOB.search(uri):
        raise SpecError(key, f"{uri!r} is a glob pattern; give one folder for the job's output")
    try:
        where = location(uri)
    except SpecError as e:
        raise SpecError(key, str(e)) from None
    fix = "choose a folder of its own, e.g. out/<job-name>"
    if where[0] == "file":
        path = Path(where[1])
        if path == Path(path.anchor):
            raise SpecError(key, f"{uri!r} is the filesystem root; {fix}")
        if path == Path.cwd().resolve():
            raise SpecError(key, f"{uri!r} is the working directory; {fix}")
        if path == Path.home().resolve():
            raise SpecError(key, f"{uri!r} is the home folder; {fix}")
    else:
        if "/" not in where[1]:
            raise SpecError(
                key,
                f"{uri!r} is a whole bucket (or no bucket); write into a folder inside it, e.g. "
                f"{where[0]}://{where[1] or 'bucket'}/out/<job-name>",
            )
    for what, other in protected:
        if not other or not other.strip():
            continue
        try:
            rel = _relation(where, location(other))
        except SpecError:
            continue
        if rel is not None:
            raise SpecError(
                key,
                f"{uri!r} is {rel} {what} ({other!r}); writing there could overwrite or delete it, and outputs "
                f"would mix with what the job reads. {fix[0].upper() + fix[1:]} outside it",
            )
