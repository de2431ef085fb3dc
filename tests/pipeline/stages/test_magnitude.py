import pytest
import torch

from edgesmith.errors import RecipeError
from edgesmith.pipeline.config import FinetuneConfig
from edgesmith.pipeline.stages import magnitude
from edgesmith.pipeline.stages.magnitude import MagnitudePruneStage


def stage(**fields) -> MagnitudePruneStage:
    return MagnitudePruneStage(kind="prune", method="magnitude", **fields)


def test_cubic_schedule_ramps_from_initial_to_final_and_holds_between_updates():
    cfg = stage(initial_sparsity=0.1, final_sparsity=0.9, start_epoch=1, end_epoch=2, update_every=5,
                finetune=FinetuneConfig(epochs=4))
    s = magnitude.cubic_schedule(cfg, steps_per_epoch=10)
    assert s(0) == s(9) == 0.1                       # before start_epoch
    assert s(10) == pytest.approx(0.1)               # the ramp starts at s_i
    assert s(11) == s(14) and s(15) > s(14)          # updated every 5 steps only
    assert s(30) == s(39) == 0.9                     # after end_epoch: final sparsity, recovery epochs
    ramp = [s(t) for t in range(10, 30)]
    assert ramp == sorted(ramp)
    # cubic: most of the pruning happens early (the first half of the ramp removes > 3/4 of it)
    assert s(20) - 0.1 > 0.75 * (0.9 - 0.1)


def test_default_ramp_leaves_the_last_epoch_for_recovery():
    assert stage(final_sparsity=0.5, finetune=FinetuneConfig(epochs=3)).ramp_end_epoch == 1
    assert stage(final_sparsity=0.5).ramp_end_epoch == 0


def test_gradual_pruning_reaches_the_target_and_keeps_the_classifier(trained_digits_cnn):
    fresh, data, ctx, accuracy = trained_digits_cnn
    model = fresh()
    cfg = stage(final_sparsity=0.7, update_every=5, finetune=FinetuneConfig(epochs=3, lr=1e-3))
    result = magnitude.run(cfg, model, data, ctx)
    assert result.metrics["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert not any(name.endswith("_orig") for name, _ in result.model.named_parameters())  # masks made permanent
    assert float((result.model.classifier[1].weight == 0).float().mean()) < 0.05
    convs = [m.weight for m in result.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs) > 0.65
    assert result.metrics["finetune_history"][-1]["accuracy"] > accuracy - 10


def test_one_shot_pruning_without_finetuning(trained_digits_cnn):
    fresh, data, ctx, _ = trained_digits_cnn
    result = magnitude.run(stage(final_sparsity=0.5), fresh(), data, ctx)
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=0.01) and result.metrics["finetune_history"] == []


def test_unknown_ignored_layer_is_named(trained_digits_cnn):
    fresh, data, ctx, _ = trained_digits_cnn
    with pytest.raises(RecipeError, match="no module 'clasifier'"):
        magnitude.run(stage(final_sparsity=0.5, ignored_layers=["clasifier"]), fresh(), data, ctx)
