"""Where models come from: remote folders are fetched confined to the cache and atomically; `check_model`
refuses what cannot load before Ray starts; task names get a "did you mean"."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from models.loading import _inside, check_model, resolve_model
from models.registry import get_task
from pipeline.errors import ModelError

FILES = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"weights", "vocab.txt": b"[PAD]\n"}
ESCAPE = "../../../escaped.txt"  # from <cache>/models/<key>/ up to the test's tmp_path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SHARDWISE_CACHE", str(root))
    return root


@pytest.fixture
def memory_model():
    """A model folder on fsspec's memory:// filesystem (it keeps any key as given); removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/model-{uuid.uuid4().hex[:8]}"
    for name, data in FILES.items():
        fs.pipe(f"{root}/{name}", data)
    yield fs, root
    fs.rm(root, recursive=True)


def _everything(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_remote_folder_is_fetched_into_the_cache_once(cache, memory_model):
    fs, root = memory_model
    local = Path(resolve_model(f"memory://{root}"))
    assert local.is_relative_to(cache.resolve())
    assert {p.name: p.read_bytes() for p in local.iterdir() if p.name in FILES} == FILES
    assert resolve_model(f"memory://{root}") == str(local)
    # no staging folder is left beside it
    assert [p.name for p in local.parent.iterdir() if p.is_dir()] == [local.name]


@pytest.mark.parametrize("bad_key", [ESCAPE, "sub/../../../../escaped.txt", "/abs/escaped.txt", "./x"])
def test_memory_key_outside_the_model_folder_is_refused(cache, tmp_path, memory_model, bad_key):
    fs, root = memory_model
    fs.pipe(f"{root}/{bad_key}", b"owned")
    with pytest.raises(ModelError) as err:
        resolve_model(f"memory://{root}")
    assert bad_key.lstrip("/") in str(err.value) and "refusing" in str(err.value)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    assert not (cache / "models").exists() or not any((cache / "models").rglob("config.json"))


@pytest.mark.timeout(60)
def test_s3_key_with_dotdot_is_refused_and_a_normal_model_fetches(
    cache, tmp_path, s3_storage_options, s3_bucket
):
    s3 = fsspec.filesystem("s3", **s3_storage_options)
    for name, data in FILES.items():
        s3.pipe(f"{s3_bucket}/good/{name}", data)
        s3.pipe(f"{s3_bucket}/bad/{name}", data)
    s3.pipe(f"{s3_bucket}/bad/{ESCAPE}", b"owned")  # S3 keys are opaque: '..' is stored as written
    assert f"{s3_bucket}/bad/{ESCAPE}" in s3.find(f"{s3_bucket}/bad")

    with pytest.raises(ModelError, match=r"bad/\.\./\.\./\.\./escaped\.txt"):
        resolve_model(f"s3://{s3_bucket}/bad", storage_options=s3_storage_options)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))

    local = Path(resolve_model(f"s3://{s3_bucket}/good", storage_options=s3_storage_options))
    assert (local / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_interrupted_download_is_never_used(cache, memory_model, monkeypatch):
    fs, root = memory_model
    real_get_file = type(fs).get_file
    calls = []

    def dies_on_second_file(self, rpath, lpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped mid-download
        return real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(type(fs), "get_file", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(f"memory://{root}")
    models = cache / "models"
    assert [p for p in models.iterdir() if p.is_dir()] == []  # neither a half folder nor its staging

    monkeypatch.setattr(type(fs), "get_file", real_get_file)
    local = Path(resolve_model(f"memory://{root}"))
    assert {p.name for p in local.iterdir()} >= set(FILES)


def test_cached_model_replaced_by_a_symlink_is_fetched_again(cache, tmp_path, memory_model):
    fs, root = memory_model
    local = Path(resolve_model(f"memory://{root}"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".complete").touch()
    (outside / "config.json").write_text("{}")
    for p in local.iterdir():
        p.unlink()
    local.rmdir()
    local.symlink_to(outside, target_is_directory=True)

    again = Path(resolve_model(f"memory://{root}"))
    assert again == local and not again.is_symlink()
    assert (again / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert _everything(outside) == {".complete", "config.json"}  # untouched


def test_target_through_a_symlink_out_is_refused(tmp_path):
    folder, outside = tmp_path / "staging", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelError, match=r"'sub/x.bin'.*outside the cache folder"):
        _inside(folder, "sub/x.bin", key="sub/x.bin", uri="s3://b/m")
    assert _inside(folder, "a/b.json", key="a/b.json", uri="s3://b/m") == folder.resolve() / "a" / "b.json"


# --- check_model ---------------------------------------------------------------------------------------


def _folder(path: Path, names: list[str]) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_bytes(b"{}")
    return path


def test_check_model_accepts_a_local_folder_with_config_and_safetensors(tmp_path):
    check_model(str(_folder(tmp_path / "m", ["config.json", "model.safetensors", "tokenizer.json"])))


def test_check_model_refuses_pickle_only_weights(tmp_path):
    path = _folder(tmp_path / "m", ["config.json", "pytorch_model.bin"])
    with pytest.raises(ModelError, match=r"no \*\.safetensors.*pytorch_model\.bin.*safetensors only"):
        check_model(str(path))


def test_check_model_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        check_model(str(_folder(tmp_path / "m", ["model.safetensors"])))


def test_misspelt_local_path_names_the_path_and_its_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        check_model("./modles/minilm")
    message = str(err.value)
    assert "'./modles/minilm'" in message and str(tmp_path / "modles" / "minilm") in message
    assert "not a known hub id" in message


def test_hub_id_not_in_the_local_cache_is_refused_without_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        check_model("sentence-transformers/all-MiniLM-L6-v2x")
    message = str(err.value)
    assert "sentence-transformers/all-MiniLM-L6-v2x" in message and "local Hugging Face cache" in message
    assert "typo" in message.lower() and "local folder" in message


def test_hub_id_in_the_local_cache_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hf"
    snapshot = hub / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    check_model("acme/tiny")


def test_check_model_lists_remote_folders(cache, memory_model):
    fs, root = memory_model
    check_model(f"memory://{root}")
    fs.rm(f"{root}/config.json")
    with pytest.raises(ModelError, match="has no config.json"):
        check_model(f"memory://{root}")
    with pytest.raises(ModelError, match="empty or does not exist"):
        check_model("memory://no-such-model-folder")


def test_unknown_task_suggests_the_close_name_and_lists_all():
    with pytest.raises(KeyError) as err:
        get_task("text-clasification")
    message = str(err.value)
    assert "did you mean 'text-classification'?" in message
    assert "available:" in message and "token-classification" in message
    with pytest.raises(KeyError) as err:
        get_task("zzz")
    assert "did you mean" not in str(err.value) and "available:" in str(err.value)
