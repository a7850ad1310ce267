"""Several server processes behind one port: the supervisor that runs them, and the board on which
each process posts its state so that any of them can answer for all (readiness, versions).

The supervisor binds the listening socket once and starts `IMGSERVE_WORKERS` copies of the service,
each inheriting it; the kernel hands each new connection to one of them. Every process loads the
models itself, batches its own rows and polls the store, so a new version reaches every process
within `IMGSERVE_POLL_INTERVAL_S`. Metrics go through prometheus-client's multiprocess mode (one
directory of memory-mapped files, summed at scrape time). SIGTERM to the supervisor drains every
process; a process that dies on its own is started again; when the supervisor is killed, the kernel
kills the processes too (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger("service.workers")

# What the supervisor tells each process it starts (not settings: users do not set these).
FD_ENV = "IMGSERVE_WORKER_FD"
INDEX_ENV = "IMGSERVE_WORKER_INDEX"
DIR_ENV = "IMGSERVE_WORKER_DIR"
COUNT_ENV = "IMGSERVE_WORKER_COUNT"
RESTART_ENV = "IMGSERVE_WORKER_RESTART"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_S = 1.0
STALE_S = 10.0  # a process whose post is older than this is stuck (its event loop does not run)


@dataclass(frozen=True)
class WorkerSlot:
    """Who this process is among the supervisor's processes."""

    index: int
    count: int
    board_dir: Path
    restarted: bool = False  # started again after a crash: load before taking connections from the others

    @classmethod
    def from_env(cls) -> WorkerSlot | None:
        if INDEX_ENV not in os.environ:
            return None
        return cls(int(os.environ[INDEX_ENV]), int(os.environ[COUNT_ENV]), Path(os.environ[DIR_ENV]),
                   os.environ.get(RESTART_ENV) == "1")


@dataclass
class WorkerState:
    """One process's post on the board."""

    index: int
    pid: int
    ready: bool = False
    draining: bool = False
    reason: str = "starting"
    models: dict[str, int] = field(default_factory=dict)
    posted: float = 0.0


class Board:
    """Each process writes its own state file (atomically, on every change and every second) and
    reads the others'."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot

    def _path(self, index: int) -> Path:
        return self.slot.board_dir / f"worker-{index}.json"

    def post(self, state: WorkerState) -> None:
        state.posted = time.time()
        tmp = self._path(state.index).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(self._path(state.index))

    def read(self, index: int) -> WorkerState | None:
        try:
            return WorkerState(**json.loads(self._path(index).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def others_not_ready(self) -> str | None:
        """Why some other process cannot serve, or None when every one can."""
        for index in range(self.slot.count):
            if index == self.slot.index:
                continue
            problem = self._problem(index, self.read(index))
            if problem:
                return f"server process {index + 1} of {self.slot.count}: {problem}"
        return None

    def states(self) -> list[WorkerState | None]:
        return [self.read(i) for i in range(self.slot.count)]

    @staticmethod
    def _problem(index: int, state: WorkerState | None) -> str | None:
        if state is None or not pid_alive(state.pid):
            return "starting"
        if time.time() - state.posted > STALE_S:
            return f"has not answered for {time.time() - state.posted:.0f} s"
        if state.draining:
            return "draining for shutdown"
        if not state.ready:
            return state.reason
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGKILL when the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Supervisor:
    """Binds the port, runs `count` server processes on it, restarts one that dies, drains all on SIGTERM."""

    RESTART_DELAY_S = 1.0

    def __init__(self, host: str, port: int, count: int, stop_timeout_s: float, grpc_port: int = 0) -> None:
        self.host, self.port, self.count, self.grpc_port = host, port, count, grpc_port
        self.stop_timeout_s = stop_timeout_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.exit_codes: dict[int, int] = {}
        self.sock: socket.socket | None = None

    def run(self) -> int:
        board_dir = Path(tempfile.mkdtemp(prefix="imgserve-"))
        metrics_dir = board_dir / "metrics"
        metrics_dir.mkdir()
        try:
            sock = socket.create_server((self.host, self.port), backlog=4096,
                                        family=socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        except OSError as exc:
            print(f"cannot listen on {self.host}:{self.port}: {exc}", file=sys.stderr)
            shutil.rmtree(board_dir, ignore_errors=True)
            return 1
        if self.grpc_port and not self._free(self.grpc_port):
            sock.close()
            shutil.rmtree(board_dir, ignore_errors=True)
            return 1
        sock.set_inheritable(True)
        self.sock = sock
        env = {**os.environ, FD_ENV: str(sock.fileno()), DIR_ENV: str(board_dir), COUNT_ENV: str(self.count),
               METRICS_ENV: str(metrics_dir)}
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        logger.info("listening on %s:%d with %d server processes", self.host, self.port, self.count)
        try:
            for index in range(self.count):
                self._start(index, env)
            self._watch(env, metrics_dir)
        finally:
            if self.sock is not None:
                self.sock.close()
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
            shutil.rmtree(board_dir, ignore_errors=True)
        failed = {i: c for i, c in self.exit_codes.items() if c != 0}
        if failed:
            logger.error("server processes exited with %s", failed)
        return 1 if failed else 0

    def _free(self, port: int) -> bool:
        """The processes bind the gRPC port each (SO_REUSEPORT shares it among them): first make sure that
        nothing else holds it, which SO_REUSEPORT would otherwise let them share with."""
        try:
            socket.create_server((self.host, port), family=socket.AF_INET6 if ":" in self.host else socket.AF_INET
                                 ).close()
        except OSError as exc:
            print(f"cannot listen for gRPC on {self.host}:{port}: {exc}", file=sys.stderr)
            return False
        return True

    def _start(self, index: int, env: dict[str, str]) -> None:
        restart = "1" if index in self.procs else "0"
        proc = subprocess.Popen([sys.executable, "-m", "service"],
                                env={**env, INDEX_ENV: str(index), RESTART_ENV: restart},
                                pass_fds=(int(env[FD_ENV]),), preexec_fn=_die_with_parent)
        self.procs[index] = proc
        logger.info("server process %d of %d: pid %d", index + 1, self.count, proc.pid)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if not self.stopping:
            logger.info("signal %d: draining %d server processes", sig, self.count)
        self.stopping = True
        if self.sock is not None:
            # No restarts from here on: let the listener close when the last process closes it, so that a
            # connection arriving after the drain began is refused instead of queued and then reset.
            self.sock.close()
            self.sock = None
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _watch(self, env: dict[str, str], metrics_dir: Path) -> None:
        from prometheus_client import multiprocess

        deadline: float | None = None
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.stop_timeout_s
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or index in self.exit_codes:
                    continue
                multiprocess.mark_process_dead(proc.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                if self.stopping:
                    self.exit_codes[index] = code
                    continue
                logger.error("server process %d (pid %d) exited with %d; starting it again", index + 1, proc.pid,
                             code)
                time.sleep(self.RESTART_DELAY_S)
                self._start(index, env)
            if self.stopping and len(self.exit_codes) == len(self.procs):
                return
            if deadline is not None and time.monotonic() > deadline:
                logger.error("server processes still running %.0f s after SIGTERM: killing them", self.stop_timeout_s)
                for index, proc in self.procs.items():
                    if index not in self.exit_codes:
                        proc.kill()
                        self.exit_codes[index] = proc.wait()
                return
            time.sleep(0.1)


def listening_socket() -> socket.socket | None:
    """In a server process: the socket the supervisor bound, or None when running alone."""
    fd = os.environ.get(FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


def rss_bytes() -> int:
    """This process's resident memory, from /proc (0 where it cannot be read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def describe(states: Sequence[WorkerState | None]) -> list[dict[str, Any]]:
    """The board as /health/ready shows it."""
    return [{"index": i, "pid": s.pid, "ready": s.ready and not s.draining, "models": s.models}
            if s is not None else {"index": i, "ready": False} for i, s in enumerate(states)]
