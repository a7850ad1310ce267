"""`make audit`'s verdict: known vulnerabilities fail it; an unreachable database is reported, not passed
silently. pip-audit is replaced by a script printing its JSON format (the data is not reachable here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIPPED = {"name": "numpy", "skip_reason": "Dependency not found on PyPI and could not be audited: numpy (2.0.0)"}
CLEAN = {"name": "numpy", "version": "2.0.0", "vulns": []}
VULN = {"name": "requests", "version": "2.19.0",
        "vulns": [{"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"], "aliases": [], "description": "x"}]}


def run_audit(tmp_path: Path, deps: list[dict[str, object]], *args: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "pip-audit"
    fake.write_text(f"#!{sys.executable}\nprint({json.dumps(json.dumps({'dependencies': deps, 'fixes': []}))})\n")
    fake.chmod(0o755)
    return subprocess.run([sys.executable, "scripts/audit.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={"PIP_AUDIT": str(fake), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize(("deps", "args", "code", "says"), [
    ([CLEAN, VULN], (), 1, "VULNERABLE requests 2.19.0: PYSEC-2018-28 (fixed in 2.20.0)"),
    ([CLEAN, CLEAN], (), 0, "2 audited, 0 with known vulnerabilities"),
    ([SKIPPED, SKIPPED], (), 0, "NOT AUDITED"),
    ([SKIPPED], ("--strict",), 3, "NOT AUDITED"),
    ([SKIPPED, VULN], (), 1, "1 not audited"),
])
def test_audit_verdict(tmp_path: Path, deps: list[dict[str, object]], args: tuple[str, ...], code: int,
                       says: str) -> None:
    r = run_audit(tmp_path, deps, *args)
    assert r.returncode == code, r.stdout + r.stderr
    assert says in r.stdout + r.stderr
