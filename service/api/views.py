"""The JSON views of what is served (/v1/models, readiness, the KServe repository index, rollout status)."""

from __future__ import annotations

from typing import Any

from service import store
from service.loading import ServedVersion
from service.registry import ModelVersions, Registry


def runtime_view(served: ServedVersion) -> dict[str, str]:
    return {"runtime": served.runtime.runtime, "precision": served.runtime.precision}


def rollout_view(m: ModelVersions) -> dict[str, Any]:
    p = m.plan
    out: dict[str, Any] = {"stable": p.stable, "canary": p.canary, "canary_percent": p.canary_percent,
                           "shadow": p.shadow, "shadow_percent": p.shadow_percent, "labels": p.labels,
                           "held": {str(v): why for v, why in p.held.items()}}
    if m.state_error:
        out["state_error"] = m.state_error
    return out


def shadow_view(registry: Registry, name: str) -> list[dict[str, Any]]:
    """Per pair (shadow version, answering version), what this process's shadow copies showed."""
    out = []
    for (model, version, against), c in sorted(registry.shadow_stats.items()):
        if model != name:
            continue
        rows = c["rows"]
        out.append({"version": version, "against": against, "copies_run": c["compared"], "dropped": c["dropped"],
                    "failed": c["failed"], "rows": rows, "top1_agreement": c["agreements"] / rows if rows else None,
                    "mean_top_probability_change": c["top_probability_change"] / rows if rows else None,
                    "mean_seconds": c["seconds"] / c["compared"] if c["compared"] else None})
    return out


def version_entries(registry: Registry, name: str) -> list[dict[str, Any]]:
    """Every version of the model in the store (and every loaded one): state, role, and why for any that
    is not serving."""
    m = registry.models.get(name)
    versions = sorted(set(store.list_versions(registry.settings.model_store, name)) | set(m.loaded if m else ()))
    out = []
    for v in versions:
        fail = registry.policy.failures.get((name, v))
        entry: dict[str, Any] = {"version": v}
        if m is not None and v in m.loaded:
            entry.update(state="AVAILABLE", role=m.role(v), **runtime_view(m.loaded[v]))
        elif fail:
            entry.update(state="FAILED", role="failed", reason=fail.reason)
        elif (name, v) in registry.fetch_errors:
            entry.update(state="NOT_LOADED", reason=registry.fetch_errors[(name, v)])
        elif m is not None and v in m.plan.held:
            entry.update(state="NOT_LOADED", role="held", reason=m.plan.held[v])
        elif m is not None and v in m.refused:
            entry.update(state="NOT_LOADED", reason=m.refused[v])
        else:
            entry.update(state="NOT_LOADED")
        if m is not None and v in m.plan.notes and "reason" not in entry:
            entry["gate"] = m.plan.notes[v]
        out.append(entry)
    return out


def describe_models(registry: Registry) -> list[dict[str, Any]]:
    root = registry.settings.model_store
    out = []
    for name in store.list_models(root) or sorted(registry.models):
        m = registry.models.get(name)
        served = m.stable if m else None
        doc: dict[str, Any] = {"name": name, "versions": version_entries(registry, name),
                               "served_version": served.version if served else None}
        if m is not None:
            doc["rollout"] = rollout_view(m)
        if served:
            meta = served.meta
            doc.update(labels=meta.labels, input=meta.input.model_dump(), backbone=meta.backbone,
                       metrics=meta.metrics, created_at=meta.created_at, queue_depth=served.batcher.depth,
                       **runtime_view(served))
        out.append(doc)
    return out
