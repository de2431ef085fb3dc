"""QAT (NNCF) and PTQ (ONNX Runtime calibrators): every output passes its scheme's Q/DQ rules, for real."""
import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, numpy_helper

from edgesmith.pipeline.config import ExportConfig
from edgesmith.pipeline.evaluate import onnx_accuracy, torch_accuracy
from edgesmith.pipeline.export import export_onnx
from edgesmith.pipeline.stages import QUANTIZED_ONNX, ptq, qat
from edgesmith.pipeline.stages.ptq import PTQStage
from edgesmith.pipeline.stages.qat import QATStage
from edgesmith.targets.backends.onnxruntime import OrtRunner
from edgesmith.targets.qdq_rules import SCHEMES, validate

EXPORT = ExportConfig(exporter="torchscript", opset=17)


def zero_point_types(path) -> set[int]:
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    return {inits[n.input[2]].data_type for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits}


def test_batchnorm_folds_into_convolutions_without_changing_outputs(trained_digits_cnn):
    fresh, _, ctx, _ = trained_digits_cnn
    model = fresh()
    x = ctx.specs[0].example(4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    assert qat.fold_batchnorm(model, (x,)) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)


class SharedConvOutput(nn.Module):
    """The conv's output feeds the BatchNorm and a skip connection: folding would change the skip."""
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.bn.running_mean.fill_(0.5)
        self.bn.running_var.fill_(4.0)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_batchnorm_whose_input_is_shared_is_left_alone():
    model = SharedConvOutput().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert qat.fold_batchnorm(model, (x,)) == 0
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.allclose(model(x), expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qat_writes_a_valid_int8_file_per_scheme(trained_digits_cnn, tmp_path, scheme):
    fresh, data, ctx, fp32_accuracy = trained_digits_cnn
    out = tmp_path / QUANTIZED_ONNX
    context = dataclasses.replace(ctx, scheme=scheme, out_dir=tmp_path, export=EXPORT)
    facts = qat.run(QATStage(kind="qat", epochs=1), fresh(), data, context).metrics
    assert validate(out, scheme) == []
    assert facts["batchnorms_folded"] == 5 and facts["int8_weights"] == 6   # 5 convs and the classifier
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer if i.dims and
               len(i.dims) >= 2]
    assert all(w.dtype == np.int8 for w in weights)    # stored as int8, not FP32 under a Q/DQ pair
    expected = {"tensorrt": {TensorProto.INT8}, "ort-arm": {TensorProto.INT8},
                "ort-x86": {TensorProto.INT8, TensorProto.UINT8}}[scheme]
    assert zero_point_types(out) == expected
    assert facts["parity"]["top1_agreement"] >= 0.99
    accuracy = onnx_accuracy(OrtRunner(out), data, ctx.specs, 256)
    assert accuracy > fp32_accuracy - 3


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy"])
def test_ptq_calibrators_write_valid_files(trained_digits_cnn, tmp_path, calibration):
    fresh, data, ctx, _ = trained_digits_cnn
    model = fresh()
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, ctx.specs, EXPORT, fp32)
    for scheme in SCHEMES:
        out, facts = _ptq(PTQStage(kind="ptq", calibration=calibration, calibration_samples=128), scheme, fp32,
                          data, ctx, tmp_path / scheme)
        assert validate(out, scheme) == [] and facts["calibration"] == calibration
        assert onnx_accuracy(OrtRunner(out), data, ctx.specs, 256) > torch_accuracy(model, data, 256) - 5


def test_ptq_for_tensorrt_keeps_biases_in_float(trained_digits_cnn, tmp_path):
    fresh, data, ctx, _ = trained_digits_cnn
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(fresh(), ctx.specs, EXPORT, fp32)
    out, _ = _ptq(PTQStage(kind="ptq", calibration_samples=64), "tensorrt", fp32, data, ctx, tmp_path / "trt")
    assert TensorProto.INT32 not in zero_point_types(out)
    _ptq(PTQStage(kind="ptq", calibration_samples=64), "ort-x86", fp32, data, ctx, tmp_path / "x86")
    # ORT's own format quantizes biases
    assert TensorProto.INT32 in zero_point_types(tmp_path / "x86" / QUANTIZED_ONNX)


def _ptq(cfg: PTQStage, scheme: str, fp32, data, ctx, folder):
    """PTQ through the stage contract (the scheme, FP32 ONNX and output folder travel in the context): the file it
    wrote and its facts."""
    folder.mkdir()
    result = ptq.run(cfg, None, data, dataclasses.replace(ctx, scheme=scheme, fp32_onnx=fp32, out_dir=folder))
    assert result.model is None
    return folder / QUANTIZED_ONNX, result.metrics
