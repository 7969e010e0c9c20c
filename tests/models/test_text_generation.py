"""text-generation: parity with `transformers.pipeline("text-generation")` (greedy) on tiny random GPT-2 and
Llama models and on the real SmolLM2-135M, chats, finish reasons, per-row reproducible sampling, error
records, one Ray job, and causal-LM fine-tuning (in-process loss, one end-to-end `run_finetune`).

Parity note: our micro-batches are left-padded and length-sorted while the reference runs the pipeline one
prompt at a time (batch_size=1). Batched and unbatched float math can differ in the last bits; on these
models (and on SmolLM2 for the prompts below) that never flips a greedy choice, so texts are compared
exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.registry import ROW_ID, RowError, get_task
from pipeline.batching import run_micro_batches
from pipeline.errors import SpecError
from tests.helpers import make_texts
from tests.models.gen_helpers import make_causal_lm

TASK = get_task("text-generation")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_causal_lm(tmp_path_factory.mktemp("gpt2"), arch="gpt2")


@pytest.fixture(scope="session")
def gpt2_train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 to fine-tune: the usual small init (0.02) rather than the peaky one the parity tests use."""
    return make_causal_lm(tmp_path_factory.mktemp("gpt2-train"), arch="gpt2", hidden=64, init_range=0.02)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama", chat=True)


def _run(
    model_dir: Path,
    params: dict[str, Any],
    *,
    text: list[Any] | None = None,
    messages: list[Any] | None = None,
    ids: list[str] | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any] | RowError]:
    """Preprocess → length-sorted micro-batches (the engine's batching) → postprocess, in this process."""
    p = TASK.parse_params(params, key="params")
    pre = TASK.load_preprocessor(str(model_dir), p)
    runner = TASK.load_runner(str(model_dir), p, device="cpu", dtype="float32")
    post = TASK.load_postprocessor(str(model_dir), p)
    values = text if text is not None else messages
    assert values is not None
    columns: dict[str, list[Any]] = {ROW_ID: ids or [f"r{i}" for i in range(len(values))]}
    columns["text" if text is not None else "messages"] = values
    feats = pre(columns)
    ok = [i for i, f in enumerate(feats) if not isinstance(f, RowError)]
    rows = [feats[i] for i in ok]
    res = run_micro_batches(runner.forward, rows, [runner.length(r) for r in rows], batch_size=batch_size)
    assert res.errors == [None] * len(rows)
    out: list[Any] = list(feats)
    for j, i in enumerate(ok):
        inputs = {"text": text[i]} if text is not None else {"messages": values[i]}
        out[i] = post(res.outputs[j], inputs=inputs, features={})
    return out


def _pipeline(model_dir: Path) -> Any:
    from transformers import pipeline

    return pipeline("text-generation", model=str(model_dir), device="cpu")


def _prompts(n: int, seed: int) -> list[str]:
    return make_texts(n, seed=seed, min_words=1, max_words=40)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_parity_with_pipeline(arch: str, gpt2_dir: Path, llama_dir: Path) -> None:
    """Same texts as the pipeline for every prompt (mixed lengths, an empty prompt, a prompt longer than the
    context, cut from the left as the pipeline's handle_long_generation="hole"), full and new text."""
    model_dir = gpt2_dir if arch == "gpt2" else llama_dir
    long_prompt = " ".join(make_texts(1, seed=9, min_words=200, max_words=200))
    prompts = _prompts(12, seed=3) + ["", long_prompt]
    pipe = _pipeline(model_dir)
    for return_full_text, subset in ((True, prompts), (False, prompts[:3] + prompts[-1:])):
        params = {"max_new_tokens": 10, "do_sample": False, "return_full_text": return_full_text}
        got = _run(model_dir, params, text=subset, batch_size=5)
        expected = [
            pipe(
                p,
                max_new_tokens=10,
                do_sample=False,
                return_full_text=return_full_text,
                handle_long_generation="hole",
            )[0]["generated_text"]
            for p in subset
        ]
        assert [g["generated_text"] for g in got] == expected
        for g in got:  # a random Llama sometimes emits its EOS
            assert (g["finish_reason"], g["num_generated_tokens"]) == ("length", 10) or (
                g["finish_reason"] == "eos" and g["num_generated_tokens"] <= 10
            )
    assert got[-1]["generated_text"] and not got[-1]["generated_text"].startswith(long_prompt[:20])


def test_chat_parity_with_pipeline(llama_dir: Path) -> None:
    """Chats through the chat template: the reply (and a prefilled assistant message, continued) is the
    content of the pipeline's last message."""
    chats = [[{"role": "user", "content": t}] for t in _prompts(6, seed=4)] + [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "the movie was"},
            {"role": "assistant", "content": "great fun but"},
        ]
    ]
    pipe = _pipeline(llama_dir)
    got = _run(llama_dir, {"max_new_tokens": 8, "do_sample": False}, messages=chats, batch_size=4)
    for g, chat in zip(got, chats, strict=True):
        ref = pipe(chat, max_new_tokens=8, do_sample=False)[0]["generated_text"]
        assert g["generated_text"] == ref[-1]["content"]
    assert got[-1]["generated_text"].startswith("great fun but")
    new_only = _run(
        llama_dir, {"max_new_tokens": 8, "do_sample": False, "return_full_text": False}, messages=chats[-1:]
    )
    assert (
        new_only[0]["generated_text"]
        == pipe(chats[-1], max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    )


def test_prompt_template_and_chat_wrap_a_text_input(llama_dir: Path) -> None:
    """A text input (e.g. an earlier stage's output) becomes an instruction: `prompt_template` gives the
    pipeline's reply to the templated prompt; `chat` (+ `system_prompt`) the pipeline's reply to that chat."""
    texts = make_texts(5, seed=8, max_words=12)  # prompts within the tiny model's 128 positions
    template = "summarize in one line: {text}"
    pipe = _pipeline(llama_dir)
    params = {"max_new_tokens": 8, "do_sample": False, "prompt_template": template}
    got = _run(llama_dir, params, text=texts, batch_size=3)
    for g, t in zip(got, texts, strict=True):
        prompt = template.replace("{text}", t)
        assert g["generated_text"] == pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    params = {**params, "chat": True, "system_prompt": "be brief"}
    got = _run(llama_dir, params, text=texts, batch_size=3)
    for g, t in zip(got, texts, strict=True):
        chat = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": template.replace("{text}", t)},
        ]
        assert (
            g["generated_text"]
            == pipe(chat, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]["content"]
        )
    with pytest.raises(SpecError, match=r"params.prompt_template: must contain \{text\}"):
        TASK.parse_params({"prompt_template": "no slot"}, key="params")
    with pytest.raises(SpecError, match="set chat: true"):
        TASK.parse_params({"system_prompt": "x"}, key="params")


def test_finish_reasons_eos_and_stop(tmp_path: Path, gpt2_dir: Path) -> None:
    """An EOS the model emits ends a row with finish_reason "eos"; a stop string with "stop" (the string
    kept, as the pipeline's stop_sequence); the rest run to max_new_tokens. Texts match the pipeline."""
    import re
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    prompts = _prompts(12, seed=5)
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():
        first = model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=10, do_sample=False)
    eos_extra = int(first[0, -8])  # the third new token of row 0 becomes an EOS
    model_dir = tmp_path / "eos-model"
    shutil.copytree(gpt2_dir, model_dir)
    GenerationConfig(
        eos_token_id=[tok.eos_token_id, eos_extra], bos_token_id=tok.bos_token_id
    ).save_pretrained(model_dir)
    greedy = _run(
        model_dir, {"max_new_tokens": 10, "do_sample": False, "return_full_text": False}, text=prompts
    )
    assert greedy[0]["finish_reason"] == "eos" and greedy[0]["num_generated_tokens"] <= 3
    # A stop string: two letters from the middle of a row that ran to its full length.
    row, stop = next(
        (i, m.group())
        for i, g in enumerate(greedy)
        if g["finish_reason"] == "length"
        for m in [re.search(r"[a-z]{2}", g["generated_text"][2:])]
        if m
    )
    params = {"max_new_tokens": 10, "do_sample": False, "return_full_text": False, "stop_strings": [stop]}
    got = _run(model_dir, params, text=prompts)
    pipe = _pipeline(model_dir)
    expected = [
        pipe(p, max_new_tokens=10, do_sample=False, return_full_text=False, stop_sequence=[stop])[0][
            "generated_text"
        ]
        for p in prompts
    ]
    assert [g["generated_text"] for g in got] == expected
    assert got[row]["finish_reason"] == "stop" and got[row]["num_generated_tokens"] < 10
    for g in got:
        n = g["num_generated_tokens"]
        if g["finish_reason"] == "stop":
            assert stop in g["generated_text"] and n <= 10
        else:
            assert (g["finish_reason"], n) == ("length", 10) or (g["finish_reason"] == "eos" and n <= 10)
    assert {"eos", "stop", "length"} <= {g["finish_reason"] for g in got}


def test_sampling_is_reproducible_per_row(llama_dir: Path) -> None:
    """The same row (same id) gives the same samples whatever its micro-batch; another seed gives other
    texts; num_return_sequences gives distinct samples per row; top_k=1 sampling is greedy."""
    prompts = _prompts(16, seed=6)
    ids = [f"row-{i}" for i in range(len(prompts))]
    params = {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 1.3,
        "num_return_sequences": 3,
        "seed": 1,
    }
    a = _run(llama_dir, params, text=prompts, ids=ids, batch_size=5)
    # Another composition: reversed order, other batch size, and only half the rows.
    half = list(range(0, 16, 2))[::-1]
    b = _run(llama_dir, params, text=[prompts[i] for i in half], ids=[ids[i] for i in half], batch_size=3)
    assert [b_row["generated_text"] for b_row in b] == [a[i]["generated_text"] for i in half]
    assert all(isinstance(r["generated_text"], list) and len(r["generated_text"]) == 3 for r in a)
    assert sum(len(set(r["generated_text"])) > 1 for r in a) >= 12  # three different samples, mostly
    c = _run(llama_dir, {**params, "seed": 2}, text=prompts, ids=ids)
    assert sum(x["generated_text"] != y["generated_text"] for x, y in zip(a, c, strict=True)) >= 14
    greedy = _run(llama_dir, {"max_new_tokens": 8, "do_sample": False}, text=prompts)
    top1 = _run(llama_dir, {"max_new_tokens": 8, "do_sample": True, "top_k": 1}, text=prompts, ids=ids)
    assert [g["generated_text"] for g in top1] == [g["generated_text"] for g in greedy]


def test_bad_rows_are_error_records_and_params_are_checked(gpt2_dir: Path, llama_dir: Path) -> None:
    p = TASK.parse_params({"max_new_tokens": 4, "handle_long_generation": "error"}, key="params")
    pre = TASK.load_preprocessor(str(gpt2_dir), p)
    long_prompt = " ".join(["movie"] * 300)
    feats = pre({"text": ["fine", None, 7, long_prompt], ROW_ID: ["a", "b", "c", "d"]})
    assert not isinstance(feats[0], RowError)
    assert [f.error_type for f in feats[1:]] == ["InvalidInput", "InvalidInput", "InputTooLong"]
    chat = TASK.load_preprocessor(str(llama_dir), p)
    feats = chat(
        {
            "messages": [None, [], [{"role": "user"}], [{"role": "user", "content": "hi"}]],
            ROW_ID: list("abcd"),
        }
    )
    assert [getattr(f, "error_type", None) for f in feats] == ["InvalidInput"] * 3 + [None]
    both = chat({"messages": [[{"role": "user", "content": "hi"}]], "text": ["x"], ROW_ID: ["a"]})
    assert both[0].error_type == "InvalidSpec"
    for bad, key in (
        ({"max_new_tokens": 0}, "params.max_new_tokens"),
        ({"top_p": 1.5}, "params.top_p"),
        ({"num_return_sequences": 2, "do_sample": False}, "params.num_return_sequences"),
        ({"handle_long_generation": "cut"}, "params.handle_long_generation"),
        ({"stop_strings": [""]}, "params.stop_strings"),
    ):
        with pytest.raises(SpecError) as e:
            TASK.parse_params(bad, key="params")
        assert e.value.key == key


@pytest.mark.timeout(240)
def test_job_sampling_same_rows_same_texts_across_shardings(
    ray_session, llama_dir: Path, tmp_path: Path
) -> None:
    """Two Ray jobs over the same rows with different shard sizes (so different micro-batches): every row's
    sampled texts are identical; a null prompt is an error record, the rest are predictions."""
    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    prompts: list[Any] = _prompts(40, seed=7)
    prompts[5] = None
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(40)), "prompt": pa.array(prompts, pa.string())}), path)
    params = {
        "max_new_tokens": 6,
        "do_sample": True,
        "num_return_sequences": 2,
        "seed": 3,
        "return_full_text": False,
    }

    def job(out: str, shard_rows: int, batch_size: int) -> list[dict[str, Any]]:
        spec = parse_spec(
            {
                "name": "gen",
                "input": {"uri": str(path), "id_column": "id", "shard_rows": shard_rows},
                "stages": [
                    {
                        "name": "s",
                        "task": "text-generation",
                        "model": str(llama_dir),
                        "inputs": {"text": "prompt"},
                        "params": params,
                        "batch_size": batch_size,
                    }
                ],
                "output": {"uri": str(tmp_path / out)},
                "max_error_rate": 0.1,
            }
        )
        result = run_inference(spec, progress=False)
        assert (result.rows_ok, result.rows_error) == (39, 1)
        errors = read_errors(str(tmp_path / out)).to_pylist()
        assert [(e["id"], e["step"], e["error_type"]) for e in errors] == [(5, "preprocess", "InvalidInput")]
        return read_output(str(tmp_path / out)).sort_by("id").to_pylist()

    a = job("a", shard_rows=40, batch_size=8)
    b = job("b", shard_rows=7, batch_size=3)
    assert [r["generated_text"] for r in a] == [r["generated_text"] for r in b]
    assert all(len(r["generated_text"]) == 2 and len(r["finish_reason"]) == 2 for r in a)
    assert all(n == [6, 6] or max(n) <= 6 for n in (r["num_generated_tokens"] for r in a))


@pytest.mark.real_assets
@pytest.mark.timeout(300)
def test_smollm2_greedy_parity_with_pipeline() -> None:
    """The real SmolLM2-135M-Instruct: greedy texts equal the pipeline's for plain prompts and a chat."""
    from infra.assets import fetch_smollm2

    model_dir = fetch_smollm2()
    prompts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):",
    ]
    chats = [
        [{"role": "user", "content": "What is the capital of Germany? Answer in one word."}],
    ]
    pipe = _pipeline(model_dir)
    got = _run(model_dir, {"max_new_tokens": 8, "do_sample": False}, text=prompts, batch_size=3)
    expected = [pipe(p, max_new_tokens=8, do_sample=False)[0]["generated_text"] for p in prompts]
    assert [g["generated_text"] for g in got] == expected
    got_chat = _run(model_dir, {"max_new_tokens": 8, "do_sample": False}, messages=chats)
    for g, chat in zip(got_chat, chats, strict=True):
        assert (
            g["generated_text"]
            == pipe(chat, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]["content"]
        )
    assert "Paris" in got[0]["generated_text"]


# --- fine-tuning ------------------------------------------------------------------------------------------


def _steps(trainable: Any, model: Any, batches: list[dict[str, list[Any]]], steps: int) -> list[float]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(steps):
        batch = trainable.encode(batches[step % len(batches)], None)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("packing", [False, True])
def test_causal_lm_loss_falls(gpt2_dir: Path, packing: bool) -> None:
    import torch

    torch.manual_seed(0)
    trainable = TASK.training(str(gpt2_dir), label_names=(), max_length=32, options={"packing": packing})
    model = trainable.build_model(str(gpt2_dir))
    texts = make_texts(16, seed=11, min_words=4, max_words=20)
    batch = trainable.encode({"text": texts}, None)
    if packing:
        assert batch["input_ids"].shape[1] == 32 and int((batch["labels"] == -100).sum()) < 32
    else:
        assert batch["input_ids"].shape[0] == 16
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    losses = _steps(trainable, model, [{"text": texts[:8]}, {"text": texts[8:]}], 30)
    assert losses[-1] < 0.6 * losses[0], losses


def test_chat_completion_only_loss(llama_dir: Path) -> None:
    """Chats: with completion_only the loss covers the final assistant message only, and it falls."""
    import torch

    torch.manual_seed(0)
    trainable = TASK.training(str(llama_dir), label_names=(), max_length=64, options={})
    chats = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": "great movie"}]
        for t in make_texts(8, seed=12, min_words=3, max_words=10)
    ]
    batch = trainable.encode({"messages": chats}, None)
    tok = trainable.tokenizer
    for r in range(len(chats)):
        target = batch["labels"][r][batch["labels"][r] != -100].tolist()
        assert tok.decode(target) == "great movie<|im_end|>\n"
    everything = TASK.training(
        str(llama_dir), label_names=(), max_length=64, options={"completion_only": False}
    )
    assert int((everything.encode({"messages": chats}, None)["labels"] != -100).sum()) > int(
        (batch["labels"] != -100).sum()
    )
    model = trainable.build_model(str(llama_dir))
    losses = _steps(trainable, model, [{"messages": chats}], 25)
    assert losses[-1] < 0.3 * losses[0], losses
    with pytest.raises(ValueError, match="completion_only"):
        trainable.encode({"messages": [[{"role": "user", "content": "hi"}]]}, None)


@pytest.mark.timeout(600)
def test_finetune_job_then_inference(ray_session, gpt2_train_dir: Path, tmp_path: Path) -> None:
    """kind: finetune on plain text (packing), then the output folder runs in an inference job, and it has
    learned from the one sentence it was trained on (the greedy next word of its start is one of its words)."""
    from jobs.finetune import run_finetune
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    sentence = "the movie was great fun and the music was brilliant"
    texts = [sentence] * 64
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": list(range(64)), "text": texts}), path)
    out = tmp_path / "model"
    spec = parse_spec(
        {
            "name": "lm-ft",
            "kind": "finetune",
            "input": {"uri": str(path), "id_column": "id"},
            "stages": [
                {
                    "name": "s",
                    "task": "text-generation",
                    "model": str(gpt2_train_dir),
                    "inputs": {"text": "text"},
                }
            ],
            "output": {"uri": str(out)},
            "train": {
                "epochs": 4,
                "lr": 1e-2,
                "batch_size": 8,
                "max_length": 32,
                "options": {"packing": True},
            },
        }
    )
    result = run_finetune(spec, progress=False)
    losses = [m["train_loss"] for m in result.metrics]
    assert losses[-1] < 0.5 * losses[0], losses
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["task"] == "text-generation"
    # perplexity of the eval rows' next tokens: above 1, and it falls as the loss does
    ppl = [r["eval_perplexity"] for r in saved["epochs"]]
    assert all(p > 1.0 for p in ppl) and ppl[-1] < ppl[0], saved["epochs"]
    assert all(r["score"] == -r["eval_perplexity"] for r in saved["epochs"])

    prompt = "the movie was great"
    pq.write_table(pa.table({"id": [0], "text": [prompt]}), tmp_path / "in.parquet")
    infer = parse_spec(
        {
            "name": "lm-infer",
            "input": {"uri": str(tmp_path / "in.parquet"), "id_column": "id"},
            "stages": [
                {
                    "name": "s",
                    "task": "text-generation",
                    "model": str(out),
                    "inputs": {"text": "text"},
                    "params": {"max_new_tokens": 6, "do_sample": False},
                }
            ],
            "output": {"uri": str(tmp_path / "pred")},
        }
    )
    run_inference(infer, progress=False)
    row = read_output(str(tmp_path / "pred")).to_pylist()[0]
    assert row["generated_text"].startswith(prompt)
    new_words = row["generated_text"][len(prompt) :].split()
    assert new_words and new_words[0] in sentence.split(), row  # the next word is one of the sentence's
