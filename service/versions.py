"""Version policy: which versions of which models the service should serve, and which it gave up on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service import store
from service.store import StoreError


@dataclass
class Failure:
    signature: tuple[float, ...]
    reason: str


def signature(path: Path) -> tuple[float, ...]:
    """Changes whenever any file of the version changes, so a version refused while it was still
    being copied (or fixed in place) is tried again."""
    meta = path / store.METADATA_FILE
    if not meta.is_file():
        raise StoreError(f"{meta} is missing (incomplete or still being copied)")
    count, size, newest = 0, 0, 0.0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime)
    return (float(count), float(size), newest)


@dataclass
class VersionPolicy:
    """The latest complete version of every allowed model, or its pinned one; never one refused
    before unless its files changed since."""

    root: Path
    allowlist: set[str] = field(default_factory=set)
    pins: dict[str, int] = field(default_factory=dict)
    failures: dict[tuple[str, int], Failure] = field(default_factory=dict)
    unloaded: set[str] = field(default_factory=set)

    def models(self) -> list[str]:
        return [n for n in store.list_models(self.root)
                if n not in self.unloaded and (not self.allowlist or n in self.allowlist)]

    def candidates(self, name: str, current: int | None) -> list[tuple[int, Path, tuple[float, ...]]]:
        """Versions worth trying instead of `current`, best first, each with its folder and signature."""
        versions = store.list_versions(self.root, name)
        pin = self.pins.get(name)
        if pin is not None:
            versions = [pin] if pin in versions else []
        out = []
        for version in sorted(versions, reverse=True):
            if current is not None and (version == current or (version < current and pin is None)):
                break
            path = store.version_dir(self.root, name, version)
            try:
                sig = signature(path)
            except StoreError:
                continue
            known = self.failures.get((name, version))
            if known is None or known.signature != sig:
                out.append((version, path, sig))
        return out

    def failed(self, name: str, version: int, sig: tuple[float, ...], reason: str) -> None:
        self.failures[(name, version)] = Failure(sig, reason)

    def succeeded(self, name: str, version: int) -> None:
        self.failures.pop((name, version), None)

    def reasons(self, name: str) -> list[str]:
        return [f.reason for (n, _), f in self.failures.items() if n == name]
