"""bench.soak's account of where the cores went during an overload."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.harness import cpu_seconds
from bench.soak import CpuSplit


def test_cpu_split_tells_server_from_client() -> None:
    """A spinning 'server' (not reaped) counts as the server's, a spinning child that exits and is
    reaped counts as the client's, and the parts plus idle add up to the machine's cores."""
    spin = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"]
    server = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        split = CpuSplit(lambda: cpu_seconds(server.pid))
        split.start()
        subprocess.run(spin, check=True)  # the "load generator", reaped before stop()
        time.sleep(0.3)
        out = split.stop()
    finally:
        server.kill()
        server.wait()
    assert out["client_cores"] > 0.5 * 1.5 / out["seconds"], out
    assert out["server_cores"] > 0.3, out
    total = out["server_cores"] + out["client_cores"] + out["bench_cores"] + out["other_cores"] + out["idle_cores"]
    assert abs(total - out["cores"]) < 0.25 * out["cores"], out
