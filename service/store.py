"""The model store layout shared by `train` and `service` (no TensorFlow, no FastAPI here).

    <store>/<model>/<version>/{saved_model.pb, variables/, model.json, report/}

A version is a folder whose name is a positive integer without a leading zero. `model.json` is
written last and publishing renames a hidden temporary folder into place, so a reader that finds
`model.json` in a version folder finds a complete version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.metadata import METADATA_FORMAT, ModelMeta, describe_error

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")
METADATA_FILE = "model.json"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".publish.lock"


class StoreError(Exception):
    """A model or version in the store is missing or malformed."""


def is_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.fullmatch(name)) and name not in {".", ".."}


def parse_version(text: str) -> int | None:
    """The version number a folder name stands for, or None when it is not a version."""
    return int(text) if VERSION_RE.fullmatch(text) else None


def list_models(store: Path) -> list[str]:
    """Model names found in the store, sorted; folders with invalid names are ignored."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and is_model_name(p.name))


def list_versions(store: Path, name: str) -> list[int]:
    """Version numbers of `name` (ascending), complete or not; anything else in the folder is ignored."""
    model_dir = store / name
    if not is_model_name(name) or not model_dir.is_dir():
        return []
    versions = []
    for p in model_dir.iterdir():
        v = parse_version(p.name)
        if v is not None and p.is_dir():
            versions.append(v)
    return sorted(versions)


def version_dir(store: Path, name: str, version: int) -> Path:
    if not is_model_name(name):
        raise StoreError(f"invalid model name {name!r}: must match {MODEL_NAME_RE.pattern}")
    if version < 1:
        raise StoreError(f"invalid version {version}: versions are positive integers")
    return store / name / str(version)


def savedmodel_digest(path: Path) -> str:
    """SHA-256 over the SavedModel's graph and variables (names and bytes): what a variant was made from."""
    h = hashlib.sha256()
    files = [path / "saved_model.pb", *sorted((path / "variables").glob("*"))]
    for f in files:
        if not f.is_file():
            return "incomplete: " + str(f.relative_to(path))
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def parse_metadata(raw: Any, *, name: str | None = None, version: int | None = None) -> ModelMeta:
    """Validate a `model.json` document; raises StoreError naming the first problem."""
    if not isinstance(raw, dict):
        raise StoreError("model.json is not a JSON object")
    if raw.get("format") != METADATA_FORMAT:
        raise StoreError(f"model.json format {raw.get('format')!r} is not supported (expected {METADATA_FORMAT})")
    try:
        meta = ModelMeta.model_validate(raw)
    except ValidationError as exc:
        raise StoreError(f"model.json is malformed: {describe_error(exc)}") from exc
    if name is not None and meta.name != name:
        raise StoreError(f"model.json names model {meta.name!r}, but it lives in folder {name!r}")
    if version is not None and meta.version != version:
        raise StoreError(f"model.json names version {meta.version!r}, but it lives in folder {version}")
    return meta


def read_metadata(path: Path, *, name: str | None = None, version: int | None = None) -> ModelMeta:
    """Read and validate `<version folder>/model.json`."""
    file = path / METADATA_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StoreError(f"{file} is missing (version incomplete or still being copied)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{file} is unreadable: {exc}") from exc
    return parse_metadata(raw, name=name, version=version)


@contextlib.contextmanager
def _publish_lock(model_dir: Path) -> Iterator[None]:
    with open(model_dir / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish(
    store: Path,
    name: str,
    write: Callable[[Path], dict[str, Any] | None],
    metadata: ModelMeta | dict[str, Any],
) -> Path:
    """Publish a new version of `name` atomically and return its folder.

    `write(tmp)` fills a hidden temporary folder beside the versions (SavedModel, variants, report, ...)
    and may return metadata it measured there (e.g. `variants`), merged into model.json.
    Then, under a per-model lock so that concurrent publishers never pick the same number, the
    next free version is chosen, `model.json` is written last, and the folder is renamed into place.
    """
    if not is_model_name(name):
        raise StoreError(f"invalid model name {name!r}: must match {MODEL_NAME_RE.pattern}")
    model_dir = store / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        measured = write(tmp) or {}
        with _publish_lock(model_dir):
            version = max(list_versions(store, name), default=0) + 1
            given = metadata.document() if isinstance(metadata, ModelMeta) else metadata
            doc = {**given, **measured, "format": METADATA_FORMAT, "name": name, "version": version}
            doc = parse_metadata(doc, name=name, version=version).document()
            meta_tmp = tmp / (METADATA_FILE + ".part")
            meta_tmp.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(meta_tmp, tmp / METADATA_FILE)
            final = model_dir / str(version)
            os.rename(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
