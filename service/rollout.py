"""The rollout state of a model: which version is stable, which (if any) takes a share of the traffic as a
canary or sees a copy of it as a shadow, which versions are held back and why, named labels, and the
rollout mode. One small file per model beside its versions (`<model>/rollout.json`), replaced atomically,
read by every process and replica that reads the store; written only by the operator command
(`python -m service.rollout`) and the admin endpoints, never by a serving process. No TensorFlow, no
FastAPI: both halves and the command share it.

What the state decides, with the versions complete in the store (`plan`):
- `stable` answers the requests that name no version; absent, the newest version the mode admits.
- A version newer than every version the state names is new: `immediate` makes it stable at once;
  `gated` (the default) makes it stable only if its accuracy on the shared test split (`comparison` in
  its model.json, written by train) is within the accuracy budget of the version it was compared with,
  and holds it otherwise, with the reason; a version with no comparison is promoted as with
  `immediate`, and its status says it was not compared.
- `held` versions never take traffic on their own (a rollback holds the version it leaves).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROLLOUT_FILE = "rollout.json"
MODES = ("immediate", "gated", "progressive")
ROLES = ("stable", "canary", "shadow")
LABEL_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
HISTORY = 50


class RolloutError(ValueError):
    """A state or a command that is not valid; the message says why."""


@dataclass
class RolloutState:
    mode: str = "gated"
    stable: int | None = None
    canary: int | None = None
    canary_percent: float = 0.0
    shadow: int | None = None
    shadow_percent: float = 0.0
    held: dict[int, str] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    seen: int = 0  # the newest version in the store when the state was last written: only newer ones are new
    stage: dict[str, Any] | None = None  # progressive mode: the stage in progress (see service/progressive.py)
    history: list[dict[str, Any]] = field(default_factory=list)

    def named(self) -> set[int]:
        """Every version the state refers to, and the newest one it has seen."""
        out = {v for v in (self.stable, self.canary, self.shadow, self.seen or None) if v is not None}
        return out | set(self.held) | set(self.labels.values())

    def check(self) -> RolloutState:
        if self.mode not in MODES:
            raise RolloutError(f"unknown rollout mode {self.mode!r}; choose from {', '.join(MODES)}")
        if not isinstance(self.seen, int) or isinstance(self.seen, bool) or self.seen < 0:
            raise RolloutError(f"seen: a version number, not {self.seen!r}")
        for name, v in (("stable", self.stable), ("canary", self.canary), ("shadow", self.shadow),
                        *((f"label {k}", x) for k, x in self.labels.items()), *(("held", x) for x in self.held)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise RolloutError(f"{name}: a version is a positive integer, not {v!r}")
        for name, pct in (("canary_percent", self.canary_percent), ("shadow_percent", self.shadow_percent)):
            if not isinstance(pct, int | float) or isinstance(pct, bool) or not 0 <= pct <= 100:
                raise RolloutError(f"{name} must be a number from 0 to 100, not {pct!r}")
        for label in self.labels:
            if not LABEL_RE.fullmatch(label) or label in ROLES:
                raise RolloutError(f"invalid label {label!r}: lower-case letters, digits, '_' and '-', "
                                   f"at most 32, not one of the roles ({', '.join(ROLES)})")
        if self.canary is not None and self.canary == self.stable:
            raise RolloutError(f"version {self.canary} cannot be both stable and canary")
        return self

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["held"] = {str(k): v for k, v in self.held.items()}
        return {"format": 1, **doc}

    @classmethod
    def from_json(cls, doc: Any) -> RolloutState:
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise RolloutError("not a rollout state of format 1")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(doc) - known - {"format", "updated_at"}
        if unknown:
            raise RolloutError(f"unknown fields {sorted(unknown)}")
        try:
            held = {int(k): str(v) for k, v in (doc.get("held") or {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise RolloutError(f"held: versions are positive integers ({exc})") from exc
        fields = {k: v for k, v in doc.items() if k in known and k != "held"}
        try:
            state = cls(**fields, held=held)
        except TypeError as exc:
            raise RolloutError(str(exc)) from exc
        if not isinstance(state.labels, dict) or not isinstance(state.history, list):
            raise RolloutError("labels must be an object and history a list")
        if state.stage is not None and not isinstance(state.stage, dict):
            raise RolloutError("stage must be an object")
        return state.check()


def path_of(root: Path, name: str) -> Path:
    return root / name / ROLLOUT_FILE


def read(root: Path, name: str) -> RolloutState | None:
    """The model's state, or None when it has none. Raises RolloutError for a file that cannot be used
    (half-written, unparsable, invalid): the caller keeps its last good state."""
    path = path_of(root, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RolloutError(f"{path}: {exc}") from exc
    try:
        return RolloutState.from_json(json.loads(text))
    except json.JSONDecodeError as exc:
        raise RolloutError(f"{path} is not valid JSON ({exc})") from exc
    except RolloutError as exc:
        raise RolloutError(f"{path}: {exc}") from exc


def write(root: Path, name: str, state: RolloutState, event: dict[str, Any] | None = None) -> None:
    """Replace the model's state atomically: a temporary file beside it, flushed, then renamed."""
    state.check()
    if event is not None:
        state.history = [*state.history, {"at": now(), **event}][-HISTORY:]
    folder = root / name
    if not folder.is_dir():
        raise RolloutError(f"no model {name!r} in {root}")
    doc = {**state.to_json(), "updated_at": now()}
    fd, tmp = tempfile.mkstemp(prefix=".rollout-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path_of(root, name))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Candidate:
    """What the plan needs of a complete version: its test accuracy and the comparison train wrote."""

    version: int
    accuracy: float | None = None
    comparison: dict[str, Any] | None = None


@dataclass
class Plan:
    stable: int | None
    canary: int | None = None
    canary_percent: float = 0.0
    shadow: int | None = None
    shadow_percent: float = 0.0
    labels: dict[str, int] = field(default_factory=dict)
    held: dict[int, str] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)
    pending: int | None = None  # progressive mode: the newest version that passed the gate, not yet staged

    def roles(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for role, v in (("shadow", self.shadow), ("canary", self.canary), ("stable", self.stable)):
            if v is not None:
                out[v] = role
        return out

    def needed(self) -> list[int]:
        """The versions to keep loaded, in order of importance."""
        order = [self.stable, self.canary, self.shadow, *self.labels.values()]
        return list(dict.fromkeys(v for v in order if v is not None))


def gate(new: Candidate, max_drop_points: float) -> tuple[bool, str]:
    """Whether `new` may take traffic in gated mode, and why (or why not)."""
    cmp = new.comparison
    if not cmp or cmp.get("accuracy") is None or cmp.get("baseline_accuracy") is None:
        return True, "not compared with an earlier version (no comparison in its model.json): promoted as published"
    drop = (float(cmp["baseline_accuracy"]) - float(cmp["accuracy"])) * 100
    against = f"version {cmp.get('baseline_version')}"
    if drop <= max_drop_points + 1e-9:
        return True, (f"accuracy {cmp['accuracy']:.4f} against {against}'s {cmp['baseline_accuracy']:.4f} on the "
                      f"same {cmp.get('test_images', '?')} test images: within the {max_drop_points:g}-point budget")
    return False, (f"held by the gate: accuracy {cmp['accuracy']:.4f} against {against}'s "
                   f"{cmp['baseline_accuracy']:.4f} on the same {cmp.get('test_images', '?')} test images, "
                   f"{drop:.2f} points lower (budget {max_drop_points:g})")


def plan(state: RolloutState | None, complete: list[Candidate], max_drop_points: float,
         default_mode: str = "gated") -> Plan:
    """Which version is stable, canary and shadow, which are held, given the state and the complete
    versions in the store (newest last or in any order)."""
    by_version = {c.version: c for c in complete}
    st = state or RolloutState(mode=default_mode)
    held = {v: r for v, r in st.held.items() if v in by_version}
    notes: dict[int, str] = {}
    stable = st.stable if st.stable in by_version else None
    newest_named = max(st.named(), default=0)
    pending: int | None = None
    for v in sorted(by_version):
        if v in held or v <= newest_named:
            continue
        if st.mode == "immediate":
            stable = v
            continue
        ok, why = gate(by_version[v], max_drop_points)
        notes[v] = why
        if not ok:
            held[v] = why
        elif st.mode == "progressive" and (st.stable is not None or by_version.keys() - {v} - held.keys()):
            pending = v  # the controller takes it through shadow and canary; stable stays
            notes[v] = why + "; waiting for the progressive controller (python -m service.rollout MODEL watch)"
        else:
            stable = v
    if stable is None:  # nothing named or admitted yet: the newest version that is not held
        free = [v for v in by_version if v not in held]
        stable = max(free) if free else None
    def usable(v: int | None) -> int | None:
        return v if v in by_version and v != stable else None

    canary, shadow = usable(st.canary), usable(st.shadow)
    return Plan(stable=stable, canary=canary, canary_percent=st.canary_percent if canary else 0.0,
                shadow=shadow, shadow_percent=st.shadow_percent if shadow else 0.0,
                labels={k: v for k, v in st.labels.items() if v in by_version}, held=held, notes=notes,
                pending=pending if pending != stable else None)


# -- commands: the operator command and the admin endpoints both go through `apply` ----------------------

COMMANDS = ("promote", "rollback", "canary", "shadow", "hold", "release", "label", "unlabel", "mode")


def candidates(root: Path, name: str) -> list[Candidate]:
    """The complete versions of a model in the store, with what the plan needs of their model.json."""
    from service import store

    out = []
    for v in store.list_versions(root, name):
        path = store.version_dir(root, name, v)
        try:
            meta = store.read_metadata(path)
        except store.StoreError:
            continue
        extra = meta.model_extra or {}
        out.append(Candidate(v, meta.metrics.get("accuracy"), extra.get("comparison")))
    return out


def _percent(value: Any) -> float:
    try:
        pct = float(value)
    except (TypeError, ValueError) as exc:
        raise RolloutError(f"a percent is a number from 0 to 100, not {value!r}") from exc
    if not 0 <= pct <= 100:
        raise RolloutError(f"a percent is a number from 0 to 100, not {value!r}")
    return pct


def _version(value: Any, complete: set[int], what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError) as exc:
        raise RolloutError(f"{what}: a version is a positive integer, not {value!r}") from exc
    if v not in complete:
        raise RolloutError(f"{what}: version {v} is not a complete version in the store "
                           f"(complete: {', '.join(map(str, sorted(complete))) or 'none'})")
    return v


def apply(state: RolloutState | None, complete: list[Candidate], command: str, args: dict[str, Any],
          max_drop_points: float, who: str = "operator") -> tuple[RolloutState, dict[str, Any]]:
    """The new state after one command, and the history event that records it. Refuses (RolloutError)
    with nothing changed when the command or an argument is not valid."""
    if command not in COMMANDS:
        raise RolloutError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    versions = {c.version for c in complete}
    st = RolloutState(**{**asdict(state or RolloutState())})
    now_plan = plan(state, complete, max_drop_points)
    stable = now_plan.stable
    st.stable = stable  # from now on explicit: the state names what serves
    event: dict[str, Any] = {"command": command, "by": who}
    if command == "promote":
        target = args.get("version")
        v = _version(target, versions, "promote") if target is not None else (now_plan.canary or now_plan.shadow)
        if v is None:
            newer = [x for x in versions if stable is None or x > stable]
            if not newer:
                raise RolloutError("nothing to promote: no canary, no shadow and no version newer than the stable one")
            v = max(newer)
        st.held.pop(v, None)
        st.stable = v
        event.update(version=v, previous=stable)
        if st.canary == v:
            st.canary, st.canary_percent = None, 0.0
        if st.shadow == v:
            st.shadow, st.shadow_percent = None, 0.0
    elif command == "rollback":
        reason = str(args.get("reason") or f"rolled back by {who}")
        if now_plan.canary is not None or now_plan.shadow is not None:  # end the stage in progress
            for v in {now_plan.canary, now_plan.shadow} - {None}:
                st.held[v] = reason  # type: ignore[index]
            event.update(ended=sorted({now_plan.canary, now_plan.shadow} - {None}))  # type: ignore[type-var]
            st.canary, st.canary_percent, st.shadow, st.shadow_percent = None, 0.0, None, 0.0
        else:
            back = _previous_stable(st, versions, stable)
            if back is None:
                raise RolloutError(f"nothing to roll back to: no earlier complete version than {stable} "
                                   "that is not held")
            st.held[stable] = reason  # type: ignore[index]
            st.held.pop(back, None)
            st.stable = back
            event.update(version=back, previous=stable)
    elif command in ("canary", "shadow"):
        pct = _percent(args.get("percent"))
        target = args.get("version")
        if target is None:
            newer = [x for x in versions if (stable is None or x > stable)]
            current = getattr(now_plan, command)
            if current is None and not newer:
                raise RolloutError(f"no version newer than the stable one ({stable}) to run as {command}")
            v = current if current is not None else max(newer)
        else:
            v = _version(target, versions, command)
        if v == stable:
            raise RolloutError(f"version {v} is the stable one: it cannot also be the {command}")
        if pct == 0:
            setattr(st, command, None)
            setattr(st, f"{command}_percent", 0.0)
        else:
            st.held.pop(v, None)
            setattr(st, command, v)
            setattr(st, f"{command}_percent", pct)
        event.update(version=v, percent=pct)
    elif command == "hold":
        v = _version(args.get("version"), versions, "hold")
        if v == stable:
            raise RolloutError(f"version {v} is stable: promote another one or roll back first")
        st.held[v] = str(args.get("reason") or f"held by {who}")
        if st.canary == v:
            st.canary, st.canary_percent = None, 0.0
        if st.shadow == v:
            st.shadow, st.shadow_percent = None, 0.0
        event.update(version=v, reason=st.held[v])
    elif command == "release":
        v = _version(args.get("version"), versions, "release")
        if st.held.pop(v, None) is None:
            raise RolloutError(f"version {v} is not held")
        event.update(version=v)
    elif command == "label":
        label = str(args.get("label", ""))
        st.labels[label] = _version(args.get("version"), versions, "label")
        event.update(label=label, version=st.labels[label])
    elif command == "unlabel":
        label = str(args.get("label", ""))
        if st.labels.pop(label, None) is None:
            raise RolloutError(f"no label {label!r}")
        event.update(label=label)
    elif command == "mode":
        st.mode = str(args.get("mode"))
        event.update(mode=st.mode)
    if command in ("promote", "rollback", "canary", "shadow", "hold"):
        st.stage = None  # an operator's decision ends an automatic stage in progress
    st.seen = max([st.seen, *versions])
    return st.check(), event


def _previous_stable(st: RolloutState, versions: set[int], stable: int | None) -> int | None:
    """The version that was stable before `stable` (from the history), else the newest earlier one not held."""
    for e in reversed(st.history):
        prev = e.get("previous")
        if e.get("version") == stable and isinstance(prev, int) and prev in versions and prev not in st.held:
            return prev
    earlier = [v for v in versions if stable is not None and v < stable and v not in st.held]
    return max(earlier) if earlier else None


def status(root: Path, name: str, max_drop_points: float) -> dict[str, Any]:
    """The state as written, and what it decides with the versions in the store now."""
    state = read(root, name)
    complete = candidates(root, name)
    p = plan(state, complete, max_drop_points)
    return {"model": name, "state": state.to_json() if state else None, "stable": p.stable, "canary": p.canary,
            "canary_percent": p.canary_percent, "shadow": p.shadow, "shadow_percent": p.shadow_percent,
            "labels": p.labels, "held": {str(k): v for k, v in p.held.items()},
            "notes": {str(k): v for k, v in p.notes.items()}, "versions": [c.version for c in complete]}


def run_command(root: Path, name: str, command: str, args: dict[str, Any], max_drop_points: float,
                who: str = "operator") -> dict[str, Any]:
    """Read the state, apply one command, write it back atomically; the status after it."""
    from service import store

    if not store.is_model_name(name) or name not in store.list_models(root):
        raise RolloutError(f"no model {name!r} in {root}")
    state, event = apply(read(root, name), candidates(root, name), command, args, max_drop_points, who)
    write(root, name, state, event)
    return status(root, name, max_drop_points)


def watch(root: Path, name: str, url: str, max_drop_points: float, once: bool, interval_s: float,
          thresholds: Any) -> int:
    """The progressive controller (service/progressive.py) against the service at `url`."""
    import time

    import httpx

    from service import progressive

    while True:
        state = read(root, name)
        if state is None or state.mode != "progressive":
            print(f"{name} is not in progressive mode (python -m service.rollout {name} mode progressive)")
            if once:
                return 0
        else:
            p = plan(state, candidates(root, name), max_drop_points)
            try:
                text = httpx.get(url + "/metrics", timeout=30).text
                listing = httpx.get(url + "/v1/models", timeout=30).json()["models"]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                print(f"the service at {url} did not answer ({exc}); trying again", flush=True)
            else:
                versions = {v["version"]: v["state"] for m in listing if m["name"] == name for v in m["versions"]}
                moved = progressive.step(state, p, versions, text, name, thresholds)
                if moved is not None:
                    write(root, name, *moved)
                    print(json.dumps(moved[1]), flush=True)
        if once:
            return 0
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m service.rollout", description=(
        "Roll versions of a model out and back, on the model store directly (works with the service stopped, "
        "and for every replica reading the store; running services follow within their poll interval)."))
    ap.add_argument("--store", default=os.environ.get("IMGSERVE_MODEL_STORE", "model_store"),
                    help="the model store: a folder, or object storage (s3://bucket/prefix)")
    ap.add_argument("--max-accuracy-drop", type=float,
                    default=float(os.environ.get("IMGSERVE_MAX_ACCURACY_DROP", "1.0")),
                    help="accuracy points a gated version may lose against the one it was compared with")
    ap.add_argument("model")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="the state and what it decides")
    p = sub.add_parser("promote", help="make a version stable (default: the canary, else the newest)")
    p.add_argument("version", nargs="?", type=int)
    p = sub.add_parser("rollback", help="end a canary or shadow, else go back to the previous stable version")
    p.add_argument("--reason")
    for role in ("canary", "shadow"):
        p = sub.add_parser(role, help=f"send PERCENT of the traffic to a {role} version (0 ends it)")
        p.add_argument("percent")
        p.add_argument("--version", type=int)
    p = sub.add_parser("hold", help="keep a version from taking traffic")
    p.add_argument("version", type=int)
    p.add_argument("--reason")
    p = sub.add_parser("release", help="let a held version be considered again")
    p.add_argument("version", type=int)
    p = sub.add_parser("label", help="name a version (requests may ask for the label)")
    p.add_argument("label")
    p.add_argument("version", type=int)
    p = sub.add_parser("unlabel")
    p.add_argument("label")
    p = sub.add_parser("mode", help=f"the rollout mode: {', '.join(MODES)}")
    p.add_argument("mode")
    p = sub.add_parser("watch", help="progressive mode: take new versions through shadow and canary to stable, "
                       "by the service's metrics, rolling back a failed stage (service/progressive.py)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service whose metrics decide")
    p.add_argument("--once", action="store_true", help="one step, then exit")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between steps")
    p.add_argument("--shadow-rows", type=int, default=200, help="rows compared before the shadow stage ends")
    p.add_argument("--min-agreement", type=float, default=0.9, help="top-1 agreement the shadow needs")
    p.add_argument("--canary-percent", type=float, default=10.0)
    p.add_argument("--canary-requests", type=int, default=200, help="canary answers before the canary stage ends")
    p.add_argument("--max-error-increase", type=float, default=0.01,
                   help="server-error share the canary may have above stable's")
    p.add_argument("--max-p99-ratio", type=float, default=1.5, help="canary p99 at most this times stable's")
    p.add_argument("--min-p99-gap", type=float, default=0.05, help="seconds: a smaller p99 difference never fails")
    a = ap.parse_args(argv)
    if "://" in a.store:
        return _on_object_store(a, argv)
    a.store = Path(a.store)
    if a.command == "watch":
        from service.progressive import Thresholds

        th = Thresholds(a.shadow_rows, a.min_agreement, a.canary_percent, a.canary_requests, a.max_error_increase,
                        a.max_p99_ratio, a.min_p99_gap)
        return watch(a.store, a.model, a.url.rstrip("/"), a.max_accuracy_drop, a.once, a.interval, th)
    args = {k: v for k, v in vars(a).items() if k not in ("store", "max_accuracy_drop", "model", "command")}
    try:
        if a.command == "status":
            out = status(a.store, a.model, a.max_accuracy_drop)
        else:
            out = run_command(a.store, a.model, a.command, args, a.max_accuracy_drop,
                              who=f"{os.environ.get('USER', 'operator')} (command line)")
    except RolloutError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


def _on_object_store(a: Any, argv: list[str] | None) -> int:
    """A command on a store in object storage: run on a local copy of its metadata and rollout files, then
    the rollout file uploaded (replicas follow at their next listing)."""
    import sys

    from service import remote

    if a.command == "watch":
        print("refused: `watch` needs a store folder; run it where the store is mounted, or step it with "
              "the service's admin endpoint", file=sys.stderr)
        return 2
    try:
        with remote.staged_mirror(a.store, **remote.env_options()) as mirror:
            before = (mirror.cache / a.model / remote.ROLLOUT_FILE)
            old = before.read_bytes() if before.is_file() else None
            code = main(_with_store(argv, str(mirror.cache)))
            if code == 0 and before.is_file() and before.read_bytes() != old:
                mirror.put_rollout(a.model)
            return code
    except remote.RemoteError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2


def _with_store(argv: list[str] | None, store: str) -> list[str]:
    """The same command line with `--store` pointing at `store`."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--store":
            skip = True
            continue
        if arg.startswith("--store="):
            continue
        out.append(arg)
    return ["--store", store, *out]


if __name__ == "__main__":
    raise SystemExit(main())
