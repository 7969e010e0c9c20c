"""Where models come from: a local directory, any fsspec URI (copied once per node into a cache), or a
hub id (with optional revision). Weights load as safetensors only.

`resolve_model` runs where the model is used (inside the actor or the preprocess task), so an actor that
restarts on another node fetches its own copy; only the URI travels through Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ModelError

__all__ = ["cache_dir", "model_identity", "resolve_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files hashed into the job fingerprint: weights and everything that changes outputs (config, vocab).
_IDENTITY_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".bin")


def cache_dir() -> Path:
    root = Path(os.environ.get("SHARDWISE_CACHE", Path.home() / ".cache" / "shardwise"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()


def resolve_model(
    uri: str, *, revision: str | None = None, storage_options: dict[str, Any] | None = None
) -> str:
    """A path (or hub id) that `from_pretrained` can load."""
    if _is_remote(uri):
        return _fetch_remote(uri, storage_options or {})
    path = _local_path(uri)
    if path.is_dir():
        return str(path.resolve())
    if _HUB_ID.match(uri) and not path.exists() and not uri.startswith((".", "/", "~")):
        return uri  # a hub id; from_pretrained resolves it (offline machines fail there, with HF's message)
    raise ModelError(
        f"model {uri!r} is neither a local directory nor a URI nor a hub id; point `model` at a folder "
        "with config.json and *.safetensors (e.g. the output of a shardwise fine-tune)"
    )


def _fetch_remote(uri: str, storage_options: dict[str, Any]) -> str:
    import fsspec
    from filelock import FileLock

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    try:
        listing = sorted(fs.find(root, detail=True).items())
    except Exception as e:  # noqa: BLE001 - any backend error means the same to the user
        raise ModelError(f"cannot list model {uri!r}: {e}") from e
    if not listing:
        raise ModelError(f"model {uri!r} is empty or does not exist")
    key = hashlib.sha256(
        json.dumps(
            [
                (p, info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("mtime")))
                for p, info in listing
            ]
        ).encode()
    ).hexdigest()[:16]
    dest = cache_dir() / "models" / key
    with FileLock(str(dest) + ".lock"):
        if not (dest / ".complete").exists():
            dest.mkdir(parents=True, exist_ok=True)
            for path, _ in listing:
                rel = os.path.relpath(path, root.rstrip("/"))
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(target))
            (dest / ".complete").touch()
    return str(dest)


def _sha256_file(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime, inode, ctime) so reruns of a big model do not re-read it.

    ctime is in the key because mtime alone can be set back (`os.utime`, `cp -p`, `rsync -t`, `touch -d`):
    weights rewritten in place with the same size and a restored mtime would otherwise keep the old hash,
    and resume would mix outputs of two models. Any write or utime moves ctime, and it cannot be set back."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}|{st.st_ino}|{st.st_ctime_ns}"
    memo_key = hashlib.sha256(stamp.encode()).hexdigest()
    memo = cache_dir() / "hashes" / memo_key
    if memo.exists():
        return memo.read_text()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(h.hexdigest())
    return h.hexdigest()


def model_identity(
    uri: str, *, revision: str | None = None, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What identifies a model's outputs, for the job fingerprint: content hashes of local files, the
    listing (sizes + etags) of remote ones, or the hub id + revision."""
    if _is_remote(uri):
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        listing = sorted(fs.find(root, detail=True).items())
        return {
            "uri": uri,
            "files": {
                os.path.relpath(p, root.rstrip("/")): [
                    i.get("size"),
                    str(i.get("ETag") or i.get("etag") or ""),
                ]
                for p, i in listing
            },
        }
    path = _local_path(uri)
    if path.is_dir():
        files = {
            str(p.relative_to(path)): _sha256_file(p)
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and p.suffix in _IDENTITY_SUFFIXES
            and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)
        }
        return {"uri": str(path.resolve()), "files": files}
    return {"hub_id": uri, "revision": revision or "main"}
