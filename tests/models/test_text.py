"""models/text.py: over-long text is cut by characters before tokenizing, and the tokens a truncating model
sees are the same as for the whole text (checked on the WordPiece and byte-level BPE tokenizers the tests
train, on text with words over 100 characters), while a 50 MB row costs milliseconds."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from models.text import CHARS_PER_TOKEN, clip_text
from tests.helpers import WORDS, make_texts, train_wordpiece
from tests.models.gen_helpers import make_causal_lm, train_bpe


def test_clip_text_keeps_short_text_and_cuts_long_text_at_either_end():
    assert clip_text("short text", 4) == "short text"
    text = "".join(str(i % 10) for i in range(10 * CHARS_PER_TOKEN))
    assert clip_text(text, 3) == text[: 3 * CHARS_PER_TOKEN]
    assert clip_text(text, 3, keep="end") == text[-3 * CHARS_PER_TOKEN :]
    assert clip_text(text, 10) is text


def _long_text(n_chars: int, seed: int) -> str:
    """Ordinary words, punctuation and now and then a word of 100-300 characters (WordPiece's [UNK] case)."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        r = rng.random()
        word = "x" * rng.randint(100, 300) if r < 0.02 else rng.choice(WORDS) + ("," if r > 0.95 else "")
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    bpe_dir = tmp_path_factory.mktemp("bpe")
    return {
        "wordpiece": train_wordpiece(tmp_path_factory.mktemp("wordpiece")),
        "byte-level-bpe": train_bpe(
            bpe_dir, special=["<|endoftext|>"], bos=None, eos="<|endoftext|>", pad=None
        ),
    }


@pytest.mark.parametrize("name", ["wordpiece", "byte-level-bpe"])
@pytest.mark.parametrize("max_length", [16, 128, 512])
def test_clipped_text_gives_the_tokens_of_the_whole_text(tokenizers, name, max_length):
    tok = tokenizers[name]
    for seed in range(3):
        text = _long_text(3 * max_length * CHARS_PER_TOKEN, seed)
        whole = tok(text, truncation=True, max_length=max_length)["input_ids"]
        assert tok(clip_text(text, max_length), truncation=True, max_length=max_length)["input_ids"] == whole
        # text-generation keeps a prompt's end: the last tokens are those of the whole text.
        tail = tok(text)["input_ids"][-max_length:]
        assert tok(clip_text(text, max_length, keep="end"))["input_ids"][-max_length:] == tail


@pytest.fixture(scope="module")
def huge_text() -> str:
    base = " ".join(make_texts(400, seed=31))
    return (base * (50_000_000 // len(base) + 1))[:50_000_000]


def test_text_generation_50mb_prompt_keeps_its_end_in_milliseconds(tmp_path: Path, huge_text: str):
    from models.registry import ROW_ID, get_task

    model = make_causal_lm(tmp_path / "gpt2", arch="gpt2")
    task = get_task("text-generation")
    pre = task.load_preprocessor(str(model), task.parse_params({"max_new_tokens": 8}, key="params"))
    started = time.perf_counter()
    (features,) = pre({"text": [huge_text], ROW_ID: ["0"]})
    seconds = time.perf_counter() - started
    # The model's context is 128 tokens: 120 prompt tokens from the end + 8 new ones.
    (expected,) = pre({"text": [huge_text[-20_000:]], ROW_ID: ["0"]})
    assert (
        features["input_ids"].tolist() == expected["input_ids"].tolist() and len(expected["input_ids"]) == 120
    )
    assert seconds < 5.0, f"{seconds:.1f} s for a 50 MB prompt"


@pytest.mark.parametrize("task_name", ["text-classification", "token-classification"])
def test_50mb_text_preprocesses_in_milliseconds_as_its_prefix(tmp_path: Path, huge_text: str, task_name: str):
    from models.registry import ROW_ID, get_task
    from tests.helpers import make_text_classifier
    from tests.models.nlp_helpers import make_token_classifier

    build = make_text_classifier if task_name == "text-classification" else make_token_classifier
    model = build(tmp_path / "m")
    task = get_task(task_name)
    pre = task.load_preprocessor(str(model), task.parse_params({}, key="params"))
    started = time.perf_counter()
    (features,) = pre({"text": [huge_text], ROW_ID: ["0"]})
    seconds = time.perf_counter() - started
    (expected,) = pre({"text": [huge_text[:20_000]], ROW_ID: ["0"]})
    assert features.keys() == expected.keys()
    for key in features:
        assert features[key].tolist() == expected[key].tolist(), key
    assert seconds < 5.0, f"{seconds:.1f} s for a 50 MB text"
