"""`make audit` against the real PyPA advisory snapshot in ../shared (no network): a lock holding a
known-vulnerable version fails with the advisory's id and fixed version, an allowlisted finding passes
until its entry expires, and "nothing could be audited" is a failure. pip-audit's online side is
replaced by a script printing its JSON format where a test needs it to answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, SHARED

ADVISORIES = SHARED / "advisories" / "pypa"
OFFLINE = "PYSEC-2018-28"  # requests < 2.20.0 sends the Authorization header across a redirect
LATER = "PYSEC-2023-74"  # requests < 2.31.0 leaks Proxy-Authorization to the destination


def audit(tmp_path: Path, lock: str, *args: str, allowlist: str = "", online: list[dict[str, object]] | None = None,
          advisories: Path = ADVISORIES) -> subprocess.CompletedProcess[str]:
    (tmp_path / "requirements.lock").write_text(lock)
    (tmp_path / "allow.toml").write_text(allowlist)
    fake = tmp_path / "pip-audit"
    deps = online if online is not None else [{"name": "x", "skip_reason": "Dependency not found on PyPI"}]
    fake.write_text(f"#!{sys.executable}\nprint({json.dumps(json.dumps({'dependencies': deps, 'fixes': []}))})\n")
    fake.chmod(0o755)
    return subprocess.run([sys.executable, "scripts/audit.py", "--lock", str(tmp_path / "requirements.lock"),
                           "--allowlist", str(tmp_path / "allow.toml"), "--advisories", str(advisories),
                           "--today", "2026-12-06", *args],
                          cwd=REPO, capture_output=True, text=True, env={"PIP_AUDIT": str(fake), "PATH": "/usr/bin:/bin"},
                          timeout=120)


def allow(id_: str, package: str, expires: str) -> str:
    return f'[[ignore]]\nid = "{id_}"\npackage = "{package}"\nreason = "not reachable here"\nexpires = {expires}\n'


def test_a_known_vulnerable_version_fails_with_its_id_and_fixed_version(tmp_path: Path) -> None:
    r = audit(tmp_path, "numpy==2.4.6\nrequests==2.19.0\n")
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("VULNERABLE: requests 2.19.0"))
    assert OFFLINE in line and "CVE-2018-18074" in line and "fixed in 2.20.0" in line
    assert "PyPA advisory database of 2024-10-10" in r.stdout
    assert any(x.startswith("VULNERABLE: requests 2.19.0") and LATER in x and "fixed in 2.31.0" in x
               for x in r.stdout.splitlines())
    assert "2 packages audited, 2 findings, 0 allowlisted, 2 open" in r.stdout
    assert "numpy" not in "".join(x for x in r.stdout.splitlines() if x.startswith("VULNERABLE"))


def test_ranges_with_several_introduced_and_fixed_events(tmp_path: Path) -> None:
    # PYSEC-2014-10: pillow before 2.3.2, and 2.5.x before 2.5.2 (2.4.0 lies between the two ranges)
    r = audit(tmp_path, "pillow==2.5.1\n")
    assert "PYSEC-2014-10" in r.stdout and "fixed in 2.5.2" in r.stdout, r.stdout
    r = audit(tmp_path, "pillow==2.4.0\n")
    assert "PYSEC-2014-10" not in r.stdout


def test_the_project_lock_is_clean_or_allowlisted() -> None:
    r = subprocess.run([sys.executable, "scripts/audit.py", "--advisories", str(ADVISORIES), "--online", "no"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    locked = sum(1 for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line)
    assert f"{locked} packages audited" in r.stdout


def test_an_allowlisted_finding_passes_until_its_entry_expires(tmp_path: Path) -> None:
    both = allow(OFFLINE, "requests", "2027-01-31") + allow(LATER, "requests", "2027-01-31")
    r = audit(tmp_path, "requests==2.19.0\n", allowlist=allow(OFFLINE, "requests", "2027-01-31"))
    assert r.returncode == 1 and "2 findings, 1 allowlisted, 1 open" in r.stdout  # the other one is still open
    r = audit(tmp_path, "requests==2.19.0\n", allowlist=both)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALLOWLISTED until 2027-01-31: not reachable here: requests 2.19.0: PYSEC-2018-28" in r.stdout
    assert "2 findings, 2 allowlisted, 0 open" in r.stdout
    r = audit(tmp_path, "requests==2.19.0\n", allowlist=both.replace("2027-01-31", "2026-12-05", 1))
    assert r.returncode == 1 and "expired on 2026-12-05" in r.stdout


def test_an_allowlist_entry_needs_a_reason_and_a_date(tmp_path: Path) -> None:
    r = audit(tmp_path, "requests==2.19.0\n", allowlist=f'[[ignore]]\nid = "{OFFLINE}"\npackage = "requests"\n')
    assert r.returncode == 1 and "lacks reason, expires" in r.stdout


def test_nothing_audited_is_a_failure(tmp_path: Path) -> None:
    r = audit(tmp_path, "requests==2.32.0\n", advisories=tmp_path / "nowhere")
    assert r.returncode == 3 and "NOT AUDITED" in r.stderr


def test_online_findings_count_and_merge_with_the_snapshot(tmp_path: Path) -> None:
    online = [{"name": "requests", "version": "2.19.0", "vulns": [
        {"id": "GHSA-x84v-xcm2-53pg", "aliases": [OFFLINE, "CVE-2018-18074"], "fix_versions": ["2.20.0"]}]},
        {"name": "somepkg", "version": "1.0", "vulns": [{"id": "GHSA-aaaa-bbbb-cccc", "aliases": [],
                                                          "fix_versions": []}]}]
    r = audit(tmp_path, "requests==2.19.0\nsomepkg==1.0\n", online=online)
    assert r.returncode == 1
    assert "3 findings" in r.stdout  # the same advisory from both sources is one finding
    assert "somepkg 1.0: GHSA-aaaa-bbbb-cccc, no fixed version [pip-audit]" in r.stdout
    assert "[snapshot+pip-audit]" in r.stdout


def test_a_bad_lock_line_is_an_error_not_a_pass(tmp_path: Path) -> None:
    r = audit(tmp_path, "requests>=2\n")
    assert r.returncode == 2 and "not a pinned requirement" in r.stderr
