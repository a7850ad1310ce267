"""schemathesis against the service's own OpenAPI document: no 5xx, every status code and content type
declared, and every response body valid against the schema the document gives for it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # schemathesis walks every operation


def test_schemathesis_finds_no_server_error(live: LiveServer) -> None:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    r = subprocess.run([exe, "run", live.url + "/openapi.json", "--checks",
                        "not_a_server_error,status_code_conformance,content_type_conformance,"
                        "response_schema_conformance",
                        "--max-examples", "12", "--request-timeout", "30", "--generation-deterministic"],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert " passed" in out and "failed" not in out.split("SUMMARY")[-1]
