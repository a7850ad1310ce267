"""Copying a published version into a store: `python -m train publish SOURCE --store DEST`.

The destination is a folder or object storage (s3://bucket/prefix). Either way the copy becomes the next
version there and model.json is written last (service/store.py, service/remote.py), so a server polling
the destination never sees half a version. No TensorFlow is needed: this seeds a bucket from a version
trained elsewhere, or moves a model from a staging store to the production one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service import remote, store


def complete_versions(location: Path | str, name: str) -> list[int]:
    """The versions of `name` at `location` (a folder or a URL) that have their model.json, ascending."""
    if isinstance(location, str):
        with remote.staged_mirror(location, **remote.env_options()) as mirror:
            listing = mirror.listing.get(name, {})
            return sorted(v for v, files in listing.items() if v and store.METADATA_FILE in files)
    return [v for v in store.list_versions(location, name)
            if (location / name / str(v) / store.METADATA_FILE).is_file()]


def resolve_source(source: Path) -> Path:
    """A version folder as given, or a model folder's newest complete version."""
    if (source / store.METADATA_FILE).is_file():
        return source
    versions = complete_versions(source.parent, source.name)
    if not versions:
        raise ValueError(f"{source} is neither a version folder (with {store.METADATA_FILE}) nor a model folder "
                         "with a complete version")
    return source / str(versions[-1])


def copy_version(source: Path, location: Path | str, name: str | None = None) -> str:
    """Publish a copy of the version at `source` as the next version of `name` (default: the source's
    name) at `location`; returns where it went."""
    source = resolve_source(source)
    doc = json.loads((source / store.METADATA_FILE).read_text())
    name = name or str(doc["name"])
    if isinstance(location, str):
        version = remote.publish_version(source, location, name, **remote.env_options())
        return f"{location.rstrip('/')}/{name}/{version}"

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(store.METADATA_FILE))

    return str(store.publish(location, name, write, doc))
