"""Content-addressed stage outputs with atomic commits.

A stage's key hashes its input artifact's key, its config and the tool versions. Its output is built in a
private temporary folder and renamed into place only when complete (rename is atomic on one filesystem),
so a run killed at any point leaves either a whole artifact or none, and the next run resumes from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edgesmith.targets.bundle_files.edgesmith_runtime import file_sha256

SIDECAR = "sidecar.json"
_TMP_PREFIX = ".tmp-"


def content_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key[:20]}"

    def get(self, kind: str, key: str) -> Path | None:
        """The committed artifact for (kind, key), or None. Only complete artifacts have a sidecar."""
        path = self.path(kind, key)
        return path if (path / SIDECAR).is_file() else None

    def discard(self, kind: str, key: str) -> None:
        shutil.rmtree(self.path(kind, key), ignore_errors=True)

    def sidecar(self, artifact: Path) -> dict:
        return json.loads((artifact / SIDECAR).read_text())

    @contextmanager
    def build(self, kind: str, key: str, sidecar: dict) -> Iterator[Path]:
        """Yields an empty folder to write into; on success hashes its files, writes the sidecar and commits.

        `sidecar` may be filled in (metrics) by the caller while building.
        """
        final = self.path(kind, key)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        started = time.time()
        try:
            yield tmp
            sidecar.setdefault("kind", kind)
            sidecar["key"] = key
            sidecar["seconds"] = round(time.time() - started, 3)
            sidecar["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / SIDECAR, sidecar)
            if final.exists():  # another run committed the same key first; keep that one
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def sweep_stale(self, older_than_s: float = 3600) -> None:
        """Removes temporary folders left by killed runs (SIGKILL skips every cleanup handler)."""
        now = time.time()
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if not _pid_alive(pid) or now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(artifact: Path, dest: Path) -> None:
    """Places a cached artifact into the run folder: hard links where possible (no copy), else a copy."""
    tmp = dest.with_name(f"{_TMP_PREFIX}{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src in artifact.iterdir():
        try:
            os.link(src, tmp / src.name)
        except OSError:
            shutil.copy2(src, tmp / src.name)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
