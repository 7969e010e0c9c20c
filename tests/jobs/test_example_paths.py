"""The example specs name the paths `make demo` and `python -m infra.assets fetch` create, so the demo's two
examples run as written after `make demo` (checked without running the jobs or fetching anything)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.demo import demo_paths

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"


def _local_paths(spec: dict) -> dict[str, str]:
    """Every local path an example reads: {dotted key: path as written}."""
    found = {"input.uri": spec["input"]["uri"]}
    for i, stage in enumerate(spec["stages"]):
        found[f"stages.{i}.model"] = stage["model"]
    eval_input = (spec.get("train") or {}).get("eval_input")
    if eval_input:
        found["train.eval_input.uri"] = eval_input["uri"]
    return {k: v for k, v in found.items() if "://" not in v}


@pytest.fixture
def assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Where infra.assets puts things with the default cache (a fresh HOME: nothing real is touched)."""
    from infra.assets import asset_paths

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHARDWISE_ASSETS", raising=False)
    return asset_paths()


@pytest.fixture
def outputs() -> dict[str, str]:
    """Output folders written by the examples themselves (one example's output is another's model)."""
    return {yaml.safe_load(p.read_text())["output"]["uri"]: p.name for p in sorted(EXAMPLES.rglob("*.yaml"))}


@pytest.mark.parametrize("name", ["rt-finetune.yaml", "rt-sentiment.yaml"])
def test_demo_examples_read_only_what_make_demo_creates(name, assets, outputs, tmp_path):
    spec = yaml.safe_load((EXAMPLES / name).read_text())
    workdir = tmp_path / "repo"  # `make demo` runs in the repo root, where the example paths are relative to
    created = {str(p.relative_to(workdir.resolve())) for p in demo_paths(workdir).values()}
    for key, path in _local_paths(spec).items():
        in_cache = Path(path).expanduser() in set(assets.values())
        assert path in created or path in outputs or in_cache, (
            f"{name}: {key} = {path!r} is neither written by `make demo` ({sorted(created)}) nor an asset "
            f"(infra.assets.asset_paths) nor another example's output"
        )
    assert {"out/rt-minilm", "out/rt-sentiment"} <= created  # the outputs the demo shows are the examples'
    if name == "rt-finetune.yaml":
        assert Path(spec["stages"][0]["model"]).expanduser() == assets["minilm"]
        assert spec["output"]["uri"] == "out/rt-minilm"
    else:
        assert spec["stages"][0]["model"] == "out/rt-minilm"


def test_examples_name_assets_where_infra_assets_puts_them(assets):
    """A base model that infra.assets fetches (MiniLM, SmolLM2) is named by its cache path, never by a folder
    nothing creates (rt-finetune.yaml used to say data/minilm), and every path into the cache is one that
    infra.assets fills."""
    cache = assets["cache"]
    models = {assets[name].name: assets[name] for name in ("minilm", "smollm2", "spacy_ner")}
    # Folders under the cache that infra.assets writes: asset_paths(), plus the EfficientNet and photo folders
    # its fetch_* functions create there.
    filled = {p.relative_to(cache).parts[0] for p in assets.values() if p != cache} | {
        "efficientnet_lite0",
        "photos",
    }
    checked = 0
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for key, value in _local_paths(yaml.safe_load(path.read_text())).items():
            local = Path(value).expanduser()
            if key.endswith(".model") and local.name in models:
                assert local == models[local.name], (
                    f"{path.name}: {key} = {value!r}; the asset is at {models[local.name]}"
                )
                checked += 1
            if local.is_relative_to(cache):
                assert local.relative_to(cache).parts[0] in filled, f"{path.name}: {key} = {value!r}"
    assert checked >= 4  # rt-, ner-, qa-finetune (MiniLM), lm-finetune and smollm2-generate (SmolLM2)
