"""The container engine and the project image for the compose tests, started early.

Starting the engine (on a fresh machine: installing it and making base images) and building the image
take minutes, mostly waiting on the network and on disk. When the selection holds compose tests, the
root conftest starts both in the background as soon as collection ends and runs those tests last, so
the build overlaps the rest of the suite (under pytest-xdist they run first on one worker, and the
other worker's tests overlap it); the `stack` fixture then waits for it to finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import REPO

PROJECT = "imgserve-live"
COMPOSE = ["docker", "compose", "-p", PROJECT, "-f", "docker-compose.yml", "-f", "deploy/compose.local.yml"]


class ImageBuild:
    """`scripts/container-engine.sh up` and `docker compose build api demo-init` (the serving image and the
    full one), in one background process group."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="imgserve-build-"))
        self.started = 0.0

    def start(self) -> None:
        if self.proc is not None:
            return
        script = ('set -euo pipefail; bash scripts/container-engine.sh up > "$1"; set -a; '
                  'eval "$(sed "s/^export //" "$1")"; set +a; "${@:2}"; '
                  # the images this build replaced, untagged, would otherwise pile up run after run (3.7 GB each)
                  f'docker image prune -f --filter label=com.docker.compose.project={PROJECT} > /dev/null')
        self.started = time.perf_counter()
        with open(self.dir / "build.log", "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, "build", str(self.dir / "exports"), *COMPOSE,
                                          "--profile", "replicas", "build", "api", "demo-init", "store", "lb"],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout: float) -> tuple[dict[str, str], float]:
        """The engine's environment and how long the build took from its start; fails with the log's tail."""
        self.start()
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        took = time.perf_counter() - self.started
        log = (self.dir / "build.log").read_text(errors="replace")
        assert rc == 0, f"engine or image build failed (exit {rc}):\n{log[-4000:]}"
        env = dict(os.environ)
        for line in (self.dir / "exports").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        return env, took

    def stop(self) -> None:
        """Ends a build still running when the session ends (a failed or interrupted run)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


BUILD = ImageBuild()
