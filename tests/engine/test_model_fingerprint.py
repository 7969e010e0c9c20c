"""A model whose weights are replaced in place (same folder, same file names, same size) is a different job:
resume refuses to mix its predictions with the old ones and names the model as what changed."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from pipeline.errors import FingerprintMismatch
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.engine.readback import predictions_by_id
from tests.helpers import job_dict, make_texts, write_texts_parquet

pytestmark = pytest.mark.timeout(480)  # three jobs; generous for a loaded shared machine


def _other_weights(path: os.PathLike) -> bytes:
    """The same tensors (names, shapes, dtypes, so the same file size) with other values."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
    torch.manual_seed(1)
    other = {name: torch.randn_like(t) if t.is_floating_point() else t.clone() for name, t in tensors.items()}
    return save(other, metadata=metadata)


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_weights_replaced_in_place_change_the_fingerprint(ray_session, tiny_model, tmp_path, restore_mtime):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    write_texts_parquet(tmp_path / "in.parquet", make_texts(20, seed=70))
    spec = parse_spec(
        job_dict(input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(model))
    )
    run_inference(spec, progress=False)
    before = predictions_by_id(str(tmp_path / "out"))

    weights = model / "model.safetensors"
    old, new = weights.read_bytes(), _other_weights(weights)
    assert len(new) == len(old) and new != old
    st = os.stat(weights)
    with open(weights, "r+b") as f:  # in place: same inode, same name, same size
        f.write(new)
    if restore_mtime:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(weights).st_mtime_ns == st.st_mtime_ns
    assert os.stat(weights).st_ino == st.st_ino and os.stat(weights).st_size == st.st_size

    with pytest.raises(FingerprintMismatch) as err:
        run_inference(spec, progress=False)
    assert re.search(r"\bmodel\b", str(err.value).replace(str(tmp_path), "<tmp>")), str(err.value)

    # Recomputed with the new weights, the predictions differ: the refusal was about outputs that change.
    run_inference(spec, progress=False, overwrite=True)
    after = predictions_by_id(str(tmp_path / "out"))
    assert set(after) == set(before)
    assert any(after[i]["score"] != pytest.approx(before[i]["score"], abs=1e-4) for i in before)
