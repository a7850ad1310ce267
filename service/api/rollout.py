"""The rollout of a model's versions over HTTP: its status, and the operator's commands behind the admin key
(the same commands as `python -m service.rollout`, which works on the store directly). A command writes
the model's rollout.json; this process follows at once, every other process and replica within its poll
interval."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service import rollout, store
from service.api.deps import AdminAuth, RegistryDep
from service.api.views import shadow_view
from service.errors import BadRequest, NotFound, NotReady
from service.remote import RemoteError

router = APIRouter(tags=["rollout"])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "a command or argument that is not valid (nothing changed)"},
    401: {"description": "admin key missing or wrong"},
    404: {"description": "unknown model"},
}


class RolloutArgs(BaseModel):
    """Arguments of a command: `percent` for canary and shadow; `version` for promote, canary, shadow, hold,
    release and label; `label`; `mode`; `reason` for rollback and hold."""

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"percent": 10, "version": 4}]}}

    version: int | None = Field(None, ge=1)
    percent: float | None = None
    label: str | None = None
    mode: str | None = None
    reason: str | None = Field(None, max_length=500)


def _model(registry: Any, model: str) -> str:
    if not store.is_model_name(model) or model not in store.list_models(registry.settings.model_store):
        raise NotFound(f"no model {model!r} in the store")
    return model


@router.get("/v1/models/{model}/rollout", summary="Rollout status: stable, canary, shadow, held, labels, history",
            responses=ERRORS)
async def rollout_status(model: str, registry: RegistryDep) -> dict[str, Any]:
    name = _model(registry, model)
    s = registry.settings
    try:
        out = await asyncio.to_thread(rollout.status, s.model_store, name, s.max_accuracy_drop)
    except rollout.RolloutError as exc:
        out = {"model": name, "state_error": str(exc)}
    m = registry.models.get(name)
    if m is not None:
        out["serving"] = {"stable": m.plan.stable, "canary": m.plan.canary, "shadow": m.plan.shadow,
                          "loaded": sorted(m.loaded), "state_error": m.state_error,
                          "shadow_pairs": shadow_view(registry, name), "process": os.getpid()}
    return out


@router.post("/v1/models/{model}/rollout/{command}", summary="Run a rollout command (admin key)",
             dependencies=[AdminAuth], responses=ERRORS,
             description="Commands: " + ", ".join(rollout.COMMANDS) + ". The body holds the command's arguments.")
async def rollout_command(model: str, command: str, registry: RegistryDep, request: Request,
                          args: RolloutArgs | None = None) -> dict[str, Any]:
    name = _model(registry, model)
    s = registry.settings
    given = (args or RolloutArgs()).model_dump(exclude_none=True)
    who = f"admin endpoint ({request.client.host if request.client else 'unknown'})"
    try:
        out = await asyncio.to_thread(rollout.run_command, s.model_store, name, command, given,
                                      s.max_accuracy_drop, who)
    except rollout.RolloutError as exc:
        raise BadRequest(f"refused: {exc}") from exc
    except OSError as exc:  # a read-only store: the command cannot be recorded
        raise BadRequest(f"refused: the rollout state could not be written ({exc}); the store is read-only here: "
                         "run `python -m service.rollout` where it is writable") from exc
    if registry.mirror is not None:  # the state lives in the bucket: every replica follows it
        try:
            await asyncio.to_thread(registry.mirror.put_rollout, name)
        except RemoteError as exc:
            raise NotReady(str(exc)) from exc
    await registry.scan()
    return out
