"""`train.lora`: a tiny BERT classifier fine-tuned with peft LoRA on Ray Train. Only the adapters and the
head train; `merge: true` publishes a full model whose weights differ from the base only where LoRA applied;
`merge: false` publishes a small adapter folder that an inference job loads on top of its base; a LoRA
checkpoint resumes to the same model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from jobs.finetune import FinetuneResult, run_finetune
from pipeline.errors import ModelError
from pipeline.spec import JobSpec, LoraSpec, parse_spec
from tests.helpers import WORDS, job_dict, make_text_classifier, write_texts_parquet

# The label is "pos" when a review has any of these words, else "neg" (about half of each).
POSITIVE = {"great", "good", "fun", "best", "loved", "brilliant", "charming", "beautiful", "funny"}
LABELS = ("neg", "pos")
TARGETS = ("query", "value")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(TARGETS)}


def reviews(n: int, *, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    return texts, ["pos" if POSITIVE & set(t.split()) else "neg" for t in texts]


def lora_spec(
    out: Path, *, base: Path, train_uri: Path, merge: bool, model: Path | None = None, **train: Any
) -> JobSpec:
    return parse_spec(
        {
            "name": "tiny-lora",
            "kind": "finetune",
            "input": {"uri": str(train_uri), "id_column": "id"},
            "stages": [
                {
                    "name": "clf",
                    "task": "text-classification",
                    "model": str(model or base),
                    "inputs": {"text": "text"},
                }
            ],
            "output": {"uri": str(out)},
            # A 2-layer, 32-wide BERT: a large lr, so that the fresh head and the adapters learn in 2 epochs.
            "train": {
                "epochs": 2,
                "lr": 1e-2,
                "batch_size": 16,
                "max_length": 32,
                "num_workers": 1,
                "eval_fraction": 0.2,
                "seed": 0,
                "lora": {**LORA, "merge": merge},
                **train,
            },
        }
    )


def pretrain(folder: Path) -> Path:
    """A tiny BERT whose encoder has learnt the word rule (as a 3-label classifier, in-process): LoRA adapts a
    pretrained model, and adapters on a random encoder learn too slowly for a test."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    make_text_classifier(folder, num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts, labels = reviews(320, seed=2)
    ids = [2 if label == "pos" else 0 for label in labels]  # "positive" / "negative" of the base's names
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(3):
        for i in range(0, len(texts), 16):
            batch = tokenizer(texts[i : i + 16], return_tensors="pt", padding=True)
            model(**batch, labels=torch.tensor(ids[i : i + 16])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For the tests of what trains and what a checkpoint holds: no training needed."""
    return make_text_classifier(tmp_path_factory.mktemp("random"), num_labels=3)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 labels: the job's 2 labels resize the head, which LoRA must then train in full.
    return pretrain(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    texts, labels = reviews(300, seed=0)
    test_texts, test_labels = reviews(60, seed=1)
    return {
        "train": write_texts_parquet(root / "train.parquet", texts, extra={"label": labels}),
        "test": write_texts_parquet(root / "test.parquet", test_texts, extra={"label": test_labels}),
    }


@pytest.fixture(scope="module")
def merged(
    ray_session, tmp_path_factory: pytest.TempPathFactory, base_model: Path, data: dict[str, Path]
) -> FinetuneResult:
    out = tmp_path_factory.mktemp("merged") / "model"
    return run_finetune(lora_spec(out, base=base_model, train_uri=data["train"], merge=True), progress=False)


@pytest.fixture(scope="module")
def adapter(
    ray_session, tmp_path_factory: pytest.TempPathFactory, base_model: Path, data: dict[str, Path]
) -> FinetuneResult:
    out = tmp_path_factory.mktemp("adapter") / "model"
    return run_finetune(lora_spec(out, base=base_model, train_uri=data["train"], merge=False), progress=False)


def _tensors(folder: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def _predict(model: Any, folder: Path, texts: list[str]) -> tuple[list[str], list[float]]:
    """(labels, scores) of a sequence classifier, computed here with plain transformers."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        logits = model.eval()(
            **tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
        ).logits
    probs = logits.softmax(-1)
    return [model.config.id2label[int(i)] for i in probs.argmax(-1)], probs.max(-1).values.tolist()


def _inference(model: str, test: Path, out: Path) -> Any:
    from pipeline.commit import read_output
    from pipeline.execute import run_inference

    result = run_inference(
        parse_spec(job_dict(input_uri=str(test), output_uri=str(out), model=model)), progress=False
    )
    assert result.state == "succeeded" and result.rows_ok == 60
    return read_output(str(out)).to_pandas().set_index("id").sort_index()


# --- what trains -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_only_the_adapters_and_the_head_are_trainable(random_base: Path) -> None:
    import torch

    from models.lora import apply_lora
    from models.text_classification import TextClassificationTrainable

    trainable = TextClassificationTrainable(str(random_base), label_names=LABELS, max_length=32)
    model = trainable.build_model(str(random_base))
    total = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraSpec(**LORA), task_name="text-classification")
    trainable_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # 2 layers x (query, value) x (A: 8x32 + B: 32x8) adapters + the 2-label head (32x2 + 2).
    assert count == 2 * 2 * (8 * 32 + 32 * 8) + 32 * 2 + 2 == 2114
    # 7.5% of the 28,194 weights of this tiny BERT (vocabulary 200, width 32); r=8 on BERT-base: 0.3%.
    assert count < 0.08 * total, (count, total)
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable_names)
    assert any("classifier.modules_to_save" in n for n in trainable_names)


def test_head_modules_are_found_per_architecture() -> None:
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForTokenClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    from models.lora import head_modules

    bert = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    assert head_modules(BertForTokenClassification(bert), "token-classification") == ["classifier"]
    assert head_modules(BertForQuestionAnswering(bert), "question-answering") == ["qa_outputs"]
    distil = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16)
    # Both layers of DistilBERT's head are new on a base encoder: training only `classifier` (peft's
    # default for SEQ_CLS) would leave `pre_classifier` random.
    assert head_modules(DistilBertForSequenceClassification(distil), "text-classification") == [
        "pre_classifier",
        "classifier",
    ]
    gpt2 = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    assert head_modules(GPT2LMHeadModel(gpt2), "text-generation") == []  # the pretrained, tied lm_head


@pytest.mark.timeout(60)
def test_unknown_target_modules_name_the_key_and_the_layers(random_base: Path) -> None:
    from models.lora import apply_lora
    from models.text_classification import TextClassificationTrainable

    trainable = TextClassificationTrainable(str(random_base), label_names=LABELS, max_length=32)
    with pytest.raises(ModelError, match=r"train.lora.target_modules: \['qkv'\] match no layer") as info:
        apply_lora(
            trainable.build_model(str(random_base)),
            LoraSpec(target_modules=("qkv",)),
            task_name="text-classification",
        )
    assert "key, query, value" in str(info.value)  # the Linear layers it could have named


@pytest.mark.timeout(60)
def test_a_lora_checkpoint_resumes_to_the_same_model(random_base: Path, tmp_path: Path) -> None:
    """What `_train_loop` does on resume: a fresh base, the checkpoint's adapter loaded onto it; the
    optimizer state of the checkpoint must fit the rebuilt parameters."""
    import torch

    from models.lora import apply_lora, read_adapter, save_lora
    from models.text_classification import TextClassificationTrainable

    trainable = TextClassificationTrainable(str(random_base), label_names=LABELS, max_length=32)
    torch.manual_seed(0)
    model = apply_lora(
        trainable.build_model(str(random_base)), LoraSpec(**LORA), task_name="text-classification"
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = trainable.encode({"text": ["a great film", "the plot was slow", "fun"]}, [1, 0, 1])
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_lora(model, str(tmp_path), trainable=trainable, base=str(random_base))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # no base weights in a LoRA checkpoint

    torch.manual_seed(1)  # another seed: nothing may depend on the fresh adapter's random init
    resumed = apply_lora(
        trainable.build_model(str(random_base)),
        LoraSpec(**LORA),
        task_name="text-classification",
        state=read_adapter(tmp_path),
    )
    params = [p for p in resumed.parameters() if p.requires_grad]
    assert [(n, p.shape) for n, p in resumed.named_parameters() if p.requires_grad] == [
        (n, p.shape) for n, p in model.named_parameters() if p.requires_grad
    ]
    torch.optim.AdamW(params, lr=1e-2).load_state_dict(optimizer.state_dict())
    with torch.inference_mode():
        assert torch.equal(model.eval()(**batch).logits, resumed.eval()(**batch).logits)


# --- merge: true -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_merged_lora_learns_the_rule(merged: FinetuneResult) -> None:
    assert merged.label_names == LABELS
    first, last = merged.metrics[0], merged.metrics[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["eval_accuracy"] >= 0.8, merged.metrics  # chance is about 0.5


@pytest.mark.timeout(60)
def test_merged_weights_differ_from_the_base_only_where_lora_applied(
    merged: FinetuneResult, base_model: Path
) -> None:
    out = Path(merged.output_uri)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_metrics.json", "_SUCCESS"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "train_state.pt", "_checkpoints"}
    tuned, base = _tensors(out, "model.safetensors"), _tensors(base_model, "model.safetensors")
    assert set(tuned) == set(base)  # a plain BertForSequenceClassification, no peft names
    changed = {k for k in base if base[k].shape != tuned[k].shape or not (base[k] == tuned[k]).all()}
    adapted = {k for k in base if k.endswith(tuple(f"attention.self.{m}.weight" for m in TARGETS))}
    assert len(adapted) == 4  # query and value of both layers
    assert changed == adapted | {"classifier.weight", "classifier.bias"}
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


@pytest.mark.timeout(120)
def test_merged_output_runs_in_an_inference_job(
    merged: FinetuneResult, data: dict[str, Path], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification

    out = Path(merged.output_uri)
    preds = _inference(str(out), data["test"], tmp_path / "preds")
    test = pq.read_table(data["test"]).to_pandas().set_index("id").sort_index()
    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True)
    labels, scores = _predict(model, out, test["text"].tolist())
    assert preds["label"].tolist() == labels
    assert preds["score"].tolist() == pytest.approx(scores, abs=1e-5)
    assert (preds["label"] == test["label"]).mean() >= 0.8


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rerun_restores_the_lora_checkpoint(
    ray_session, base_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoints hold the adapter, not the model; a rerun of the same job (here: the output lost after
    training, as if the driver died before publishing) restores the last one onto a rebuilt base and
    publishes the same merged model without training again."""
    from safetensors.torch import load_file

    spec = lora_spec(
        tmp_path / "model",
        base=base_model,
        train_uri=data["train"],
        merge=True,
        epochs=1,
        checkpoint_uri=str(tmp_path / "ckpt"),
    )
    first = run_finetune(spec, progress=False)
    checkpoints = sorted((tmp_path / "ckpt").rglob("adapter_model.safetensors"))
    assert len(checkpoints) == 1
    assert not list((tmp_path / "ckpt").rglob("model.safetensors"))  # no base weights in checkpoints
    published = load_file(str(tmp_path / "model" / "model.safetensors"))
    shutil.rmtree(tmp_path / "model")

    again = run_finetune(spec, progress=False)
    assert again.metrics == first.metrics  # restored, not retrained
    republished = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(republished) == set(published)
    for name, tensor in published.items():
        assert (republished[name] == tensor).all(), name


# --- merge: false ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_adapter_output_is_small_and_names_its_base(
    adapter: FinetuneResult, merged: FinetuneResult, base_model: Path
) -> None:
    out = Path(adapter.output_uri)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model.resolve())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, list(TARGETS))
    adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
    full_bytes = (Path(merged.output_uri) / "model.safetensors").stat().st_size
    assert adapter_bytes < 0.15 * full_bytes, (adapter_bytes, full_bytes)
    # The manifest lists what was published (an overwrite deletes exactly these).
    listed = json.loads((out / "_manifest.json").read_text())["files"]
    assert "adapter_model.safetensors" in listed and "adapter_config.json" in listed


@pytest.mark.timeout(120)
def test_adapter_output_runs_in_an_inference_job(
    adapter: FinetuneResult, base_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """Predictions equal those of the base with the adapter merged in here, with transformers + peft."""
    import pyarrow.parquet as pq
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = Path(adapter.output_uri)
    preds = _inference(str(out), data["test"], tmp_path / "preds")
    test = pq.read_table(data["test"]).to_pandas().set_index("id").sort_index()
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model, config=AutoConfig.from_pretrained(out), ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, out).merge_and_unload()
    labels, scores = _predict(model, out, test["text"].tolist())
    assert preds["label"].tolist() == labels
    assert preds["score"].tolist() == pytest.approx(scores, abs=1e-5)
    assert set(preds["label"]) <= set(LABELS)
    assert (preds["label"] == test["label"]).mean() >= 0.8


@pytest.mark.timeout(120)
def test_adapter_loaded_by_shardwise_equals_the_merged_output(
    adapter: FinetuneResult, merged: FinetuneResult
) -> None:
    """Both jobs train the same adapters (same seed, data and settings; one worker): merging at publish time
    (merge: true) and merging at load time (merge: false) give the same model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from models.loading import load_pretrained

    def losses(result: FinetuneResult) -> list[tuple[float, float]]:
        return [(m["train_loss"], m["eval_loss"]) for m in result.metrics]

    assert losses(adapter) == losses(merged)
    loaded = load_pretrained(
        AutoModelForSequenceClassification, adapter.output_uri, device="cpu", dtype="float32"
    ).state_dict()
    published = _tensors(Path(merged.output_uri), "model.safetensors")
    assert set(loaded) == set(published)
    for name, tensor in published.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.timeout(120)
def test_adapter_identity_covers_its_base_and_a_missing_base_is_refused(
    adapter: FinetuneResult, base_model: Path, tmp_path: Path
) -> None:
    """The inference fingerprint changes when the base model's weights change, not only the adapter's."""
    from safetensors.torch import load_file, save_file

    from models.loading import check_model, model_identity

    base_copy = tmp_path / "base"
    shutil.copytree(base_model, base_copy)
    folder = tmp_path / "adapter"
    shutil.copytree(adapter.output_uri, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(base_copy)})
    )
    check_model(str(folder))
    before = model_identity(str(folder))
    weights = load_file(str(base_copy / "model.safetensors"))
    weights["bert.embeddings.word_embeddings.weight"][0, 0] += 1.0
    save_file(weights, str(base_copy / "model.safetensors"), metadata={"format": "pt"})
    after = model_identity(str(folder))
    assert after["files"] == before["files"]  # the adapter folder itself did not change
    assert after != before

    shutil.rmtree(base_copy)
    with pytest.raises(ModelError, match="LoRA adapter whose base model .* cannot be loaded"):
        check_model(str(folder))


@pytest.mark.timeout(60)
def test_an_adapter_folder_is_refused_as_a_base_before_ray(
    adapter: FinetuneResult, base_model: Path, data: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    def no_ray(**_: Any) -> None:
        raise AssertionError("Ray was started although the job is invalid")

    monkeypatch.setattr("jobs.finetune.init_ray", no_ray)
    spec = lora_spec(
        tmp_path / "model",
        base=base_model,
        train_uri=data["train"],
        merge=True,
        model=Path(adapter.output_uri),
    )
    with pytest.raises(ModelError, match="is a LoRA adapter folder"):
        run_finetune(spec, progress=False)


def test_lora_file_deletes_reach_only_folders_shardwise_made(tmp_path: Path) -> None:
    """save_lora deletes the model card peft writes and merge_lora the adapter files it merged: both refuse a
    folder that is not theirs (a user's folder with its own README.md, adapter files, anything), so no file
    of the user's can be deleted; the folder is untouched."""
    from models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_lora, save_lora

    user = tmp_path / "my-model"
    user.mkdir()
    for name in ("README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (user / name).write_text(f"the user's {name}")
    before = {p.name: p.read_text() for p in user.iterdir()}
    with pytest.raises(ValueError, match="new, empty folder"):
        save_lora(object(), str(user), trainable=object(), base="/base")
    with pytest.raises(ValueError, match="staging folder only"):
        merge_lora(str(user), trainable=object(), base_dir="/base")
    assert {p.name: p.read_text() for p in user.iterdir()} == before
