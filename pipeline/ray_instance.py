"""The Ray instance a batch's jobs run on: a local one the batch starts (and stops), or a cluster it joins.

It is started by a thread that holds it until the batch ends, for two reasons. The command starts it first thing,
so that Ray's servers start (3–4 s of their own, mostly waiting on subprocesses) while the driver imports and
validates the matrix, as the local pool's worker server does (worker_server.py). And Ray's processes die with the
thread that started them, not with the process (Linux's parent-death signal, which Ray sets so that a dead
driver leaves no servers behind): a thread that returned would take the instance with it. Stopping it in that
thread also lets the driver write the batch's results while Ray's processes exit.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future

from edgesmith.errors import EdgesmithError

_early: RayInstance | None = None   # started by the command before the batch was validated


def refuse_unauthenticated_local_ray() -> None:
    """A local Ray instance's servers (GCS, raylet, workers) listen on every interface: only Ray's token
    authentication (on by default for local instances since Ray 2.59; the token is in ~/.ray/auth_token) keeps out
    whoever reaches this machine, so a batch does not start one with it turned off."""
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        raise EdgesmithError(f"executor ray: RAY_AUTH_MODE={mode} would start a local Ray instance that anyone "
                             "reaching this machine can run code on: unset RAY_AUTH_MODE or set it to token")


def start_ray(address: str | None) -> None:
    """Joins the cluster at `address`, or starts a local instance (with token authentication). No dashboard; Ray's
    own warnings (a thread cannot set its SIGTERM handler, the token's location) say nothing to our users."""
    import ray

    if address is None:
        refuse_unauthenticated_local_ray()
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="error")


class RayInstance:
    """Ray, initialised in this process by a thread of its own; `ready()` waits for it, `release()` stops it (in
    that thread: the caller goes on), `close()` also waits until it has stopped. An instance this process already
    had (a library caller's ray.init) is used and left running."""

    def __init__(self, address: str | None):
        ray = sys.modules.get("ray")   # not imported here: the thread imports it, beside the driver's own imports
        self.address = address
        self.owned = not (ray and ray.is_initialized())
        self._started: Future = Future()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="edgesmith-ray", daemon=True)
        if self.owned:
            self._thread.start()
        else:
            self._started.set_result(None)

    def _hold(self) -> None:
        try:
            start_ray(self.address)
        except BaseException as exc:   # raised in the driver's thread by ready()
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        if self.address is None and not self._released.is_set():   # not for a batch refused meanwhile
            _warm_up_workers()
        self._released.wait()
        _stop_ray()

    def ready(self) -> None:
        self._started.result()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        if self._thread.is_alive():
            self._thread.join()


def _warm_up_workers() -> None:
    """A local instance starts a worker per core: each imports what every job needs now, while the driver orders
    the jobs, rather than when its first job arrives. Not waited for: a job sent meanwhile queues behind it."""
    import ray

    warm_up = ray.remote(_import_job_libraries).options(num_cpus=1)
    for _ in range(int(ray.cluster_resources().get("CPU", 1))):
        warm_up.remote()


def _import_job_libraries() -> None:
    import edgesmith.pipeline.run  # noqa: F401


def _stop_ray() -> None:
    """ray.shutdown, after killing the autoscaler monitor of a local instance: given SIGTERM it outlasts the whole
    second that shutdown waits for each process (1.0 of 1.4 s here; 0.67 s even when stopped before the GCS), and a
    local instance's monitor has nothing to save. Ray has no public handle on its processes."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", ()):
        info.process.kill()
    ray.shutdown()


def start_early(address: str | None) -> None:
    """Called by the command before its own imports; the batch's executor takes the instance (instance_for)."""
    global _early
    if _early is None:
        _early = RayInstance(address)


def instance_for(address: str | None) -> RayInstance:
    """The instance the command started early for this address, else a new one."""
    global _early
    early, _early = _early, None
    if early is not None and early.address == address:
        return early
    if early is not None:
        early.close()
    return RayInstance(address)


def close_early() -> None:
    """Stops an early instance no batch took (the matrix was refused): not left to interpreter exit, where Ray's
    own exit handler would race the thread still starting it."""
    global _early
    early, _early = _early, None
    if early is not None:
        early.close()
