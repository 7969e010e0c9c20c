"""Image input shared by the vision tasks: decoding (EXIF, modes, bytes/struct/path/URI inputs), the
bad-image catalogue through one inference job, and the uint8-on-the-wire pixel path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.images import (
    DEFAULT_MAX_PIXELS,
    compact_pixels,
    image_size,
    load_image,
    load_images,
    pixel_norm,
    pixel_values,
    pixels_to_tensor,
    shape_groups,
)
from models.registry import RowError
from tests.models.vision_helpers import (
    encode,
    make_convnext_classifier,
    make_detr,
    make_vit_classifier,
    noise_image,
)

_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header declares width × height RGB pixels (400 Mpx by default) and holds none."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _pixels(image) -> np.ndarray:
    return np.asarray(image)


# --- decoding ---------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_like_the_pipeline() -> None:
    """A landscape JPEG tagged 'rotate 90° CW' (orientation 6) decodes upright as a portrait image."""
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif, quality=95)
    got = load_image(data)
    assert got.size == (20, 40)
    assert image_size(got).tolist() == [40, 20]  # (height, width)
    top, bottom = np.asarray(got)[5, 10], np.asarray(got)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60
    assert np.array_equal(_pixels(got), _pixels(hf_load_image(Image.open(io.BytesIO(data)))))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "RGB"])
def test_8bit_modes_convert_to_rgb_like_the_pipeline(mode: str) -> None:
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    image = noise_image(3, width=33, height=21).convert(mode)
    data = encode(image, "TIFF" if mode == "CMYK" else "PNG")
    got = load_image(data)
    assert got.mode == "RGB" and got.size == (33, 21)
    assert np.array_equal(_pixels(got), _pixels(hf_load_image(Image.open(io.BytesIO(data)))))


def test_high_bit_depth_images_keep_their_range() -> None:
    """16-bit and float images are scaled to 8 bits, not clipped to white as PIL's convert("RGB") does."""
    from PIL import Image

    ramp16 = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    png16 = encode(Image.fromarray(ramp16), "PNG")
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    assert _pixels(load_image(png16))[0, :, 0].tolist() == [0, 64, 128, 255]

    tiff_i = encode(Image.fromarray(ramp16.astype(np.int32), mode="I"), "TIFF")
    assert _pixels(load_image(tiff_i))[0, :, 1].tolist() == [0, 64, 128, 255]

    eight_bit_in_i = encode(Image.fromarray(np.array([[0, 100, 255]], np.int32), mode="I"), "TIFF")
    assert _pixels(load_image(eight_bit_in_i))[0, :, 0].tolist() == [0, 100, 255]

    ramp_f = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    tiff_f = encode(Image.fromarray(ramp_f, mode="F"), "TIFF")
    assert _pixels(load_image(tiff_f))[0, :, 2].tolist() == [0, 64, 128, 255]


def test_bytes_struct_path_and_uri_inputs_decode_the_same(
    tmp_path: Path, s3_storage_options, s3_bucket
) -> None:
    import fsspec

    data = encode(noise_image(5), "PNG")
    path = tmp_path / "a b.png"
    path.write_bytes(data)
    fsspec.filesystem("s3", **s3_storage_options).pipe(f"{s3_bucket}/img/a.png", data)
    values = [
        data,
        bytearray(data),
        {"bytes": data, "path": "ignored-when-bytes.png"},
        {"bytes": None, "path": str(path)},
        str(path),
        f"file://{path}",
        f"s3://{s3_bucket}/img/a.png",
    ]
    images = load_images(values, max_pixels=DEFAULT_MAX_PIXELS, storage_options=s3_storage_options)
    expected = _pixels(images[0])
    for value, image in zip(values, images, strict=True):
        assert not isinstance(image, RowError), (value if isinstance(value, str) else type(value), image)
        assert np.array_equal(_pixels(image), expected)


def test_max_pixels_is_a_configurable_cap() -> None:
    data = encode(noise_image(1, width=100, height=50))
    assert isinstance(load_image(data, max_pixels=5000), RowError) is False
    err = load_image(data, max_pixels=4999)
    assert isinstance(err, RowError) and err.error_type == "ImageTooLarge"
    assert "100x50 = 5,000 pixels > max_pixels 4,999" in err.message


# --- compact pixels ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from transformers import AutoImageProcessor

    root = tmp_path_factory.mktemp("procs")
    dirs = {
        "vit": make_vit_classifier(root / "vit"),
        "convnext": make_convnext_classifier(root / "convnext"),
        "detr": make_detr(root / "detr"),
    }
    return {name: AutoImageProcessor.from_pretrained(d) for name, d in dirs.items()}


@pytest.mark.parametrize("name", ["vit", "convnext", "detr"])
def test_uint8_transfer_reproduces_the_processor(processors, name: str) -> None:
    """uint8 after resize/crop + rescale/normalize on the device == the processor's float32 output."""
    processor = processors[name]
    assert compact_pixels(processor)
    norm = pixel_norm(processor)
    for seed in range(4):
        image = noise_image(seed)
        small = pixel_values(processor, image, compact=True)
        assert small.dtype == np.uint8 and small.ndim == 3 and small.shape[0] == 3
        full = processor(images=[image], return_tensors="np")["pixel_values"][0]
        on_device = pixels_to_tensor([small], norm, device="cpu", dtype=__import__("torch").float32)[0]
        assert on_device.shape == full.shape
        assert np.abs(on_device.numpy() - full).max() <= 1e-5


def test_processors_that_do_not_round_trip_ship_floats() -> None:
    """A processor whose unnormalised output is not integer pixels falls back to its own float output."""
    import torch

    class Blurry:  # stands for a processor that rescales before resizing
        do_rescale, rescale_factor, do_normalize = True, 1 / 255, False

        def __call__(self, images, return_tensors, **kw):
            return {"pixel_values": [np.asarray(images[0], np.float32).transpose(2, 0, 1) / 255 + 0.001]}

    processor = Blurry()
    assert not compact_pixels(processor)
    arr = pixel_values(processor, noise_image(1), compact=False)
    assert arr.dtype == np.float32
    tensor = pixels_to_tensor([arr], pixel_norm(processor), device="cpu", dtype=torch.float32)
    assert np.array_equal(tensor[0].numpy(), arr)  # floats are passed through, not normalised twice


def test_shape_groups_never_mix_sizes() -> None:
    arrays = [np.zeros((3, 4, 5)), np.zeros((3, 5, 4)), np.zeros((3, 4, 5)), np.zeros((3, 2, 10))]
    assert shape_groups(arrays) == [[0, 2], [1], [3]]


# --- the bad-image catalogue: one job, every broken row → one error record, the job completes ------------


@pytest.mark.timeout(240)
def test_bad_image_catalogue_one_error_record_each(ray_session, tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    model = make_vit_classifier(tmp_path / "vit")
    png = encode(noise_image(1, width=64, height=48), "PNG")
    jpeg = encode(noise_image(2, width=64, height=48), "JPEG")
    idat = png.index(b"IDAT") + 8
    corrupt_png = png[:idat] + bytes(b ^ 0xFF for b in png[idat : idat + 32]) + png[idat + 32 :]
    on_disk = tmp_path / "ok.jpg"
    on_disk.write_bytes(jpeg)
    (tmp_path / "a_directory.png").mkdir()

    good = {
        "ok-png": {"bytes": png, "path": None},
        "ok-jpeg": {"bytes": jpeg, "path": "x.jpg"},
        "ok-path": {"bytes": None, "path": str(on_disk)},
        "ok-cmyk": {"bytes": encode(noise_image(3).convert("CMYK"), "JPEG"), "path": None},
        "ok-rgba": {"bytes": encode(noise_image(4).convert("RGBA"), "PNG"), "path": None},
        "ok-16bit": {
            "bytes": encode(Image.fromarray(np.full((9, 7), 40000, np.uint16)), "PNG"),
            "path": None,
        },
        "ok-gif": {"bytes": encode(noise_image(5).convert("P"), "GIF"), "path": None},
    }
    # id → (row value, expected error_type, words the message must contain)
    bad = {
        "null": (None, "InvalidInput", "is null"),
        "no-bytes-no-path": ({"bytes": None, "path": None}, "InvalidInput", "neither bytes nor a path"),
        "empty": ({"bytes": b"", "path": None}, "EmptyImage", "0 bytes"),
        "text": ({"bytes": b"id,label\n1,cat\n", "path": None}, "NotAnImage", "not an image format"),
        "truncated-jpeg": ({"bytes": jpeg[: len(jpeg) // 2], "path": None}, "TruncatedImage", "cut short"),
        "truncated-png": ({"bytes": png[: len(png) // 2], "path": None}, "TruncatedImage", "cut short"),
        "jpeg-header-only": ({"bytes": jpeg[:20], "path": None}, "ImageDecodeError", "start like a JPEG"),
        "corrupt-png": ({"bytes": corrupt_png, "path": None}, "ImageDecodeError", "broken data stream"),
        "bomb": ({"bytes": _png_bomb(), "path": None}, "ImageTooLarge", "max_pixels"),
        "over-cap": (
            {"bytes": encode(Image.new("1", (3000, 3000)), "PNG"), "path": None},
            "ImageTooLarge",
            "3000x3000 = 9,000,000 pixels > max_pixels 5,000,000",
        ),
        "missing-file": ({"bytes": None, "path": str(tmp_path / "nope.jpg")}, "ImageNotFound", "no file at"),
        "directory": (
            {"bytes": None, "path": str(tmp_path / "a_directory.png")},
            "ImageNotFound",
            "directory",
        ),
        "bad-protocol": ({"bytes": None, "path": "nosuchproto://b/x.png"}, "ImageReadError", "Protocol"),
    }
    # Good and bad rows interleaved, so every shard holds both.
    # (A shard whose rows ALL fail currently crashes postprocess_commit: `table.take([])` in
    # pipeline/execute.py gets a null-typed index array. Reported to the engine's owner.)
    rows = [(k, v) for k, v in good.items()] + [(k, v) for k, (v, _, _) in bad.items()]
    rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (i % len(good), i))]
    ids = [k for k, _ in rows]
    values = [v for _, v in rows]
    pq.write_table(
        pa.table({"id": ids, "image": pa.array(values, _IMAGE_STRUCT)}),
        tmp_path / "in.parquet",
        row_group_size=8,
    )
    spec = parse_spec(
        {
            "name": "bad-images",
            "input": {"uri": str(tmp_path / "in.parquet"), "id_column": "id", "shard_rows": 10},
            "stages": [
                {
                    "name": "clf",
                    "task": "image-classification",
                    "model": str(model),
                    "inputs": {"image": "image"},
                    "params": {"max_pixels": 5_000_000},
                    "batch_size": 4,
                }
            ],
            "output": {"uri": str(tmp_path / "out")},
            "max_error_rate": 1.0,
        }
    )
    result = run_inference(spec, progress=False)
    assert result.state == "succeeded"
    assert (result.rows_in, result.rows_ok, result.rows_error) == (len(ids), len(good), len(bad))
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == sorted(good)
    errors = {r["id"]: r for r in read_errors(str(tmp_path / "out")).to_pylist()}
    assert sorted(errors) == sorted(bad)
    for row_id, (_, error_type, words) in bad.items():
        assert errors[row_id]["step"] == "preprocess", row_id
        assert errors[row_id]["error_type"] == error_type, (row_id, errors[row_id])
        assert words in errors[row_id]["message"], (row_id, errors[row_id]["message"])
