import pytest
import torch
from safetensors.torch import save_file

from edgesmith import models
from edgesmith.errors import CheckpointError
from edgesmith.pipeline.checkpoint import apply_state_dict, read_state_dict


def small_cnn():
    return models.create("mnist_cnn", width=4)


def test_safetensors_and_pt_round_trip(tmp_path):
    source = small_cnn()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pt")  # wrapped, as training scripts save it
    for name in ("w.safetensors", "w.pt"):
        target = small_cnn()
        apply_state_dict(target, read_state_dict(tmp_path / name), name)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value)


def test_mismatched_keys_and_shapes_are_listed(tmp_path):
    state = small_cnn().state_dict()
    state.pop("classifier.1.bias")
    state["extra.weight"] = torch.zeros(1)
    state["features.0.0.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(CheckpointError) as info:
        apply_state_dict(small_cnn(), state, "w.pt")
    message = str(info.value)
    assert "classifier.1.bias" in message and "extra.weight" in message
    assert "features.0.0.weight [3, 1, 3, 3]" in message and "[4, 1, 3, 3]" in message


def test_pickle_only_file_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(small_cnn(), path)  # a pickled nn.Module: loading it would execute code
    with pytest.raises(CheckpointError, match="needs pickle"):
        read_state_dict(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(bad)


def test_nan_or_inf_weights_are_refused_naming_the_first_tensor(tmp_path):
    for value, suffix in ((float("nan"), "safetensors"), (float("inf"), "pt")):
        state = {k: v.clone() for k, v in small_cnn().state_dict().items()}
        state["classifier.1.weight"][0, :3] = value
        path = tmp_path / f"w.{suffix}"
        save_file(state, path) if suffix == "safetensors" else torch.save(state, path)
        with pytest.raises(CheckpointError, match=r"tensor 'classifier.1.weight' holds 3 NaN/Inf value\(s\)"):
            read_state_dict(path)
