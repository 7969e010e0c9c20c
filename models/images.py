"""Image input shared by the vision tasks: decode on the CPU, ship compact pixels, normalise on the device.

An `image` input value is one of
- encoded bytes (JPEG, PNG, WebP, GIF, TIFF, BMP, ... anything PIL opens),
- an HF `datasets` Image struct `{"bytes": ..., "path": ...}` (bytes win; else the path is read),
- a str path or fsspec URI (`s3://bucket/cat.jpg`, `file:///...`), read with `storage_options`.

`load_images` decodes each value the way `transformers.image_utils.load_image` (the pipelines' loader) does
— EXIF orientation applied (`PIL.ImageOps.exif_transpose`), then `convert("RGB")` — so outputs match the
pipelines. One deliberate difference: PIL's `convert("RGB")` clips high-bit-depth images (16-bit PNG/TIFF
opens as `I;16`/`I`, float TIFF as `F`), turning most of them white; here 16-bit values are scaled by
255/65535 (mode I only when its values exceed 255) and float images in [0, 1] by 255 first (other values
are clipped to 0–255).

Every value that cannot become an image gives a `RowError` that says why and how to fix it: null, empty,
missing file, not an image, truncated or corrupt data, more pixels than `max_pixels` (decompression-bomb
guard, checked from the header before any pixel is decoded), an image mode PIL cannot convert.

Compact transfer (`pixel_values` / `pixels_to_tensor`): the model's image processor runs in the CPU
preprocess task with rescale and normalize switched off, so the resized/cropped pixels are still integers
0–255 and travel as uint8 (C, H, W) — 4× less than float32 through the object store. The replica rescales
and normalises on its device with the processor's own factor, mean and std. `compact_pixels` checks once per
processor that this reproduces the processor's float output (≤ 1e-5); a processor for which it does not
(one that rescales before resizing, say) falls back to shipping its float32 output unchanged. Each array's
dtype says which it is, so the runner needs no flag.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from models.loading import load_pretrained
from models.registry import RowError
from pipeline.errors import ModelError, SpecError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImagePreprocessor",
    "ModelOutputs",
    "PixelNorm",
    "ShapeGroupedRunner",
    "check_max_pixels",
    "compact_pixels",
    "image_size",
    "label_array",
    "load_image",
    "load_image_processor",
    "load_images",
    "model_outputs",
    "pixel_norm",
    "pixel_values",
    "pixels_to_tensor",
    "preprocess_images",
    "shape_groups",
    "training_images",
]

# PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): about 0.25 GB of RGB at 89.5 Mpx, far above
# any photo a vision model resizes to a few hundred pixels, far below what would exhaust a worker's memory.
DEFAULT_MAX_PIXELS = 89_478_485

# Modes PIL clips when converting to RGB; scaled to 8 bits first (see the module docstring).
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")
# File signatures, to tell "a JPEG whose header is cut off" from "not an image at all".
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"RIFF", "WebP (RIFF)"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def check_max_pixels(value: int, *, key: str) -> None:
    """Driver-side validation of a task's `max_pixels` param."""
    if value < 1:
        raise SpecError(key, f"must be a positive pixel count (default {DEFAULT_MAX_PIXELS:,}), got {value}")


# --- decoding ---------------------------------------------------------------------------------------------


def _read_bytes(path: str, storage_options: Mapping[str, Any] | None) -> bytes | RowError:
    if not path:
        return RowError("InvalidInput", "the image path is an empty string; give a file path or URI")
    try:
        if "://" not in path or path.startswith("file://"):
            local = path[len("file://") :] if path.startswith("file://") else path
            with open(os.path.expanduser(local), "rb") as f:
                return f.read()
        import fsspec

        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        return RowError(
            "ImageNotFound", f"no file at {path!r}; check the path (or the URI and its storage_options)"
        )
    except IsADirectoryError:
        return RowError("ImageNotFound", f"{path!r} is a directory, not an image file")
    except Exception as e:  # noqa: BLE001 - any backend error (protocol, permission, network) is this row's
        return RowError("ImageReadError", f"cannot read {path!r}: {type(e).__name__}: {e}")


def _to_8bit(image: PILImage.Image) -> PILImage.Image:
    """High-bit-depth grayscale → 8-bit L with its range kept (PIL would clip it)."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if image.mode == "I" and (top <= 255 or top > 65535 or arr.min() < 0):
            scaled = arr  # 32-bit mode holding 8-bit values, or no known range: clip like PIL
        else:
            scaled = arr * (255.0 / 65535.0)  # 16-bit data (I;16*, or 16-bit values in mode I)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8), mode="L")
    return image


def load_image(
    value: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: Mapping[str, Any] | None = None
) -> PILImage.Image | RowError:
    """One input value → an upright, fully decoded RGB PIL image, or a RowError saying why not."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if value is None:
        return RowError(
            "InvalidInput", "the image is null; give encoded bytes, a {bytes, path} struct or a path"
        )
    where = "the image bytes"
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            return RowError(
                "InvalidInput",
                "the image struct has neither bytes nor a path; expected {bytes: <encoded image>, path: <str>}",
            )
        if data is None:
            value = path
        else:
            value = data
            where = f"the image bytes of {path!r}" if path else where
    if isinstance(value, str):
        where = repr(value)
        value = _read_bytes(value, storage_options)
        if isinstance(value, RowError):
            return value
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        return RowError(
            "InvalidInput",
            f"the image is a {type(value).__name__}; expected encoded bytes, a {{bytes, path}} struct or a path",
        )
    if not value:
        return RowError("EmptyImage", f"{where} are empty (0 bytes); the file or column holds no image")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL refuses images above 2x its global limit at open(); a larger cap asked for by the job wins.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's global warning/limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(value))
            width, height = image.size
            if width * height > max_pixels:
                return RowError(
                    "ImageTooLarge",
                    f"{where} hold {width}x{height} = {width * height:,} pixels > max_pixels {max_pixels:,} (decompression-bomb "
                    "guard); downscale the image or raise params.max_pixels if it is genuine",
                )
            if width == 0 or height == 0:
                return RowError("ImageDecodeError", f"{where} declare a {width}x{height} image (no pixels)")
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_8bit(image)
            if image.mode != "RGB":
                image = image.convert("RGB")
    except Image.DecompressionBombError as e:
        return RowError(
            "ImageTooLarge",
            f"{where}: {e} (max_pixels is {max_pixels:,}); downscale the image or raise params.max_pixels "
            "if it is genuine",
        )
    except UnidentifiedImageError:
        head = value[:16]
        kind = next((name for magic, name in _SIGNATURES if value.startswith(magic)), None)
        if kind is not None:
            return RowError(
                "ImageDecodeError",
                f"{where} start like a {kind} file but its header cannot be read: the file is cut short or "
                "corrupt; re-fetch it",
            )
        return RowError(
            "NotAnImage",
            f"{where} are not an image format PIL recognises (first bytes {head!r}); give JPEG, PNG, WebP, "
            "GIF, TIFF or BMP data",
        )
    except OSError as e:
        if "truncated" in str(e).lower():
            return RowError(
                "TruncatedImage",
                f"{where} end before the image does ({e}); the file is cut short, re-fetch it",
            )
        return RowError("ImageDecodeError", f"{where} could not be decoded: {type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - corrupt data raises many types (SyntaxError, ValueError, ...)
        return RowError("ImageDecodeError", f"{where} could not be decoded: {type(e).__name__}: {e}")
    return image


def load_images(
    values: Sequence[Any],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: Mapping[str, Any] | None = None,
) -> list[PILImage.Image | RowError]:
    """`load_image` for each value (a column of the task's `image` input)."""
    return [load_image(v, max_pixels=max_pixels, storage_options=storage_options) for v in values]


def training_images(
    values: Sequence[Any], *, max_pixels: int, storage_options: Mapping[str, Any] | None
) -> tuple[list[int], list[PILImage.Image]]:
    """A fine-tuning batch's images that decode: (their positions in the batch, the images). A training
    batch has no error records: rows whose image does not decode are dropped with one warning; a batch where
    none decodes raises (the loop reports it as the worker's error)."""
    images = load_images(values, max_pixels=max_pixels, storage_options=storage_options)
    keep = [i for i, image in enumerate(images) if not isinstance(image, RowError)]
    if len(keep) < len(images):
        bad = next(image for image in images if isinstance(image, RowError))
        logging.getLogger(__name__).warning(
            "dropped %d of %d training images that do not decode (e.g. %s: %s)",
            len(images) - len(keep),
            len(images),
            bad.error_type,
            bad.message,
        )
    if not keep:
        raise ValueError(f"no image of this batch of {len(images)} decodes; e.g. {images[0]}")
    return keep, [cast("PILImage.Image", images[i]) for i in keep]


def image_size(image: PILImage.Image) -> np.ndarray:
    """The original (height, width) as an int32 array (2,): a feature postprocess uses for target sizes."""
    return np.array([image.height, image.width], dtype=np.int32)


# --- compact pixels: uint8 on the wire, rescale + normalize on the device ---------------------------------


@dataclass(frozen=True)
class PixelNorm:
    """What the device applies to uint8 pixels: x * rescale_factor, then (x - mean) / std (each optional)."""

    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def pixel_norm(processor: Any) -> PixelNorm:
    """The processor's own rescale factor and mean/std, as configured in its preprocessor_config.json."""

    def channels(value: Any) -> tuple[float, ...]:
        return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))

    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
    normalize = getattr(processor, "do_normalize", False)
    return PixelNorm(
        rescale_factor=rescale,
        mean=channels(processor.image_mean) if normalize else None,
        std=channels(processor.image_std) if normalize else None,
    )


def _normalize_np(pixels: np.ndarray, norm: PixelNorm) -> np.ndarray:
    x = pixels.astype(np.float32)
    if norm.rescale_factor is not None:
        x = x * np.float32(norm.rescale_factor)
    if norm.mean is not None and norm.std is not None:
        shape = (-1,) + (1,) * (x.ndim - 1)
        x = (x - np.asarray(norm.mean, np.float32).reshape(shape)) / np.asarray(norm.std, np.float32).reshape(
            shape
        )
    return x


def compact_pixels(processor: Any) -> bool:
    """Whether uint8 transfer reproduces this processor's float output (probed once on a synthetic image)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    # Odd, non-square size so resize, crop and aspect-ratio paths are all exercised.
    probe = Image.fromarray(rng.integers(0, 256, size=(61, 83, 3), dtype=np.uint8), mode="RGB")
    try:
        full = _first(processor, probe).astype(np.float32)
        raw = _first(processor, probe, return_tensors=None, do_rescale=False, do_normalize=False)
    except Exception:  # noqa: BLE001 - a processor that rejects the switches (timm's) ships floats
        return False
    integral = raw.dtype.kind in "ui" or np.array_equal(raw, np.rint(raw))
    if raw.shape != full.shape or raw.min() < 0 or raw.max() > 255 or not integral:
        return False
    return bool(np.abs(_normalize_np(raw, pixel_norm(processor)) - full).max() <= 1e-5)


def pixel_values(processor: Any, image: PILImage.Image, *, compact: bool, **kwargs: Any) -> np.ndarray:
    """One image through the processor: uint8 (C, H, W) when `compact`, else the processor's float32 output.

    Images go one at a time so no processor pads one row to another's size (the runner decides batching).
    `kwargs` are extra processor arguments (e.g. a size override)."""
    if compact:
        # No tensor conversion: the PIL backend's resize already gives uint8 numpy.
        raw = _first(processor, image, return_tensors=None, do_rescale=False, do_normalize=False, **kwargs)
        if raw.dtype == np.uint8:
            return raw
        # (np.rint on integer input would compute in float16: round only what is float.)
        return (raw if raw.dtype.kind in "ui" else np.rint(raw)).astype(np.uint8)
    return _first(processor, image, **kwargs).astype(np.float32, copy=False)


def _first(
    processor: Any, image: PILImage.Image, *, return_tensors: str | None = "pt", **kwargs: Any
) -> np.ndarray:
    """The processor's pixel_values for one image, as numpy. "pt" is the one return type every processor
    takes (timm's refuses the others); None skips the tensor conversion where the processor allows it."""
    out = processor(images=[image], return_tensors=return_tensors, **kwargs)["pixel_values"][0]
    return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


def pixels_to_tensor(arrays: Sequence[np.ndarray], norm: PixelNorm, *, device: Any, dtype: Any) -> Any:
    """Same-shape per-row pixel arrays → a (B, C, H, W) tensor on `device` in `dtype`, ready for the model.

    uint8 rows move as uint8 (pinned when the device is a GPU) and are rescaled/normalised there in float32,
    then cast to the model dtype; float rows are the processor's finished output and only move and cast."""
    import torch

    batch = torch.from_numpy(np.stack(arrays))  # (B, C, H, W)
    if batch.device.type == "cpu" and torch.device(device).type == "cuda":
        batch = batch.pin_memory()
    batch = batch.to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        x = batch.float()
        if norm.rescale_factor is not None:
            x = x * norm.rescale_factor
        if norm.mean is not None and norm.std is not None:
            mean = torch.tensor(norm.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(norm.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        batch = x
    return batch.to(dtype)


def shape_groups(arrays: Sequence[np.ndarray]) -> list[list[int]]:
    """Row indices grouped by array shape, in first-seen order: each group stacks into one forward.

    Rows of different sizes are never padded to each other: zero padding changes a convolutional
    backbone's features near the border, so a padded row would not match its batch-of-one result."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, arr in enumerate(arrays):
        groups.setdefault(tuple(arr.shape), []).append(i)
    return list(groups.values())


# --- the vision tasks' shared stages -----------------------------------------------------------------------


def load_image_processor(model_dir: str) -> Any:
    """The processor `transformers.pipeline` would load for this folder (same call, same backend choice)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"no image processor in {model_dir!r} ({e}); the folder needs a preprocessor_config.json, as "
            "`save_pretrained` of the model's image processor writes it"
        ) from e


def preprocess_images(
    processor: Any,
    values: list[Any],
    *,
    compact: bool,
    max_pixels: int,
    storage_options: Mapping[str, Any] | None = None,
    orig_size: bool = True,
) -> list[dict[str, Any] | RowError]:
    """Decode each value and run the processor: {pixel_values (C, H, W) uint8|float32, orig_size (2,) int32
    (height, width of the decoded, upright image; with `orig_size`)}. A processor failure is that row's error."""
    out: list[dict[str, Any] | RowError] = []
    for image in load_images(values, max_pixels=max_pixels, storage_options=storage_options):
        if isinstance(image, RowError):
            out.append(image)
            continue
        try:
            pixels = pixel_values(processor, image, compact=compact)
        except Exception as e:  # noqa: BLE001 - a processor failure costs only this row
            out.append(
                RowError(
                    "ImageProcessorError",
                    f"the model's image processor failed on this {image.width}x{image.height} image: "
                    f"{type(e).__name__}: {e}",
                )
            )
            continue
        row = {"pixel_values": pixels}
        if orig_size:
            row["orig_size"] = image_size(image)
        out.append(row)
    return out


class ImagePreprocessor:
    """The CPU preprocess of the vision tasks: the `image` input through `preprocess_images`, with the
    `max_pixels` and `storage_options` of the task's params."""

    def __init__(self, model_dir: str, params: Any, *, orig_size: bool = True) -> None:
        self.processor = load_image_processor(model_dir)
        self.compact = compact_pixels(self.processor)
        self.max_pixels: int = params.max_pixels
        self.storage_options: Mapping[str, Any] | None = params.storage_options
        self.orig_size = orig_size

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        return preprocess_images(
            self.processor,
            columns["image"],
            compact=self.compact,
            max_pixels=self.max_pixels,
            storage_options=self.storage_options,
            orig_size=self.orig_size,
        )


class ShapeGroupedRunner:
    """Forward of an image model over per-row pixels: rows of one processed size go through together.

    Shared by the vision tasks (`fields` = the output tensors to return; a field the model leaves None is
    left out of the row)."""

    def __init__(
        self, model: Any, processor: Any, *, fields: tuple[str, ...], device: str, dtype: str
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model = model.to(self.device).eval()
        self.norm = pixel_norm(processor)
        self.fields = fields

    @classmethod
    def load(
        cls, auto: Any, model_dir: str, *, fields: tuple[str, ...], device: str, dtype: str
    ) -> ShapeGroupedRunner:
        """The runner of `auto.from_pretrained(model_dir)` (see `models.loading.load_pretrained`)."""
        model = load_pretrained(auto, model_dir, device=device, dtype=dtype)
        return cls(model, load_image_processor(model_dir), fields=fields, device=device, dtype=dtype)

    def length(self, features: Mapping[str, Any]) -> int:
        # Pixels per row: sorts same-size rows next to each other and makes max_batch_tokens a pixel budget.
        shape = features["pixel_values"].shape  # (C, H, W)
        return int(shape[-2] * shape[-1])

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        arrays = [f["pixel_values"] for f in batch]
        out: list[dict[str, Any]] = [{} for _ in batch]
        for group in shape_groups(arrays):
            pixels = pixels_to_tensor(
                [arrays[i] for i in group], self.norm, device=self.device, dtype=self.dtype
            )  # (B, C, H, W)
            with self.torch.inference_mode():
                result = self.model(pixel_values=pixels)
            for name in self.fields:
                value = getattr(result, name, None)
                if value is None:
                    continue
                array = value.float().cpu().numpy()  # (B, ...)
                for r, i in enumerate(group):
                    out[i][name] = array[r]
        return out


class ModelOutputs(dict):
    """What the processors' post_process methods and the pipelines' postprocess read: a dict of batched
    tensors with attribute access (`outputs.logits`) and item access (`outputs["target_size"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def model_outputs(output: Mapping[str, Any]) -> ModelOutputs:
    """A row's raw outputs → batch-of-one float32 tensors, as the pipeline's `_forward` hands them on."""
    import torch

    return ModelOutputs({k: torch.from_numpy(np.array(v, dtype=np.float32))[None] for k, v in output.items()})


def label_array(
    value: Any,
    *,
    what: str,
    if_null: str,
    dtype: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """A per-pixel training label (a class map, a depth map) as its raw array: image bytes (PNG, 16-bit PNG,
    float TIFF, ...), an HF Image struct {bytes, path}, a path/URI, a nested list or an array (as `dtype`).
    Raises ValueError naming `what` ("the mask") when it does not decode, or `if_null` when it is null."""
    from PIL import Image

    if isinstance(value, Mapping) and value.get("bytes") is None and value.get("path"):
        value = value["path"]
    elif isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, str):
        import fsspec

        with fsspec.open(value, "rb", **(storage_options or {})) as f:
            value = f.read()
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as image:
                return np.asarray(image)
        except Exception as e:  # noqa: BLE001 - any decoder error means the same here
            raise ValueError(f"{what} does not decode as an image ({type(e).__name__}: {e})") from e
    if value is None:
        raise ValueError(if_null)
    return np.asarray(value, dtype=dtype)
