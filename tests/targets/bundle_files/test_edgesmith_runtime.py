"""The bundles' standalone runtime: measuring a bundle on the device it runs on, and unpacking uploaded bundles."""
import io
import json
import re
import tarfile

import numpy as np
import pytest

from edgesmith.targets.bundle_files import edgesmith_rpc
from edgesmith.targets.bundle_files import edgesmith_runtime as runtime
from edgesmith.targets.bundle_files.edgesmith_runtime import measure
from tests.targets.conftest import example_inputs


def _ort_bundle(folder, onnx_path, reference_scale=1.0):
    """The files of an ONNX Runtime bundle that `measure` reads: manifest, model, parity inputs and references."""
    import numpy as np
    import onnxruntime as ort

    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_path.read_bytes())
    inputs = example_inputs(6)
    reference = ort.InferenceSession(str(onnx_path)).run(None, inputs)[0] * reference_scale
    np.savez(folder / "parity_inputs.npz", **inputs)
    np.savez(folder / "parity_reference.npz", output_0=reference)
    (folder / "manifest.json").write_text(json.dumps({
        "backend": "onnxruntime", "artifact": "model.onnx",
        "inputs": [{"name": "input", "shape": [1, 1, 12, 12], "dtype": "float32", "dynamic_axes": {"0": "batch"}}],
        "parity": {"tolerance": {"max_rel_diff": 1e-3, "min_top1_agreement": 0.97}}}))
    return folder


def test_measure_checks_parity_then_times_one_batch(tiny_onnx, tmp_path):
    result = measure(_ort_bundle(tmp_path / "b", tiny_onnx), warmup=2, runs=7, batch_size=4, threads=1)
    assert result["parity"]["passed"] and result["parity"]["samples"] == 6
    assert len(result["samples_ms"]) == 7 and min(result["samples_ms"]) > 0
    assert result["device"]["machine"] and result["device"]["emulated"] is None and result["threads"] == 1


def test_a_bundle_failing_parity_on_the_device_is_not_timed(tiny_onnx, tmp_path):
    result = measure(_ort_bundle(tmp_path / "b", tiny_onnx, reference_scale=-1.0), warmup=1, runs=3)
    assert not result["parity"]["passed"] and result["samples_ms"] is None


def test_non_finite_outputs_or_references_fail_the_check(tiny_onnx, tmp_path):
    result = runtime.check(_ort_bundle(tmp_path / "nan-reference", tiny_onnx, reference_scale=float("nan")))
    assert not result["passed"] and "NaN/Inf value(s) in the reference outputs" in result["problem"]
    folder = _ort_bundle(tmp_path / "nan-inputs", tiny_onnx)
    np.savez(folder / "parity_inputs.npz", input=np.full((6, 1, 12, 12), np.nan, np.float32))
    assert runtime.main(["--check", "--folder", str(folder)]) == 1
    assert "NaN/Inf value(s) in the outputs" in runtime.check(folder)["problem"]


def test_open_bundle_names_what_the_model_takes(tiny_onnx, tmp_path):
    model = runtime.open_bundle(_ort_bundle(tmp_path / "b", tiny_onnx))
    good = np.zeros((3, 1, 12, 12), np.float32)
    assert model({"input": good})[0].shape == (3, 10)
    takes = r"the model takes 'input' float32\[batch, 1, 12, 12\]"
    for feeds, says in (({"images": good}, r"missing input\(s\) \['input'\], unexpected \['images'\]"),
                        ({"input": good[:0]}, "empty batch"),
                        ({"input": good.astype(np.float64)}, "is float64"),
                        ({"input": good[:, 0]}, r"has shape \[3, 12, 12\]"),
                        ({"input": np.zeros((3, 1, 8, 8), np.float32)}, r"has shape \[3, 1, 8, 8\]")):
        with pytest.raises(runtime.InputError, match=says) as info:
            model(feeds)
        assert says == "empty batch" or re.search(takes, str(info.value))
    nan = good.copy()
    nan[1, 0, 2, 2] = np.nan
    assert model({"input": nan})[0].shape == (3, 10)   # opt-in: unchecked by default
    with pytest.raises(runtime.InputError, match="'input' holds 1 NaN/Inf"):
        runtime.open_bundle(tmp_path / "b", check_nan=True)({"input": nan})


def test_uploaded_bundles_must_be_flat_plain_files(tmp_path):
    def archive(name: str, data: bytes = b"x", kind=tarfile.REGTYPE):
        path = tmp_path / f"{abs(hash(name))}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return path

    edgesmith_rpc._unpack_flat(archive("model.onnx", b"onnx"), tmp_path / "ok")
    assert (tmp_path / "ok/model.onnx").read_bytes() == b"onnx"
    for bad in (archive("../escape.txt"), archive("sub/file.txt"), archive("link", kind=tarfile.SYMTYPE)):
        with pytest.raises(ValueError, match="not a plain bundle file"):
            edgesmith_rpc._unpack_flat(bad, tmp_path / "refused")
    assert not (tmp_path / "escape.txt").exists()
