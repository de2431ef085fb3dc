import pytest
import torch

from edgesmith import models
from edgesmith.pipeline.config import DataConfig
from edgesmith.pipeline.data import load_dataset
from edgesmith.pipeline.stages import StageContext
from edgesmith.pipeline.stages.train import TrainStage, fit


@pytest.fixture(scope="module")
def trained_digits_cnn():
    """A small mnist_cnn trained for a few epochs on the real 8×8 digits (a copy per use: stages change it)."""
    model = models.create("mnist_cnn", width=16).eval()
    specs = models.input_spec_of(model)
    data = load_dataset(DataConfig(name="digits"), specs)
    ctx = StageContext(specs=specs, eval_batch_size=256)
    history = fit(model, data, TrainStage(kind="train", epochs=5, lr=3e-3), ctx, label="train")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh() -> torch.nn.Module:
        copy = models.create("mnist_cnn", width=16)
        copy.load_state_dict(state)
        return copy.eval()

    return fresh, data, ctx, history[-1]["accuracy"]
