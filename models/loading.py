"""Where models come from: a local directory, any fsspec URI (copied once per node into a cache), or a
hub id (with optional revision). Weights load as safetensors only.

`resolve_model` runs where the model is used (inside the actor or the preprocess task), so an actor that
restarts on another node fetches its own copy; only the URI travels through Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from models.lora import ADAPTER_CONFIG, adapter_base, load_adapter_model
from pipeline.errors import ModelError
from pipeline.redact import scrub, secret_values

__all__ = ["cache_dir", "check_model", "load_pretrained", "model_identity", "resolve_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files hashed into the job fingerprint: weights and everything that changes outputs (config, vocab).
_IDENTITY_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".bin")
# Written last into a fetched model folder (before it is renamed into place).
_COMPLETE = ".complete"


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


def check_model(
    uri: str, *, revision: str | None = None, storage_options: dict[str, Any] | None = None
) -> None:
    """Fail fast, before Ray starts, when `uri` cannot be a loadable model. Never touches the network for
    a hub id (an offline machine would wait on DNS): only the local Hugging Face cache is consulted.

    - a local folder: must hold config.json and *.safetensors weights (pickle weights are refused);
    - a remote URI: must list, and hold config.json and *.safetensors at its top level;
    - a hub id (owner/name) that is not a local path: must be in the local Hugging Face cache.
    """
    if _is_remote(uri):
        import fsspec

        options = storage_options or {}
        try:
            fs, root = fsspec.core.url_to_fs(uri, **options)
            names = {posixpath.relpath(p, root.rstrip("/")) for p in fs.find(root)}
        except Exception as e:  # noqa: BLE001 - any backend error means the same to the user
            raise ModelError(f"cannot list model {uri!r}: {_scrubbed(e, options)}") from e
        if not names:
            raise ModelError(f"model {uri!r} is empty or does not exist; point `model` at a model folder")
        _check_files(uri, names)
        if ADAPTER_CONFIG in names:
            _check_adapter_base(uri, fs.cat_file(posixpath.join(root, ADAPTER_CONFIG)).decode())
        return
    path = _local_path(uri)
    if path.is_dir():
        _check_files(uri, {str(p.relative_to(path)) for p in path.iterdir()})
        if (path / ADAPTER_CONFIG).is_file():
            _check_adapter_base(uri, (path / ADAPTER_CONFIG).read_text())
        return
    where = f"{uri!r} (resolved to {path.resolve()})"
    if path.exists():
        raise ModelError(f"model {where} is a file; point `model` at the folder that holds config.json")
    if _HUB_ID.match(uri) and not uri.startswith((".", "/", "~")):
        if _in_hub_cache(uri, revision):
            return
        raise ModelError(
            f"model {where} is not a local folder, and the hub id {uri!r}"
            + (f" (revision {revision!r})" if revision else "")
            + " is not in the local Hugging Face cache; shardwise does not download from the hub (the hub "
            "cannot be reached from here, or has no such model). A typo? Point `model` at a local folder "
            "with config.json and *.safetensors, or download the model first (huggingface-cli download "
            f"{uri}) on a machine with access"
        )
    raise ModelError(
        f"model {where} does not exist, and it is not a known hub id either; point `model` at a folder "
        "with config.json and *.safetensors (e.g. the output of a shardwise fine-tune)"
    )


def _check_files(uri: str, names: set[str]) -> None:
    """Top-level file names of a model folder: a config and safetensors weights."""
    if "config.json" not in names and ADAPTER_CONFIG in names:
        raise ModelError(
            f"model {uri!r} is a LoRA adapter folder without the fine-tuned model's config.json; shardwise "
            "loads adapter folders that a shardwise fine-tune wrote (train.lora.merge: false), which keep "
            "config.json and the tokenizer/processor files next to the adapter. Merge this adapter into its "
            "base once (peft: PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) "
            "and point `model` at the merged folder"
        )
    if "config.json" not in names:
        raise ModelError(
            f"model {uri!r} has no config.json; point `model` at the folder that holds config.json and the "
            "*.safetensors weights (not a parent or a sub-folder)"
        )
    if not any(n.endswith(".safetensors") and "/" not in n for n in names):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        raise ModelError(
            f"model {uri!r} has no *.safetensors weights"
            + (f" (only pickle weights: {pickles[:3]})" if pickles else "")
            + "; shardwise loads safetensors only, because loading pickle can run arbitrary code. Convert "
            "it once where you trust it: AutoModel.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)"
        )


def _check_adapter_base(uri: str, config_text: str) -> None:
    """A LoRA adapter folder is only as loadable as the base model its adapter_config.json names."""
    base = adapter_base(config_text, uri=uri)
    if base.rstrip("/") == uri.rstrip("/"):
        raise ModelError(f"model {uri!r}: {ADAPTER_CONFIG} names the adapter folder itself as its base")
    try:
        check_model(base)
    except ModelError as e:
        raise ModelError(
            f"model {uri!r} is a LoRA adapter whose base model (base_model_name_or_path in {ADAPTER_CONFIG}) "
            f"cannot be loaded: {e}. Put the base model back where the fine-tune read it, or edit "
            f"base_model_name_or_path to where it is now"
        ) from e


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not cached
        return False
    return isinstance(found, str)


def _fetch_remote(uri: str, storage_options: dict[str, Any]) -> str:
    """Copy a remote model folder into the node's cache, once, and return the local folder.

    Confined: every object's key must be a plain relative path under the model's root (no `..`, no empty
    or absolute part), and its target resolves inside the cache folder, or nothing is fetched. Atomic: the
    objects are downloaded into a temp folder beside the destination, which is renamed into place once
    complete, so a killed download is never used; the per-model FileLock serialises concurrent fetchers.
    """
    import fsspec
    from filelock import FileLock

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    try:
        listing = sorted(fs.find(root, detail=True).items())
    except Exception as e:  # noqa: BLE001 - any backend error means the same to the user
        raise ModelError(f"cannot list model {uri!r}: {_scrubbed(e, storage_options)}") from e
    if not listing:
        raise ModelError(f"model {uri!r} is empty or does not exist")
    files = [(path, _relative_key(path, root, uri)) for path, _ in listing]
    key = hashlib.sha256(
        json.dumps(
            [
                (p, info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("mtime")))
                for p, info in listing
            ]
        ).encode()
    ).hexdigest()[:16]
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    dest = models / key
    with FileLock(str(dest) + ".lock"):
        if dest.is_symlink() or not (dest / _COMPLETE).is_file():
            for stale in models.glob(f".{key}.*"):  # killed downloads of this model; we hold its lock
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=models))
            try:
                for path, rel in files:
                    target = _inside(staging, rel, key=path, uri=uri)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _inside(staging, rel, key=path, uri=uri)  # again, now that its folders exist
                    fs.get_file(path, str(target))
                links = [str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_symlink()]
                if links:
                    raise ModelError(
                        f"model {uri!r}: fetching {links[0]!r} made a symbolic link; refusing the model "
                        "(a link can point outside the cache)"
                    )
                (staging / _COMPLETE).touch()
                if dest.is_symlink() or dest.is_file():
                    dest.unlink()
                elif dest.exists():
                    shutil.rmtree(dest)  # an incomplete folder left by an older shardwise
                os.replace(staging, dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return str(dest)


def _relative_key(path: str, root: str, uri: str) -> str:
    """`path`'s key relative to the model root, refused unless it is a plain relative path."""
    root = root.rstrip("/")
    rel = path[len(root) + 1 :] if path.startswith(root + "/") else None
    parts = rel.split("/") if rel else []
    if rel is None or not parts or any(part in ("", ".", "..") for part in parts) or "\x00" in rel:
        raise ModelError(
            f"model {uri!r}: object {path!r} has a key that is not a plain path inside the model folder "
            "(it is absolute, or holds '..', '.' or an empty part) and would be written outside the cache; "
            "refusing to fetch the model. Remove or rename that object in the model's bucket"
        )
    return rel


def _inside(folder: Path, rel: str, *, key: str, uri: str) -> Path:
    """folder/rel, refused if it resolves (following any symbolic link) outside `folder`."""
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise ModelError(
            f"model {uri!r}: object {key!r} would be written to {target}, outside the cache folder "
            f"{folder.resolve()}; refusing to fetch the model"
        )
    return target


def _scrubbed(error: BaseException, storage_options: dict[str, Any]) -> str:
    return scrub(str(error), secret_values(storage_options))


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
        listed: dict[str, Any] = {
            os.path.relpath(p, root.rstrip("/")): [
                i.get("size"),
                str(i.get("ETag") or i.get("etag") or ""),
            ]
            for p, i in listing
        }
        identity: dict[str, Any] = {"uri": uri, "files": listed}
        if ADAPTER_CONFIG in listed:
            identity["base"] = _base_identity(uri, fs.cat_file(posixpath.join(root, ADAPTER_CONFIG)).decode())
        return identity
    path = _local_path(uri)
    if path.is_dir():
        files = {
            str(p.relative_to(path)): _sha256_file(p)
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and p.suffix in _IDENTITY_SUFFIXES
            and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)
        }
        identity = {"uri": str(path.resolve()), "files": files}
        if (path / ADAPTER_CONFIG).is_file():
            identity["base"] = _base_identity(uri, (path / ADAPTER_CONFIG).read_text())
        return identity
    return {"hub_id": uri, "revision": revision or "main"}


def _base_identity(uri: str, config_text: str) -> dict[str, Any]:
    """A LoRA adapter's outputs depend on its base model's weights as much as on its own."""
    base = adapter_base(config_text, uri=uri)
    if base.rstrip("/") == uri.rstrip("/"):
        raise ModelError(f"model {uri!r}: {ADAPTER_CONFIG} names the adapter folder itself as its base")
    return model_identity(base)


# How many missing weight names an error lists (a base encoder under a token-classification head misses 2; a
# model of another architecture misses hundreds, and a few names say which kind of mismatch it is).
_MISSING_SHOWN = 5


def load_pretrained(cls: Any, model_dir: str, *, device: str, dtype: Any, **kwargs: Any) -> Any:
    """`cls.from_pretrained(model_dir)` for inference (safetensors, `dtype`, on `device`, eval mode),
    refused with a ModelError when the checkpoint lacks weights the model needs.

    transformers fills such weights with random values and only logs a warning: a base encoder (MiniLM)
    loaded for text-classification "succeeds" with a random head and predicts LABEL_0/LABEL_1 at random.
    Tied weights (an lm_head tied to the embeddings) and non-persistent buffers are not in
    `missing_keys`, so models that legitimately omit them load. Fine-tuning keeps calling `from_pretrained`
    directly: a fresh head is what it wants.

    A LoRA adapter folder (adapter_config.json, written by a fine-tune with `train.lora.merge: false`) loads
    its base model (adapter_config.json's `base_model_name_or_path`) with the folder's config.json and
    merges the adapter in (`models.lora.load_adapter_model`); a weight neither provides is refused the same way.
    """
    import torch

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if Path(model_dir, ADAPTER_CONFIG).is_file():  # a LoRA adapter folder (train.lora.merge: false)
        model, missing = load_adapter_model(cls, model_dir, dtype=torch_dtype, **kwargs)
    else:
        model, info = cls.from_pretrained(
            model_dir, dtype=torch_dtype, use_safetensors=True, output_loading_info=True, **kwargs
        )
        missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN])
        more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        raise ModelError(
            f"model {model_dir!r} lacks weights that {type(model).__name__} needs ({shown}{more}); they would "
            "be newly initialised at random and every prediction would be noise. It looks like a base model "
            "without this task's head: fine-tune it first (`kind: finetune` with this folder as the stage's "
            "model), or point the stage's `model` at a fine-tuned folder"
        )
    return model.to(torch.device(device)).eval()
