"""Settings: every one an IMGSERVE_ environment variable, validated at start, with keys also from files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings, usable_cores
from tests.support import REPO


def test_list_and_map_settings_are_typed() -> None:
    s = Settings(models="a, b,,c", pinned_versions="m=3, n=1", warmup_batch_sizes="1,8", cors_origins="")
    assert s.models == ["a", "b", "c"] and s.pinned_versions == {"m": 3, "n": 1}
    assert s.warmup_batch_sizes == [1, 8] and s.cors_origins == []
    assert s.batching.warmup_sizes == (1, 8)
    for bad in ({"pinned_versions": "m"}, {"pinned_versions": "m=0"}, {"warmup_batch_sizes": "1,x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(**bad)


def test_the_inflight_limit_defaults_to_twice_the_queue_rows() -> None:
    # a request holds its slot while read, decoded and answered, not only while queued (Settings.inflight_limit)
    assert Settings(max_queue_rows=16).inflight_limit == 32
    assert Settings(max_queue_rows=16, max_inflight_requests=5).inflight_limit == 5


def test_settings_come_from_imgserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("IMGSERVE_FLUSH_WHEN_IDLE", "false")
    monkeypatch.setenv("MAX_BATCH_SIZE", "99")  # no prefix: not ours
    s = Settings.load()
    assert s.max_batch_size == 7 and s.flush_when_idle is False


def test_keys_come_from_a_secrets_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "imgserve_api_key").write_text("from-a-file\n")
    (tmp_path / "imgserve_admin_api_key").write_text("admin-file")
    monkeypatch.setenv("IMGSERVE_SECRETS_DIR", str(tmp_path))
    s = Settings.load()
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-a-file"
    assert s.admin_api_key is not None and s.admin_api_key.get_secret_value() == "admin-file"
    assert "from-a-file" not in repr(s) and "from-a-file" not in str(s.model_dump())  # secret in logs and dumps
    monkeypatch.setenv("IMGSERVE_API_KEY", "from-the-env")  # the environment wins over the file
    assert Settings.load().api_key.get_secret_value() == "from-the-env"  # type: ignore[union-attr]


def test_threads_and_processes_share_the_cores() -> None:
    cores = usable_cores()
    one = Settings(workers="1")
    assert one.process_count == 1 and one.decode_workers == cores and one.model_threads == 0  # the runtime decides
    two = Settings(workers="2")
    assert two.cores_per_process == max(1, cores // 2) and two.model_threads == two.cores_per_process
    assert Settings(workers="auto").process_count == cores
    pinned = Settings(workers="2", intra_op_threads=3, decode_threads=5)
    assert pinned.model_threads == 3 and pinned.decode_workers == 5


@pytest.mark.parametrize(("env", "names"), [
    ({"IMGSERVE_MAX_BATCH_SIZE": "zero"}, "max_batch_size"),
    ({"IMGSERVE_PORT": "70000"}, "port"),
    ({"IMGSERVE_REQUEST_TIMEOUT_MS": "9000", "IMGSERVE_MAX_REQUEST_TIMEOUT_MS": "5000"}, "max_request_timeout_ms"),
    ({"IMGSERVE_LOG_LEVEL": "LOUD"}, "log_level"),
])
def test_a_bad_value_stops_the_service_naming_it(env: dict[str, str], names: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "IMGSERVE_MODEL_STORE": str(tmp_path), **env})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "invalid settings" in r.stderr and names in r.stderr
