import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from edgesmith import models
from edgesmith.errors import ModelError, RecipeError, TrainingError
from edgesmith.pipeline.config import DistillConfig, FeaturePair, FinetuneConfig, ModelConfig
from edgesmith.pipeline.stages import StageContext, distill
from edgesmith.pipeline.stages.distill import DistillStage, _adapter, distillation_loss, distillation_objective


def test_labelled_loss_mixes_distillation_and_cross_entropy():
    teacher = torch.nn.Linear(4, 10)
    xs, y = (torch.randn(8, 4),), torch.randint(0, 10, (8,))
    student = (torch.randn(8, 10),)
    hard_only = distillation_objective(teacher, DistillConfig(alpha=0.0), FinetuneConfig(label_smoothing=0))
    assert torch.allclose(hard_only(student, y, xs), F.cross_entropy(student[0], y))
    soft_only = distillation_objective(teacher, DistillConfig(alpha=1.0), FinetuneConfig())
    with torch.no_grad():
        assert float(soft_only((teacher(*xs),), y, xs)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_only(student, y, xs)) > 0.1


@pytest.mark.parametrize("shape, loss, expected", [
    ((8, 10), "auto", "kl"), ((8, 2, 6, 6), "auto", "mse"), ((8, 384), "cosine", "cosine"), ((8, 3, 5), "mse", "mse")])
def test_each_output_gets_its_loss(shape, loss, expected):
    teacher = torch.randn(shape)
    cfg = DistillConfig(loss=loss, temperature=2.0)
    assert float(distillation_loss((teacher.clone(),), (teacher,), cfg)) == pytest.approx(0.0, abs=1e-5)
    student = teacher + 0.5 * torch.randn(shape)
    reference = {"kl": lambda: 4 * F.kl_div(F.log_softmax(student / 2, 1), F.log_softmax(teacher / 2, 1),
                                            log_target=True, reduction="none").sum(1).mean(),
                 "mse": lambda: F.mse_loss(student, teacher),
                 "cosine": lambda: (1 - F.cosine_similarity(student, teacher, dim=1)).mean()}[expected]()
    assert torch.allclose(distillation_loss((student,), (teacher,), cfg), reference)


def test_without_labels_the_teacher_is_the_only_signal_for_every_output():
    class TwoHeads(torch.nn.Module):   # a detector's shape: class scores per box and box offsets
        def __init__(self):
            super().__init__()
            self.scores, self.boxes = torch.nn.Linear(4, 6), torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.scores(x), self.boxes(x).view(-1, 2, 4)

    teacher, student = TwoHeads(), TwoHeads()
    objective = distillation_objective(teacher, DistillConfig(), FinetuneConfig())
    xs = (torch.randn(16, 4),)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    first = objective(student(*xs), None, xs).item()
    for _ in range(200):
        loss = objective(student(*xs), None, xs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first   # both heads follow the teacher, with no labels at all


def test_teacher_with_other_classes_is_refused():
    teacher = torch.nn.Linear(4, 3)
    objective = distillation_objective(teacher, DistillConfig(), FinetuneConfig())
    with pytest.raises(TrainingError, match=r"teacher outputs shape \[2, 3\] but the student shape \[2, 10\]"):
        objective((torch.randn(2, 10),), torch.zeros(2, dtype=torch.long), (torch.randn(2, 4),))


def test_distill_stage_with_feature_adapters_trains_the_student(trained_digits_cnn, tmp_path):
    fresh, data, ctx, teacher_accuracy = trained_digits_cnn
    torch.manual_seed(0)   # the student's initialisation: unseeded, 3 epochs ended anywhere from 50 to 65 %
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
    with pytest.raises(ModelError, match=r"teacher outputs shape \[2, 3\] but the student shape \[2, 10\]"):
        distill.run(DistillStage(kind="distill", teacher=teacher), fresh(), data, ctx)


def test_unknown_feature_layer_is_named(trained_digits_cnn):
    fresh, data, ctx, _ = trained_digits_cnn
    cfg = DistillStage(kind="distill", features=[FeaturePair(student="features.9", teacher="features.4")])
    with pytest.raises(RecipeError, match=r"distill.features.0.student: the model has no module 'features.9'"):
        distill.run(cfg, fresh(), data, StageContext(specs=ctx.specs, eval_batch_size=256, load_teacher=fresh))
