import onnx
import pytest
import torch
import torch.nn as nn

from edgesmith import models
from edgesmith.errors import ExportError, ParityError
from edgesmith.models import InputSpec
from edgesmith.pipeline.config import DataConfig, ExportConfig, ParityConfig
from edgesmith.pipeline.data import load_dataset
from edgesmith.pipeline.export import check_parity, export_onnx


class FixedBatch(nn.Module):
    """Hard-codes the example batch: exporters specialise the batch axis without complaint."""

    def forward(self, x):
        return x.reshape(2, -1)[:, :3]


def test_specialised_batch_axis_is_caught(tmp_path):
    spec = (InputSpec("input", (1, 4)),)
    with pytest.raises(ExportError, match="hard-codes the traced batch size"):
        export_onnx(FixedBatch(), spec, ExportConfig(exporter="torchscript", opset=17), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_torchscript_exporter_and_slim(tmp_path):
    model = models.create("mnist_cnn", width=8).eval()
    specs = models.input_spec_of(model)
    facts = export_onnx(model, specs, ExportConfig(exporter="torchscript", opset=17, slim=True), tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert facts["exporter"] == "torchscript" and proto.opset_import[0].version == 17
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded into the convs


def test_parity_gate_fails_with_the_numbers(tmp_path):
    model = models.create("mnist_cnn", width=8).eval()
    specs = models.input_spec_of(model)
    export_onnx(model, specs, ExportConfig(), tmp_path / "m.onnx")
    data = load_dataset(DataConfig(name="digits"), specs)
    with torch.no_grad():  # the ONNX file no longer matches the weights torch runs
        model.classifier[1].bias += 0.5
    with pytest.raises(ParityError) as info:
        check_parity(model, tmp_path / "m.onnx", data, specs, ParityConfig(), batch_size=64)
    message = str(info.value)
    assert "max |torch−onnx| = 0.5" in message and "allowed 0.001" in message


def test_unexportable_model_names_the_cause(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum().unsqueeze(0).expand(x.shape[0], 2) if x.sum() > 0 else x[:, :2]

    with pytest.raises(ExportError, match="ONNX export \\(dynamo\\) failed") as info:
        export_onnx(DataDependent(), (InputSpec("input", (1, 4)),), ExportConfig(), tmp_path / "m.onnx")
    message = str(info.value)
    assert "branches on a tensor's value" in message and "data-dependent expression" in message
    assert "test_export.py:" in message and "if x.sum() > 0" in message   # where, in the user's code
    assert message.endswith("try export.exporter: torchscript") and "\x1b" not in message and "\n" not in message


def test_all_nan_outputs_fail_the_parity_gate(tmp_path):
    model = models.create("mnist_cnn", width=8).eval()
    specs = models.input_spec_of(model)
    export_onnx(model, specs, ExportConfig(), tmp_path / "m.onnx")
    data = load_dataset(DataConfig(name="digits"), specs)
    with torch.no_grad():   # both torch and the file (re-exported) now return NaN everywhere
        model.classifier[1].bias.fill_(float("nan"))
    export_onnx(model, specs, ExportConfig(), tmp_path / "m.onnx")
    with pytest.raises(ParityError, match="torch model's outputs hold .* NaN/Inf"):
        check_parity(model, tmp_path / "m.onnx", data, specs, ParityConfig(), batch_size=64)
