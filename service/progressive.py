"""The progressive rollout controller: takes a model's new version through shadow and canary to stable,
by counts read from the service's own metrics, and rolls it back by itself when a stage fails.

    python -m service.rollout MODEL watch --url http://127.0.0.1:8000      # runs until stopped
    python -m service.rollout MODEL watch --url ... --once                 # one step (cron, a Kubernetes CronJob)

It runs beside the service, not in it (the service only reads the rollout state): it reads `/metrics` and
`/v1/models` of the URL and writes the model's rollout.json with the same atomic write as the operator
command. In `progressive` mode a version that passed the gate waits for it; each step:

1. no stage: the waiting version becomes the shadow (all requests copied, on idle capacity);
2. shadow: once `shadow_rows` rows were compared, the canary at `canary_percent` if top-1 agreement with
   stable was at least `min_agreement`, else rolled back (held, with the figures);
3. canary: once the canary answered `canary_requests` requests, stable if its server-error share is at most
   stable's plus `max_error_increase` and its p99 at most `max_p99_ratio` times stable's over the same
   time (and by more than `min_p99_gap_s`: histogram buckets are coarse), else rolled back;
4. a staged version that FAILED to load or was retired ends its stage (held).

The counts are those of the URL it reads: one replica (all its processes summed), or one Prometheus-style
aggregate endpoint in front of several; point it where the traffic goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.rollout import Plan, RolloutState


@dataclass(frozen=True)
class Thresholds:
    shadow_rows: int = 200
    min_agreement: float = 0.9
    canary_percent: float = 10.0
    canary_requests: int = 200
    max_error_increase: float = 0.01
    max_p99_ratio: float = 1.5
    min_p99_gap_s: float = 0.05  # and by at least this much: bucket edges make small p99s jump by 2.5x


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _sum(rows: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in rows if n == name and all(lab.get(k) == x for k, x in labels.items()))


def _buckets(rows: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, lab, v in rows:
        if n == name + "_bucket" and all(lab.get(k) == x for k, x in labels.items()):
            out[lab["le"]] = out.get(lab["le"], 0.0) + v
    return out


def p99(now: dict[str, float], then: dict[str, float]) -> float | None:
    """The 99th percentile upper bound of the observations between two reads of a histogram's buckets."""
    delta = sorted(((float(le), now[le] - then.get(le, 0.0)) for le in now), key=lambda x: x[0])
    if not delta or delta[-1][1] <= 0:
        return None
    total = delta[-1][1]
    for le, count in delta:
        if count >= 0.99 * total:
            return le
    return math.inf


def counts(text: str, model: str, stable: int | None, staged: int) -> dict[str, Any]:
    """What the stages look at, read once from the service's metrics."""
    rows = samples(text)
    m, s, v = model, str(stable), str(staged)
    return {
        "shadow_rows": _sum(rows, "imgserve_shadow_rows_total", model=m, version=v, against=s),
        "shadow_agree": _sum(rows, "imgserve_shadow_top1_agreements_total", model=m, version=v, against=s),
        "canary_requests": _sum(rows, "imgserve_version_requests_total", model=m, version=v, role="canary"),
        "canary_errors": _sum(rows, "imgserve_version_requests_total", model=m, version=v, role="canary",
                              outcome="server_error"),
        "stable_requests": _sum(rows, "imgserve_version_requests_total", model=m, version=s, role="stable"),
        "stable_errors": _sum(rows, "imgserve_version_requests_total", model=m, version=s, role="stable",
                              outcome="server_error"),
        "canary_latency": _buckets(rows, "imgserve_version_request_seconds", model=m, version=v, role="canary"),
        "stable_latency": _buckets(rows, "imgserve_version_request_seconds", model=m, version=s, role="stable"),
    }


def _rollback(st: RolloutState, version: int, reason: str) -> tuple[RolloutState, dict[str, Any]]:
    st.held[version] = f"progressive: {reason}"
    if st.shadow == version:
        st.shadow, st.shadow_percent = None, 0.0
    if st.canary == version:
        st.canary, st.canary_percent = None, 0.0
    st.stage = None
    return st, {"command": "rollback", "by": "progressive controller", "version": version, "reason": reason}


def step(state: RolloutState, plan: Plan, versions: dict[int, str], metrics_text: str, model: str,
         th: Thresholds) -> tuple[RolloutState, dict[str, Any]] | None:
    """One step of the controller: the new state and its history event, or None when nothing changes.
    `versions` maps each version to its state in /v1/models (AVAILABLE, FAILED, NOT_LOADED)."""
    if state.mode != "progressive":
        return None
    st = RolloutState(**{**state.__dict__, "held": dict(state.held), "labels": dict(state.labels),
                         "history": list(state.history)})
    st.stable = plan.stable
    stage = st.stage
    if stage is None:
        if plan.pending is None or plan.stable is None:
            return None
        v = plan.pending
        st.shadow, st.shadow_percent = v, 100.0
        st.stage = {"name": "shadow", "version": v, "since": counts(metrics_text, model, plan.stable, v)}
        st.seen = max(st.seen, v)
        return st, {"command": "shadow", "by": "progressive controller", "version": v, "percent": 100.0}
    v = int(stage["version"])
    if versions.get(v) == "FAILED":
        return _rollback(st, v, f"version {v} failed to load in the {stage['name']} stage")
    now, since = counts(metrics_text, model, plan.stable, v), stage["since"]
    if stage["name"] == "shadow":
        rows = now["shadow_rows"] - since["shadow_rows"]
        if rows < th.shadow_rows:
            return None
        agreement = (now["shadow_agree"] - since["shadow_agree"]) / rows
        if agreement < th.min_agreement:
            return _rollback(st, v, f"top-1 agreement {agreement:.3f} with version {plan.stable} over {rows:.0f} "
                                    f"shadowed rows, below {th.min_agreement:g}")
        st.shadow, st.shadow_percent = None, 0.0
        st.canary, st.canary_percent = v, th.canary_percent
        st.stage = {"name": "canary", "version": v, "since": now, "agreement": agreement}
        return st, {"command": "canary", "by": "progressive controller", "version": v, "percent": th.canary_percent,
                    "agreement": round(agreement, 4)}
    requests = now["canary_requests"] - since["canary_requests"]
    if requests < th.canary_requests:
        return None
    c_err = (now["canary_errors"] - since["canary_errors"]) / requests
    s_req = now["stable_requests"] - since["stable_requests"]
    s_err = (now["stable_errors"] - since["stable_errors"]) / s_req if s_req else 0.0
    c_p99, s_p99 = p99(now["canary_latency"], since["canary_latency"]), p99(now["stable_latency"],
                                                                            since["stable_latency"])
    if c_err > s_err + th.max_error_increase:
        return _rollback(st, v, f"server errors {c_err:.3f} of {requests:.0f} canary requests against stable's "
                                f"{s_err:.3f}")
    if c_p99 is not None and s_p99 is not None and c_p99 > s_p99 * th.max_p99_ratio and \
            c_p99 - s_p99 > th.min_p99_gap_s:
        return _rollback(st, v, f"p99 {c_p99:g} s against stable's {s_p99:g} s (at most {th.max_p99_ratio:g}x)")
    previous = st.stable
    st.stable, st.canary, st.canary_percent, st.stage = v, None, 0.0, None
    return st, {"command": "promote", "by": "progressive controller", "version": v, "previous": previous,
                "canary_requests": requests, "canary_errors": c_err, "stable_errors": s_err}
