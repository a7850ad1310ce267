"""`make audit`: every locked version checked for known vulnerabilities, with an honest verdict.

Two sources, merged:
- an offline snapshot of the PyPA advisory database (OSV YAML, one file per advisory under
  `vulns/<package>/`; `../shared/advisories/pypa` here), read with packaging's version rules. Its date
  is printed with every run: advisories published after it are not covered.
- pip-audit's online services (PyPI's JSON API, OSV) where they answer; on a machine with no route to
  them this is said, and the snapshot stands alone.

Exit codes: 0 when every finding is allowlisted; 1 when one is not (or an allowlist entry has expired);
2 for a bad lock or allowlist; 3 when nothing could be audited (no snapshot and no online answer):
"not audited" is a failure, never a pass.

The allowlist (`audit-allowlist.toml`) names each accepted finding with a reason and an expiry date:

    [[ignore]]
    id = "PYSEC-2024-0"          # or any alias (CVE-..., GHSA-...)
    package = "somepackage"
    reason = "why it does not apply here"
    expires = 2027-03-01
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Finding:
    package: str
    version: str
    id: str
    aliases: set[str] = field(default_factory=set)
    fixed: list[str] = field(default_factory=list)
    source: str = "snapshot"
    allowed_by: dict[str, Any] | None = None

    def names(self) -> set[str]:
        return {self.id, *self.aliases}


def read_lock(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (comments, options and blank lines skipped)."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^;\s]+)(\s*;.*)?", line)
        if not m:
            raise ValueError(f"{path}:{n}: not a pinned requirement: {raw!r}")
        pins[m.group(1)] = m.group(3)
    return pins


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def affects(affected: dict[str, Any], version: Version) -> tuple[bool, list[str]]:
    """Whether one OSV `affected` entry covers `version`, and the versions that fix it after `version`."""
    listed = {v for v in (_version(str(x)) for x in affected.get("versions") or []) if v is not None}
    hit = version in listed
    fixes: list[str] = []
    for rng in affected.get("ranges") or []:
        if rng.get("type") != "ECOSYSTEM":
            continue  # GIT ranges name commits, not releases
        events = []
        for ev in rng.get("events") or []:
            (kind, value), = ev.items()
            at = Version("0") if str(value) == "0" else _version(str(value))
            if at is not None:
                events.append((at, kind, str(value)))
        inside = False
        for at, kind, _ in sorted(events, key=lambda e: e[0]):
            if kind == "introduced" and at <= version:
                inside = True
            elif kind == "fixed" and at <= version or kind == "last_affected" and at < version:
                inside = False
        hit = hit or inside
        fixes += [value for at, kind, value in events if kind == "fixed" and at > version]
    return hit, sorted(set(fixes), key=Version)


class Snapshot:
    """The PyPA advisory database, read in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        vulns = root / "vulns"
        self.dirs = {canonicalize_name(p.name): p for p in vulns.iterdir() if p.is_dir()} if vulns.is_dir() else {}

    @property
    def usable(self) -> bool:
        return bool(self.dirs)

    def date(self) -> str:
        """The snapshot's date as its README states it, else the newest advisory change read."""
        for readme in (self.root / "README.md", self.root.parent / "README.md"):
            if readme.is_file():
                m = re.search(r"\b(\d{4}-\d{2}-\d{2})\b", readme.read_text())
                if m:
                    return m.group(1)
        return "an unknown date"

    def findings(self, name: str, version: str) -> list[Finding]:
        folder = self.dirs.get(canonicalize_name(name))
        ver = _version(version)
        if folder is None or ver is None:
            return []
        out = []
        wanted = canonicalize_name(name)
        for path in sorted(folder.glob("*.yaml")):
            doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            if not isinstance(doc, dict) or doc.get("withdrawn"):
                continue
            fixed: list[str] = []
            hit = False
            for aff in doc.get("affected") or []:
                pkg = aff.get("package") or {}
                if pkg.get("ecosystem") != "PyPI" or canonicalize_name(str(pkg.get("name", ""))) != wanted:
                    continue
                a_hit, a_fixed = affects(aff, ver)
                if a_hit:
                    hit = True
                    fixed += a_fixed
            if hit:
                out.append(Finding(name, version, str(doc["id"]), set(map(str, doc.get("aliases") or [])),
                                   sorted(set(fixed), key=Version)))
        return out


def online(lock: Path, tool: str) -> tuple[list[Finding] | None, str]:
    """pip-audit's findings on the lock, or None and why when its services did not answer."""
    try:
        out = subprocess.run([tool, "-r", str(lock), "--no-deps", "--disable-pip", "--progress-spinner", "off",
                              "-f", "json"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"pip-audit did not run: {e}"
    try:
        deps = json.loads(out.stdout)["dependencies"]
    except (json.JSONDecodeError, KeyError):
        return None, f"pip-audit failed (exit {out.returncode}): {out.stderr.strip()[-300:]}"
    audited = [d for d in deps if "skip_reason" not in d]
    if not audited:
        reason = deps[0]["skip_reason"] if deps else "no dependencies listed"
        return None, f"not reachable ({reason})"
    found = [Finding(d["name"], d["version"], v["id"], set(v.get("aliases") or []), list(v.get("fix_versions") or []),
                     "pip-audit") for d in audited for v in d.get("vulns") or []]
    return found, f"{len(audited)} of {len(deps)} audited online"


def read_allowlist(path: Path, today: dt.date) -> tuple[list[dict[str, Any]], list[str]]:
    """The valid entries, and the problems that fail the audit (missing fields, expired entries: such an
    entry allowlists nothing)."""
    if not path.is_file():
        return [], []
    valid, problems = [], []
    for e in tomllib.loads(path.read_text()).get("ignore", []):
        missing = [k for k in ("id", "package", "reason", "expires") if not e.get(k)]
        if missing:
            problems.append(f"allowlist entry {e!r} lacks {', '.join(missing)}")
        elif not isinstance(e["expires"], dt.date):
            problems.append(f"allowlist entry {e['id']}: expires must be a date (YYYY-MM-DD), not {e['expires']!r}")
        elif e["expires"] < today:
            problems.append(f"allowlist entry {e['id']} ({e['package']}) expired on {e['expires']}: "
                            "fix it or renew the entry with a reason")
        else:
            valid.append(e)
    return valid, problems


def merge(findings: list[Finding]) -> list[Finding]:
    """One finding per advisory and package: the same advisory from both sources under another id is one."""
    out: list[Finding] = []
    for f in findings:
        same = next((g for g in out if canonicalize_name(g.package) == canonicalize_name(f.package)
                     and g.names() & f.names()), None)
        if same is None:
            out.append(f)
        else:
            same.aliases |= f.names() - {same.id}
            same.fixed = sorted(set(same.fixed) | set(f.fixed), key=lambda v: _version(v) or Version("0"))
            if f.source not in same.source:
                same.source += "+" + f.source
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    ap.add_argument("--advisories", type=Path, default=REPO.parent / "shared" / "advisories" / "pypa",
                    help="the PyPA advisory database snapshot (a folder holding vulns/)")
    ap.add_argument("--allowlist", type=Path, default=REPO / "audit-allowlist.toml")
    ap.add_argument("--online", choices=("auto", "no"), default="auto",
                    help="also ask pip-audit's online services (auto: where they answer)")
    ap.add_argument("--today", type=dt.date.fromisoformat, default=dt.date.today(), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    try:
        pins = read_lock(args.lock)
        allow, problems = read_allowlist(args.allowlist, args.today)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    snap = Snapshot(args.advisories)
    findings: list[Finding] = []
    if snap.usable:
        for name, version in pins.items():
            findings += snap.findings(name, version)
        print(f"snapshot: {len(pins)} locked packages checked against the PyPA advisory database of {snap.date()} "
              f"({args.advisories}); advisories published after that date are not covered")
    else:
        print(f"snapshot: no advisory database at {args.advisories} (expected vulns/<package>/*.yaml)")
    online_found: list[Finding] | None = None
    if args.online == "auto":
        online_found, said = online(args.lock, os.environ.get("PIP_AUDIT", str(BIN / "pip-audit")))
        print(f"online: pip-audit {said}")
        findings += online_found or []
    if not snap.usable and online_found is None:
        print("NOT AUDITED: neither the advisory snapshot nor pip-audit's online services could be read; "
              "this is a failure, not a pass", file=sys.stderr)
        return 3

    findings = merge(findings)
    for f in findings:
        f.allowed_by = next((e for e in allow if canonicalize_name(str(e.get("package", ""))) ==
                             canonicalize_name(f.package) and e.get("id") in f.names()), None)
        fixed = f"fixed in {', '.join(f.fixed)}" if f.fixed else "no fixed version"
        aliases = f" ({', '.join(sorted(f.aliases))})" if f.aliases else ""
        verdict = (f"ALLOWLISTED until {f.allowed_by['expires']}: {f.allowed_by['reason']}" if f.allowed_by
                   else "VULNERABLE")
        print(f"{verdict}: {f.package} {f.version}: {f.id}{aliases}, {fixed} [{f.source}]")
    used = {e.get("id") for f in findings if f.allowed_by for e in [f.allowed_by]}
    for e in allow:
        if e.get("id") not in used:
            print(f"note: allowlist entry {e.get('id')} ({e.get('package')}) matches no finding; remove it")
    for p in problems:
        print(f"ALLOWLIST: {p}")
    open_ = [f for f in findings if f.allowed_by is None]
    print(f"audit: {len(pins)} packages audited, {len(findings)} findings, {len(findings) - len(open_)} allowlisted, "
          f"{len(open_)} open (snapshot of {snap.date() if snap.usable else 'none'})")
    return 1 if open_ or problems else 0


if __name__ == "__main__":
    sys.exit(main())
