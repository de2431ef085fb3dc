import numpy as np
import torch

import models
from pipeline.export import export_onnx
from pipeline.recipe import ExportConfig
from targets import load_profile
from targets.backends import backend_names, get_backend


def test_backends_are_found_by_file_name():
    assert "onnxruntime" in backend_names()
    assert get_backend("onnxruntime").NAME == "onnxruntime"


def test_compile_and_load_run_the_model(tmp_path):
    model = models.create("mnist_cnn", width=8).eval()
    specs = models.input_spec_of(model)
    export_onnx(model, specs, ExportConfig(), tmp_path / "m.onnx")
    backend = get_backend("onnxruntime")
    profile = load_profile("x86-host")
    artifact = backend.compile(tmp_path / "m.onnx", profile, tmp_path / "out")
    runner = backend.load(artifact, profile)
    x = specs[0].example(4)
    np.testing.assert_allclose(runner({"input": x.numpy()})[0], model(x).detach().numpy(), atol=1e-4)
    assert runner.threads >= 1
