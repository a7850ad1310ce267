"""`make audit`: pip-audit on the locked versions, with an honest verdict.

Fails (exit 1) when any locked version has a known vulnerability. pip-audit alone exits 0 when it
could audit nothing (no route to the vulnerability data: PyPI's JSON API or OSV), which would read as
a pass; this says so loudly instead and exits 0 only because an unreachable database is not a
finding (exit 3 with --strict, for pipelines that have the network and must not skip it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> int:
    strict = "--strict" in sys.argv
    tool = os.environ.get("PIP_AUDIT", str(BIN / "pip-audit"))
    out = subprocess.run([tool, "-r", "requirements.lock", "--no-deps", "--disable-pip", "--progress-spinner", "off",
                          "-f", "json"], capture_output=True, text=True)
    try:
        deps = json.loads(out.stdout)["dependencies"]
    except (json.JSONDecodeError, KeyError):
        print(f"pip-audit failed (exit {out.returncode}):\n{out.stderr[-2000:]}", file=sys.stderr)
        return 2
    audited = [d for d in deps if "skip_reason" not in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    for d in vulnerable:
        ids = ", ".join(v["id"] + (f" (fixed in {', '.join(v['fix_versions'])})" if v.get("fix_versions") else "")
                        for v in d["vulns"])
        print(f"VULNERABLE {d['name']} {d['version']}: {ids}")
    print(f"pip-audit: {len(deps)} locked packages, {len(audited)} audited, {len(vulnerable)} with known "
          f"vulnerabilities, {len(deps) - len(audited)} not audited")
    if vulnerable:
        return 1
    if not audited:
        reason = deps[0]["skip_reason"] if deps else "no dependencies listed"
        print(f"NOT AUDITED: no vulnerability data was reachable from this machine ({reason}). "
              "Run `make audit` where pypi.org or osv.dev is reachable.", file=sys.stderr)
        return 3 if strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
