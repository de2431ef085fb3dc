"""Measuring bundles on a device over a TVM RPC tracker (targets/device.py): the errors that say what to start."""
import sys

import pytest

from edgesmith.targets.device import DeviceUnreachable, measure_bundle
from tests.conftest import free_port, rpc_device


def test_measuring_on_a_device_names_what_is_missing(tmp_path):
    def plain_tvm_server(tracker):
        port = free_port()
        return [sys.executable, "-m", "tvm.exec.rpc_server", f"--tracker={tracker}", "--key=plain", "--host=127.0.0.1",
                f"--port={port}", f"--port-end={port + 50}"]

    (tmp_path / "bundle").mkdir()
    options = {"warmup": 1, "runs": 1, "batch_size": 1, "threads": 1}
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(DeviceUnreachable, match=f"RPC tracker {closed} unreachable.*rpc_tracker"):
        measure_bundle(closed, "any", tmp_path / "bundle", **options)
    with rpc_device("plain", plain_tvm_server) as tracker:
        with pytest.raises(DeviceUnreachable, match="no device with RPC key 'other'"):
            measure_bundle(tracker, "other", tmp_path / "bundle", **options)
        # A stock TVM RPC server runs TVM modules only: it cannot load an ONNX Runtime bundle, so it is refused.
        with pytest.raises(DeviceUnreachable, match="plain TVM RPC server.*edgesmith_runtime.py --rpc"):
            measure_bundle(tracker, "plain", tmp_path / "bundle", **options)
