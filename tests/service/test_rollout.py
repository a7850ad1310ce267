"""The rollout state (service/rollout.py): what it decides, the commands that change it, the file that
holds it, and the operator command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service import rollout
from service.rollout import Candidate, RolloutError, RolloutState, apply, plan
from tests.support import LABELS, REPO, write_fake_version


def cmp(acc: float, base: float, against: int = 1) -> dict[str, Any]:
    return {"accuracy": acc, "baseline_accuracy": base, "baseline_version": against, "test_images": 200}


def test_with_no_state_the_newest_version_within_the_budget_is_stable() -> None:
    versions = [Candidate(1, 0.80), Candidate(2, 0.82, cmp(0.82, 0.80)), Candidate(3, 0.70, cmp(0.70, 0.82, 2))]
    p = plan(None, versions, max_drop_points=1.0)
    assert p.stable == 2 and set(p.held) == {3}
    assert "held by the gate" in p.held[3] and "12.00 points lower" in p.held[3]
    assert "within the 1-point budget" in p.notes[2]
    assert plan(None, versions, 1.0, default_mode="immediate").stable == 3
    assert plan(None, versions, max_drop_points=15).stable == 3  # a wider budget admits it
    # a version with no comparison (another tool published it) is promoted, and says it was not compared
    p = plan(None, [Candidate(1), Candidate(2)], 1.0)
    assert p.stable == 2 and "not compared" in p.notes[2]


def test_the_state_names_stable_canary_shadow_and_holds() -> None:
    versions = [Candidate(v) for v in (1, 2, 3, 4)]
    st = RolloutState(stable=2, canary=3, canary_percent=10, shadow=4, shadow_percent=100, held={1: "bad"},
                      labels={"previous": 1})
    p = plan(st, versions, 1.0)
    assert (p.stable, p.canary, p.canary_percent, p.shadow, p.shadow_percent) == (2, 3, 10, 4, 100)
    assert p.roles() == {2: "stable", 3: "canary", 4: "shadow"} and p.needed() == [2, 3, 4, 1]
    # a version newer than any the state names is new: the mode decides; a named one that is gone is dropped
    p = plan(st, [*versions[:2], Candidate(5)], 1.0)
    assert p.stable == 5 and p.canary is None and p.shadow is None and p.labels == {"previous": 1}


@pytest.mark.parametrize(("command", "args", "error"), [
    ("canary", {"percent": 101}, "0 to 100"),
    ("canary", {"percent": -1}, "0 to 100"),
    ("canary", {"percent": "ten"}, "0 to 100"),
    ("shadow", {"percent": 10, "version": 9}, "not a complete version"),
    ("promote", {"version": "x"}, "positive integer"),
    ("hold", {"version": 2}, "is stable"),
    ("mode", {"mode": "yolo"}, "unknown rollout mode"),
    ("label", {"label": "Bad Label", "version": 1}, "invalid label"),
    ("label", {"label": "canary", "version": 1}, "invalid label"),
    ("release", {"version": 1}, "not held"),
    ("launch", {}, "unknown command"),
])
def test_a_bad_command_is_refused_and_changes_nothing(command: str, args: dict[str, Any], error: str) -> None:
    st = RolloutState(stable=2, seen=2)
    before = st.to_json()
    with pytest.raises(RolloutError, match=error):
        apply(st, [Candidate(1), Candidate(2)], command, args, 1.0)
    assert st.to_json() == before


def test_canary_promote_and_rollback() -> None:
    versions = [Candidate(v) for v in (1, 2, 3)]
    st, ev = apply(RolloutState(stable=2, seen=3), versions, "canary", {"percent": 10}, 1.0)
    assert (st.stable, st.canary, st.canary_percent) == (2, 3, 10) and ev["version"] == 3
    rolled, _ = apply(st, versions, "rollback", {}, 1.0)  # during a canary: the canary ends, held
    assert rolled.stable == 2 and rolled.canary is None and "rolled back" in rolled.held[3]
    promoted, ev = apply(st, versions, "promote", {}, 1.0)  # the canary becomes stable
    assert (promoted.stable, promoted.canary, ev["previous"]) == (3, None, 2)
    promoted.history.append({"at": "t", **ev})
    back, ev = apply(promoted, versions, "rollback", {"reason": "p99 doubled"}, 1.0)
    assert back.stable == 2 and back.held == {3: "p99 doubled"} and ev == {
        "command": "rollback", "by": "operator", "version": 2, "previous": 3}
    # with 3 held, a plan on the same versions keeps 2 (3 is not new: the state names it)
    assert plan(back, versions, 1.0).stable == 2
    # promoting an older version sticks: the versions the operator saw are not new any more
    older, _ = apply(None, versions, "promote", {"version": 1}, 1.0)
    assert older.seen == 3 and plan(older, versions, 1.0).stable == 1
    assert plan(older, [*versions, Candidate(4)], 1.0).stable == 4  # a version published after it is


def test_the_file_is_written_atomically_and_bad_files_are_errors(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1, LABELS)
    assert rollout.read(tmp_path, "m") is None
    rollout.write(tmp_path, "m", RolloutState(stable=1, labels={"prod": 1}), {"command": "test"})
    assert rollout.read(tmp_path, "m") == RolloutState(stable=1, labels={"prod": 1},
                                                         history=rollout.read(tmp_path, "m").history)  # type: ignore[union-attr]
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".rollout")] == []
    path = tmp_path / "m" / "rollout.json"
    for text, error in [('{"format": 1, "stable": ', "not valid JSON"), ("[]", "format 1"),
                        ('{"format": 1, "stable": "two"}', "positive integer"),
                        ('{"format": 1, "canary_percent": 300}', "0 to 100"),
                        ('{"format": 1, "mode": "fast"}', "unknown rollout mode"),
                        ('{"format": 1, "owner": "me"}', "unknown fields"),
                        ('{"format": 1, "held": {"x": "y"}}', "positive integers")]:
        path.write_text(text)
        with pytest.raises(RolloutError, match=error):
            rollout.read(tmp_path, "m")


def cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.rollout", "--store", str(store), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "USER": "ops"})


def test_the_operator_command_works_on_the_store(tmp_path: Path) -> None:
    for v in (1, 2):
        write_fake_version(tmp_path, "m", v, LABELS)
    r = cli(tmp_path, "m", "status")
    assert r.returncode == 0 and json.loads(r.stdout)["stable"] == 2 and json.loads(r.stdout)["state"] is None
    r = cli(tmp_path, "m", "rollback")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["stable"] == 1 and status["held"] == {"2": "rolled back by ops (command line)"}
    written = json.loads((tmp_path / "m" / "rollout.json").read_text())
    assert written["history"][-1]["command"] == "rollback" and written["history"][-1]["by"] == "ops (command line)"
    r = cli(tmp_path, "m", "canary", "150")
    assert r.returncode == 2 and "refused: a percent is a number from 0 to 100" in r.stderr
    assert json.loads((tmp_path / "m" / "rollout.json").read_text()) == written  # unchanged
    r = cli(tmp_path, "m", "canary", "10", "--version", "2")
    assert r.returncode == 0 and json.loads(r.stdout)["canary"] == 2
    assert cli(tmp_path, "nope", "status").returncode == 0  # no such model: nothing to decide
    assert "no model 'nope'" in cli(tmp_path, "nope", "promote").stderr
