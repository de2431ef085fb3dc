import platform

import pytest

from targets import ProfileError, list_profiles, load_profile


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
