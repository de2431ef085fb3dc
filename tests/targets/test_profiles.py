import platform
import re

import pytest

from edgesmith.targets import ProfileError, list_profiles, load_profile


def test_x86_host_fills_in_host_facts():
    profile = load_profile("x86-host")
    assert profile.arch == platform.machine() and profile.cpu != "unknown"
    assert profile.backends[0] == "onnxruntime" and profile.quant_scheme == "ort-x86"


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ProfileError, match="valid targets: .*x86-host"):
        load_profile("pdp-11")


def test_user_profile_directory(tmp_path, monkeypatch):
    (tmp_path / "my-board.yaml").write_text("arch: aarch64\nbackends: [onnxruntime]\nquant_scheme: ort-arm\n")
    monkeypatch.setenv("EDGESMITH_PROFILES", str(tmp_path))
    assert "my-board" in list_profiles()
    assert load_profile("my-board").quant_scheme == "ort-arm"


def test_profile_errors_name_file_and_field(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("arch: aarch64\nbackends: [coreml]\nquant_scheme: ort-arm\n")
    monkeypatch.setenv("EDGESMITH_PROFILES", str(tmp_path))
    with pytest.raises(ProfileError, match=r"bad.yaml: field 'backends.0'"):
        load_profile("bad")
    monkeypatch.setenv("EDGESMITH_PROFILES", str(tmp_path / "absent"))
    with pytest.raises(ProfileError, match="does not exist"):
        list_profiles()


def test_every_builtin_profile_loads_with_its_backends_settings():
    names = list_profiles()
    for expected in ("x86-host", "raspberry-pi-4", "raspberry-pi-5", "android-arm64", "jetson-nano",
                     "jetson-xavier-nx", "jetson-orin-nano", "jetson-agx-orin", "rtx-3060", "rtx-4090"):
        assert expected in names
    for name in names:
        profile = load_profile(name)
        if "tensorrt" in profile.backends:
            assert profile.tensorrt is not None and profile.gpu_sm and profile.quant_scheme == "tensorrt"
        if "tvm" in profile.backends:
            assert profile.tvm.target["kind"] == "llvm"
            if profile.arch == "aarch64":
                assert profile.tvm.target["mtriple"].startswith("aarch64") and profile.tvm.cc
    assert load_profile("jetson-xavier-nx").tensorrt.dla_core == 0 and load_profile("jetson-xavier-nx").gpu_sm == 72
    assert load_profile("jetson-agx-orin").tensorrt.major == 10 and load_profile("jetson-nano").tensorrt.major == 8
    assert {load_profile("rtx-3060").gpu_sm, load_profile("rtx-4090").gpu_sm} == {86, 89}
    assert load_profile("raspberry-pi-4").tvm.target["mcpu"] == "cortex-a72"


@pytest.mark.parametrize("text, field", [
    ("arch: aarch64\nbackends: [tensorrt]\nquant_scheme: tensorrt\n", "profile"),   # no tensorrt: settings
    ("arch: aarch64\nbackends: [tvm]\nquant_scheme: ort-arm\ntvm: {target: {mcpu: a72}}\n", "tvm.target"),
    ("arch: aarch64\nbackends: [tensorrt]\nquant_scheme: tensorrt\ntensorrt: {major: 7}\n", "tensorrt.major"),
    ("arch: aarch64\nbackends: [tensorrt]\nquant_scheme: tensorrt\n"
     "tensorrt: {major: 10, min_batch: 4, max_batch: 2}\n", "tensorrt"),
])
def test_profile_field_errors(tmp_path, monkeypatch, text, field):
    (tmp_path / "board.yaml").write_text(text)
    monkeypatch.setenv("EDGESMITH_PROFILES", str(tmp_path))
    with pytest.raises(ProfileError, match=rf"board.yaml: field '{re.escape(field)}'"):
        load_profile("board")
