"""Binary masks as COCO run-length encoding (RLE), the form `image-segmentation` writes its masks in.

A mask is `{"size": [height, width], "counts": str}`: pycocotools' compressed RLE, column-major (Fortran
order) runs that start with a run of 0s, the counts string in COCO's 6-bit ASCII encoding. It is what
`pycocotools.mask.encode` gives and what COCO JSON files, `pycocotools.mask.decode` and most annotation tools
read, so a mask column written here opens anywhere COCO masks do. `decode_mask` turns one back into a
boolean (H, W) array; it also takes bytes counts and uncompressed RLE (`counts` as a list of run lengths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["RLE_TYPE", "decode_mask", "encode_mask"]

# The Arrow type of one mask; `size` is [height, width] of the original image.
RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (or 0/non-0) (H, W) array → `{"size": [H, W], "counts": str}` (COCO compressed RLE)."""
    from pycocotools import mask as coco_mask

    if mask.ndim != 2:
        raise ValueError(f"a mask is a 2-d (height, width) array, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (`{"size": [H, W], "counts": str | bytes | list[int]}`) → a boolean (H, W) array."""
    from pycocotools import mask as coco_mask

    try:
        size, counts = rle["size"], rle["counts"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"a COCO RLE mask is a mapping with 'size' and 'counts', got {rle!r:.80}") from e
    height, width = (int(s) for s in size)
    if isinstance(counts, (list, tuple, np.ndarray)):  # uncompressed RLE: run lengths, starting with 0s
        compressed = coco_mask.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
    else:
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        compressed = {"size": [height, width], "counts": counts}
    return coco_mask.decode(compressed).astype(bool)
