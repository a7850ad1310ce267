"""The JSON views of what is served (/v1/models, readiness, the KServe repository index)."""

from __future__ import annotations

from typing import Any

from service import store
from service.loading import ServedVersion
from service.registry import Registry


def runtime_view(served: ServedVersion) -> dict[str, str]:
    return {"runtime": served.runtime.runtime, "precision": served.runtime.precision}


def describe_models(registry: Registry) -> list[dict[str, Any]]:
    root = registry.settings.model_store
    out = []
    for name in store.list_models(root) or sorted(registry.served):
        served = registry.served.get(name)
        versions = []
        for v in store.list_versions(root, name):
            fail = registry.policy.failures.get((name, v))
            state = "AVAILABLE" if served and served.version == v else ("FAILED" if fail else "NOT_LOADED")
            entry: dict[str, Any] = {"version": v, "state": state}
            if fail:
                entry["reason"] = fail.reason
            versions.append(entry)
        doc: dict[str, Any] = {"name": name, "versions": versions,
                               "served_version": served.version if served else None}
        if served:
            meta = served.meta
            doc.update(labels=meta.labels, input=meta.input.model_dump(), backbone=meta.backbone,
                       metrics=meta.metrics, created_at=meta.created_at, queue_depth=served.batcher.depth,
                       **runtime_view(served))
        out.append(doc)
    return out
