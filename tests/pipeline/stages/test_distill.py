import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from edgesmith import models
from edgesmith.errors import ModelError, RecipeError, TrainingError
from edgesmith.pipeline.config import DistillConfig, FeaturePair, FinetuneConfig, ModelConfig
from edgesmith.pipeline.stages import StageContext, distill
from edgesmith.pipeline.stages.distill import DistillStage, _adapter, distillation_objective, kd_loss


def test_kd_loss_limits():
    student, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    hard_only = kd_loss(student, torch.randn(8, 10), y, DistillConfig(alpha=0.0))
    assert torch.allclose(hard_only, F.cross_entropy(student, y))
    assert float(kd_loss(student, student.clone(), y, DistillConfig(alpha=1.0))) == pytest.approx(0.0, abs=1e-6)
    far = kd_loss(student, -student, y, DistillConfig(alpha=1.0, temperature=2.0))
    assert float(far) > 0.1


def test_teacher_with_other_classes_is_refused():
    teacher = torch.nn.Linear(4, 3)
    objective = distillation_objective(teacher, DistillConfig(), FinetuneConfig())
    with pytest.raises(TrainingError, match=r"teacher outputs shape \[2, 3\] but the student \[2, 10\]"):
        objective(torch.randn(2, 10), torch.zeros(2, dtype=torch.long), (torch.randn(2, 4),))


def test_distill_stage_with_feature_adapters_trains_the_student(trained_digits_cnn, tmp_path):
    fresh, data, ctx, teacher_accuracy = trained_digits_cnn
    student = models.create("mnist_cnn", width=8)   # narrower: its features need a 1×1 adapter to the teacher's
    cfg = DistillStage(kind="distill", epochs=3, lr=3e-3,
                       features=[FeaturePair(student="features.4", teacher="features.4")])
    context = StageContext(specs=ctx.specs, eval_batch_size=256, load_teacher=fresh)
    result = distill.run(cfg, student, data, context)
    assert result.metrics["teacher_accuracy"] == pytest.approx(teacher_accuracy)
    assert result.metrics["history"][-1]["accuracy"] > 50   # from random initialisation, in 3 epochs
    assert not student.features[4]._forward_hooks          # feature hooks are removed afterwards


def test_feature_adapter_kinds():
    pair = FeaturePair(student="a", teacher="b")
    assert isinstance(_adapter(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4), pair), torch.nn.Conv2d)
    assert isinstance(_adapter(torch.zeros(2, 5, 8), torch.zeros(2, 5, 12), pair), torch.nn.Linear)
    assert isinstance(_adapter(torch.zeros(2, 8), torch.zeros(2, 8), pair), torch.nn.Identity)
    with pytest.raises(ModelError, match="same resolution"):
        _adapter(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 2, 2), pair)


def test_named_teacher_with_other_classes_fails_before_training(trained_digits_cnn, tmp_path):
    fresh, data, ctx, _ = trained_digits_cnn
    checkpoint = tmp_path / "teacher.safetensors"
    save_model(models.create("mnist_cnn", width=8, num_classes=3), str(checkpoint))
    teacher = ModelConfig(name="mnist_cnn", kwargs={"width": 8, "num_classes": 3}, checkpoint=checkpoint)
    with pytest.raises(ModelError, match=r"teacher outputs shape \[2, 3\] but the student \[2, 10\]"):
        distill.run(DistillStage(kind="distill", teacher=teacher), fresh(), data, ctx)


def test_unknown_feature_layer_is_named(trained_digits_cnn):
    fresh, data, ctx, _ = trained_digits_cnn
    cfg = DistillStage(kind="distill", features=[FeaturePair(student="features.9", teacher="features.4")])
    with pytest.raises(RecipeError, match=r"distill.features.0.student: the model has no module 'features.9'"):
        distill.run(cfg, fresh(), data, StageContext(specs=ctx.specs, eval_batch_size=256, load_teacher=fresh))
