"""Audio input (`models.audio`): containers, HF Audio structs, paths/URIs, downmix, resampling, duration
batching; and the bad-audio catalogue: every kind of broken input is one error record in one job."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from models.audio import forward_groups, load_audio, min_input_samples, pack_chunks, stack_chunks
from models.registry import RowError
from tests.models.audio_helpers import (
    RATE,
    audio_job,
    decoded_like_soundfile,
    encode,
    make_ctc_model,
    tone,
    wav2vec2_config,
    write_audio_parquet,
)


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ctc_model(tmp_path_factory.mktemp("ctc"))


@pytest.mark.parametrize(
    ("fmt", "subtype", "tolerance"),
    [
        ("WAV", "PCM_16", 1e-4),
        ("WAV", "FLOAT", 0.0),
        ("FLAC", None, 1e-4),
        ("OGG", None, None),
        ("MP3", None, None),
    ],
)
def test_containers_decode_to_the_samples(fmt: str, subtype: str | None, tolerance: float | None) -> None:
    x = tone(1.5, seed=1)
    got = load_audio(encode(x, fmt=fmt, subtype=subtype), rate=RATE)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.ndim == 1
    if tolerance is not None:  # lossless: the very samples (16-bit quantisation aside)
        assert got.shape == x.shape
        assert np.abs(got - x).max() <= tolerance
    else:  # lossy codecs: same duration (give or take codec padding), same signal
        assert abs(len(got) - len(x)) < 0.1 * RATE
        n = min(len(got), len(x))
        lag = int(np.argmax(np.correlate(got[:4000], x[:4000], mode="full"))) - 3999
        a, b = (got[lag:n], x[: n - lag]) if lag >= 0 else (got[: n + lag], x[-lag:n])
        assert np.corrcoef(a, b)[0, 1] > 0.9


def test_stereo_is_averaged_then_resampled_with_soxr() -> None:
    import soxr

    stereo = tone(2.0, rate=44_100, seed=2, channels=2)  # (samples, 2)
    got = load_audio(encode(stereo, rate=44_100, fmt="FLAC"), rate=RATE)
    decoded, _ = decoded_like_soundfile(encode(stereo, rate=44_100, fmt="FLAC"))
    expected = soxr.resample(decoded, 44_100, RATE)
    assert got.shape == expected.shape == (32_000,)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_every_input_form_gives_the_same_samples(tmp_path: Path) -> None:
    x = tone(1.0, seed=3)
    data = encode(x, fmt="FLAC")
    (tmp_path / "clip.flac").write_bytes(data)
    path = str(tmp_path / "clip.flac")
    reference = load_audio(data, rate=RATE)
    forms = [
        bytearray(data),
        {"bytes": data, "path": "ignored-when-bytes-exist.flac"},
        {"bytes": None, "path": path},
        path,
        "file://" + path,
        {"array": reference.tolist(), "sampling_rate": RATE},
        {"raw": reference, "sampling_rate": np.int64(RATE)},
        {"array": np.stack([reference, reference]), "sampling_rate": RATE},  # (channels, samples)
    ]
    for form in forms:
        got = load_audio(form, rate=RATE)
        assert isinstance(got, np.ndarray), (type(form).__name__, got)
        np.testing.assert_allclose(got, reference, atol=1e-6)


def test_array_struct_at_another_rate_is_resampled() -> None:
    x = tone(1.0, rate=8_000, seed=4)
    got = load_audio({"array": x, "sampling_rate": 8_000}, rate=RATE)
    assert got.shape == (16_000,)


@pytest.mark.parametrize(
    ("value", "error_type", "words"),
    [
        (None, "InvalidInput", "null"),
        (42, "InvalidInput", "a int"),
        ({"bytes": None, "path": None}, "InvalidInput", "no bytes, path or array"),
        (b"", "EmptyAudio", "0 bytes"),
        (b"this is not audio, just some text bytes", "AudioDecodeError", "could not be decoded"),
        (encode(np.zeros(0, np.float32)), "EmptyAudio", "no samples"),
        ("/nonexistent/clip.wav", "AudioNotFound", "no file"),
        ("", "InvalidInput", "empty string"),
        ({"array": [0.1] * 100, "sampling_rate": 0}, "InvalidInput", "sampling_rate"),
        ({"array": np.zeros((3, 800)), "sampling_rate": RATE}, "InvalidInput", "channels"),
        ({"array": np.full(800, np.nan), "sampling_rate": RATE}, "InvalidAudio", "NaN"),
        ({"array": np.zeros((2, 2, 2)), "sampling_rate": RATE}, "InvalidInput", "shape"),
    ],
)
def test_bad_values_are_row_errors(value: object, error_type: str, words: str) -> None:
    got = load_audio(value, rate=RATE)
    assert isinstance(got, RowError)
    assert got.error_type == error_type
    assert words in got.message


def test_duration_limits() -> None:
    long = encode(tone(3.0))
    too_long = load_audio(long, rate=RATE, max_duration_s=2.0)
    assert isinstance(too_long, RowError) and too_long.error_type == "AudioTooLong"
    assert "3.0 s > max_duration_s 2 s" in too_long.message
    assert isinstance(load_audio(long, rate=RATE, max_duration_s=None), np.ndarray)
    config = wav2vec2_config()
    need = min_input_samples(config)
    assert need == 85  # kernels (10, 4, 4), strides (5, 4, 4): 10 + 5·(4 − 1) + 5·4·(4 − 1)
    short = load_audio(encode(tone(need / RATE * 0.5)), rate=RATE, min_samples=need)
    assert isinstance(short, RowError) and short.error_type == "AudioTooShort"
    base = SimpleNamespace(conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
    assert min_input_samples(base) == 400  # wav2vec2-base: 25 ms at 16 kHz
    assert min_input_samples(object()) == 1


def test_duration_grouping_pads_only_where_masks_allow() -> None:
    clips = [np.ones(n, np.float32) for n in (300, 500, 300, 400)]
    batch = [pack_chunks([{"input_values": c[None]}], main="input_values") for c in clips]
    items = [(r, 0) for r in range(len(batch))]
    padded = forward_groups(batch, items, pad=True, max_items=8)
    assert padded == [[1, 3, 0, 2]]  # one forward, longest first
    x, mask, lengths = stack_chunks(batch, items, padded[0])
    assert x.shape == (4, 500) and lengths.tolist() == [500, 400, 300, 300]
    assert mask.sum(1).tolist() == [500, 400, 300, 300] and x[3, 300:].sum() == 0
    exact = forward_groups(batch, items, pad=False, max_items=8)
    assert sorted(map(sorted, exact)) == [[0, 2], [1], [3]]  # only equal lengths share a forward
    assert forward_groups(batch, items, pad=True, max_items=3) == [[1, 3, 0], [2]]


@pytest.mark.timeout(240)
def test_bad_audio_catalogue_one_error_record_each(ray_session, ctc_model: Path, tmp_path: Path) -> None:
    """11 kinds of broken input in an HF Audio struct column → exactly one error record each, with the
    reason; the good rows (bytes in 3 containers, a path) are transcribed as the pipeline does; the job
    completes."""
    from transformers import pipeline

    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference

    (tmp_path / "good.wav").write_bytes(encode(tone(1.2, seed=10)))
    (tmp_path / "a-directory.wav").mkdir()
    nan = tone(1.0, seed=11)
    nan[500] = np.nan
    # Two shards of 8 rows, each with good rows among the bad ones.
    good = {
        0: {"bytes": encode(tone(2.0, seed=12)), "path": "a.wav"},
        4: {"bytes": encode(tone(0.7, seed=13), fmt="FLAC"), "path": None},
        9: {"bytes": encode(tone(3.1, seed=14), fmt="OGG"), "path": "c.ogg"},
        13: {"bytes": None, "path": str(tmp_path / "good.wav")},
    }
    kinds = [
        (None, "InvalidInput"),
        ({"bytes": None, "path": None}, "InvalidInput"),
        ({"bytes": b"", "path": "empty.wav"}, "EmptyAudio"),
        ({"bytes": b"GIF89a not a sound at all", "path": None}, "AudioDecodeError"),
        ({"bytes": encode(tone(1.0))[:30], "path": "truncated-header.wav"}, "AudioDecodeError"),
        ({"bytes": encode(np.zeros(0, np.float32)), "path": None}, "EmptyAudio"),
        ({"bytes": None, "path": str(tmp_path / "missing.flac")}, "AudioNotFound"),
        ({"bytes": None, "path": str(tmp_path / "a-directory.wav")}, "AudioNotFound"),
        ({"bytes": encode(tone(6.0, seed=15)), "path": None}, "AudioTooLong"),
        ({"bytes": encode(tone(50 / RATE, seed=16)), "path": None}, "AudioTooShort"),
        ({"bytes": encode(nan, subtype="FLOAT"), "path": None}, "InvalidAudio"),
    ]
    bad = dict(zip([i for i in range(15) if i not in good], kinds, strict=True))
    values = [good[i] if i in good else bad[i][0] for i in range(15)]
    write_audio_parquet(tmp_path / "in.parquet", values)
    spec = audio_job(
        input_uri=tmp_path / "in.parquet",
        output_uri=tmp_path / "out",
        model=ctc_model,
        task="automatic-speech-recognition",
        params={"max_duration_s": 5.0},
    )
    result = run_inference(spec, progress=False)
    assert result.state == "succeeded"
    assert (result.rows_in, result.rows_ok, result.rows_error) == (15, 4, 11)
    errors = {int(r["id"]): r for r in read_errors(str(tmp_path / "out")).to_pylist()}
    assert {i: e["error_type"] for i, e in errors.items()} == {i: kind for i, (_, kind) in bad.items()}
    assert {e["step"] for e in errors.values()} == {"preprocess"}
    messages = {
        kind: e["message"] for e, (_, kind) in zip((errors[i] for i in bad), bad.values(), strict=True)
    }
    assert "6.0 s > max_duration_s 5 s" in messages["AudioTooLong"]
    assert "needs at least 85" in messages["AudioTooShort"]
    got = {r["id"]: r["text"] for r in read_output(str(tmp_path / "out")).to_pylist()}
    pipe = pipeline("automatic-speech-recognition", model=str(ctc_model), device="cpu")
    for i, value in good.items():
        data = value["bytes"] if value["bytes"] is not None else Path(value["path"]).read_bytes()
        assert got[i] == pipe(decoded_like_soundfile(data)[0])["text"]
