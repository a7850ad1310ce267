"""What benchmarks and end-to-end tests share: a real `python -m service` process on a free loopback
port, its resident memory, and its Prometheus metrics read with prometheus_client's own parser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGSERVE_SHARED", REPO.parent / "shared"))
DEFAULT_IMAGES = SHARED / "datasets" / "clothing-small" / "validation"


def service_env(**extra: str) -> dict[str, str]:
    """This process's environment with the TensorFlow defaults the Makefile sets."""
    env = dict(os.environ)
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return {**env, **extra}


def cpu_model() -> str:
    """The CPU's model name, for benchmark results."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor and its workers), from /proc."""
    out = [pid]
    for child in _children(pid):
        out += process_tree(child)
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # the process is gone
        pass
    return kids


def cpu_seconds(pid: int, main_thread_only: bool = False) -> float:
    """User plus system CPU time of one process and its threads so far, from /proc/<pid>/stat; with
    `main_thread_only`, of its main thread alone (the service's event loop), from /proc/<pid>/task/<pid>/stat."""
    try:
        stat = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample called `name` whose labels include `labels`, in Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


PORT_TAKEN = ("Address already in use", "address already in use", "Failed to bind")


class ServerProcess:
    """`python -m service` on 127.0.0.1 and free ports (HTTP and gRPC), returned once /health/ready answers
    200. A port found free can be taken by another process before the server binds it (a client's ephemeral
    port, on a busy machine): the server then exits saying so, and is started again on other ports."""

    def __init__(self, store: Path, log: Path, *, ready_timeout: float = 120, code: Path = REPO,
                 **settings: str) -> None:
        self.log = log
        t0 = time.perf_counter()
        for attempt in range(3):
            try:
                self._start(store, code, ready_timeout, attempt, dict(settings))
                break
            except RuntimeError as exc:
                if attempt == 2 or not any(words in str(exc) for words in PORT_TAKEN):
                    raise
                self.log.rename(self.log.with_name(f"{self.log.stem}-port-taken-{attempt + 1}.log"))
        self.startup_s = time.perf_counter() - t0
        self.rss_after_warmup = self.rss()

    def _start(self, store: Path, code: Path, ready_timeout: float, attempt: int, settings: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        asked = settings.get("IMGSERVE_GRPC_PORT")
        if asked != "0" and (asked is None or attempt):  # "0": gRPC off; a port asked for is kept at first
            settings["IMGSERVE_GRPC_PORT"] = str(free_port())
        self.grpc_port = int(settings["IMGSERVE_GRPC_PORT"])
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        env = service_env(**{"IMGSERVE_HOST": "127.0.0.1", "IMGSERVE_PORT": str(self.port),
                             "IMGSERVE_MODEL_STORE": str(store.resolve()), **settings})  # cwd may be `code`
        with open(self.log, "wb") as fh:
            own = code / ".venv" / "bin" / "python"  # a checkout with its own venv runs with it (its own pins)
            python = str(own) if code != REPO and own.exists() else sys.executable
            self.proc = subprocess.Popen([python, "-m", "service"], cwd=code, env=env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def rss(self) -> int:
        """Resident memory of the server: every process of it (a supervisor and its workers)."""
        return sum(rss_bytes(p) for p in self.pids())

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def workers(self) -> list[int]:
        """The processes that serve requests: the workers under a supervisor, else the one process."""
        return self.pids()[1:] or [self.proc.pid]

    def cpu_seconds(self, main_thread_only: bool = False) -> float:
        return sum(cpu_seconds(p, main_thread_only) for p in self.pids())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` (SIGTERM: drain) and wait; a server that outlives `timeout` is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def write_result(kind: str, doc: dict[str, object]) -> Path:
    """bench/results/<stamp>-<kind>.json, and the document printed."""
    import json

    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
