import inspect

import numpy as np

from edgesmith import models
from edgesmith.pipeline.config import ExportConfig
from edgesmith.pipeline.export import export_onnx
from edgesmith.targets import load_profile
from edgesmith.targets.backends import BACKEND_FUNCTIONS, Backend, backend_names, get_backend


def test_backends_are_found_by_file_name():
    assert backend_names() == ["onnxruntime", "tensorrt", "tvm"]
    for name in backend_names():   # one contract for every backend
        backend = get_backend(name)
        assert backend.NAME == name and backend.ARTIFACT
        for function in BACKEND_FUNCTIONS:   # the Backend protocol's functions, with its parameters
            expected = list(inspect.signature(getattr(Backend, function)).parameters)[1:]   # without self
            assert list(inspect.signature(getattr(backend, function)).parameters)[:len(expected)] == expected, \
                (name, function)


def test_compile_and_load_run_the_model(tmp_path):
    model = models.create("mnist_cnn", width=8).eval()
    specs = models.input_spec_of(model)
    export_onnx(model, specs, ExportConfig(), tmp_path / "m.onnx")
    backend = get_backend("onnxruntime")
    profile = load_profile("x86-host")
    facts = backend.compile(tmp_path / "m.onnx", profile, tmp_path / "out")
    assert facts["runtime"].startswith("onnxruntime")
    runner = backend.load(tmp_path / "out", profile)
    x = specs[0].example(4)
    np.testing.assert_allclose(runner({"input": x.numpy()})[0], model(x).detach().numpy(), atol=1e-4)
    assert runner.threads >= 1
