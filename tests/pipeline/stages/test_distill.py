import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import TrainingError
from pipeline.recipe import DistillConfig, FinetuneConfig
from pipeline.stages.distill import distillation_objective, kd_loss


def test_kd_loss_limits():
    student, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(kd_loss(student, torch.randn(8, 10), y, DistillConfig(alpha=0.0)), F.cross_entropy(student, y))
    assert float(kd_loss(student, student.clone(), y, DistillConfig(alpha=1.0))) == pytest.approx(0.0, abs=1e-6)
    far = kd_loss(student, -student, y, DistillConfig(alpha=1.0, temperature=2.0))
    assert float(far) > 0.1


def test_teacher_with_other_classes_is_refused():
    teacher = torch.nn.Linear(4, 3)
    objective = distillation_objective(teacher, DistillConfig(), FinetuneConfig())
    with pytest.raises(TrainingError, match=r"teacher outputs shape \[2, 3\] but the student \[2, 10\]"):
        objective(torch.randn(2, 10), torch.zeros(2, dtype=torch.long), (torch.randn(2, 4),))
