"""The model store in object storage (`IMGSERVE_MODEL_STORE=s3://bucket/prefix`, or any fsspec URL whose
package is installed), mirrored into a local cache that the rest of the service reads as a plain store.

    <url>/<model>/<version>/{saved_model.pb, variables/, variants/, report/, model.json}   (as on disk)
    <cache>/<model>/<version>/model.json          every complete version: its metadata only (a "stub")
    <cache>/<model>/<version>/...  + .complete     a version the service loads: every file, checked
    <cache>/<model>/rollout.json                   the model's rollout state, when it has one

`sync` lists each model's objects in one call (a flat listing: sizes and ETags of every file) and copies
only what is new or changed: the model.json of each complete version, and rollout.json. `fetch` copies
a whole version before it is loaded: into a temporary folder, every size checked against the listing and
model.json's ETag checked again afterwards (a version rewritten meanwhile is fetched again), then renamed
into place. The cache is bounded (`IMGSERVE_STORE_CACHE_MAX_GB`): whole versions not being served are
turned back into stubs, oldest first. Errors of the store (bucket, credentials, endpoint, a full local
disk) are `RemoteError`s: the service keeps what it serves and tries again with backoff.

Publishing (`publish_version`, used by `train --store URL`) uploads every file of a version made locally,
then model.json last: a version without model.json is incomplete, never served, and its number is never
reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import store
from service.store import METADATA_FILE, StoreError

logger = logging.getLogger(__name__)
COMPLETE = ".complete"  # in a cached version holding every file: the manifest it was checked against
ROLLOUT_FILE = "rollout.json"
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class RemoteError(StoreError):
    """The object store could not be read or the cache written; the service keeps what it has and retries."""


def is_url(text: str) -> bool:
    return "://" in text


def filesystem(url: str, endpoint_url: str = "", key: str | None = None, secret: str | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and root path of `url`; S3 options from the settings, else the usual AWS
    environment variables and files."""
    import fsspec

    options: dict[str, Any] = {}
    if url.startswith("s3://"):
        options["use_listings_cache"] = False
        if endpoint_url:
            options["client_kwargs"] = {"endpoint_url": endpoint_url}
        if key and secret:
            options.update(key=key, secret=secret)
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root.rstrip("/")


@dataclass
class RemoteFile:
    size: int
    etag: str


@dataclass
class Mirror:
    """A local mirror of the object store at `url` in `cache` (see the module docstring)."""

    url: str
    cache: Path
    fs: Any
    root: str
    max_bytes: int = 20 << 30
    listing: dict[str, dict[int, dict[str, RemoteFile]]] = field(default_factory=dict)  # model -> version -> files
    error: str | None = None
    last_sync: float | None = None
    _failures: int = 0
    _reason: str | None = None
    _retry_at: float = 0.0
    _fetch_failures: dict[tuple[str, int], tuple[int, float, str]] = field(default_factory=dict)

    @classmethod
    def open(cls, url: str, cache: Path, max_bytes: int, endpoint_url: str = "", key: str | None = None,
             secret: str | None = None) -> Mirror:
        fs, root = filesystem(url, endpoint_url, key, secret)
        cache.mkdir(parents=True, exist_ok=True)
        return cls(url, cache, fs, root, max_bytes)

    # -- listing -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `/v1/models` shows of the store."""
        return {"url": self.url, "cache": str(self.cache), "last_sync_age_s": None if self.last_sync is None else
                round(time.monotonic() - self.last_sync, 1), "error": self.error,
                "cached_bytes": self.cached_bytes()}

    def _list(self) -> dict[str, dict[int, dict[str, RemoteFile]]]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            top = self.root.split("/", 1)[0]
            if top == self.root or not self.fs.exists(top):
                raise RemoteError(f"{top!r} does not exist (a wrong bucket?)") from None
            return {}  # an empty prefix: no model yet
        out: dict[str, dict[int, dict[str, RemoteFile]]] = {}
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not store.is_model_name(name):
                continue
            files = self.fs.find(f"{self.root}/{name}", detail=True)
            versions: dict[int, dict[str, RemoteFile]] = {}
            for path, info in files.items():
                rel = path[len(self.root) + len(name) + 2:]
                head, _, rest = rel.partition("/")
                if rel == ROLLOUT_FILE:
                    versions.setdefault(0, {})[ROLLOUT_FILE] = _file(info)
                    continue
                version = store.parse_version(head)
                if version is not None and rest:
                    versions.setdefault(version, {})[rest] = _file(info)
            out[name] = versions
        return out

    def sync(self) -> bool:
        """List the store and bring the cache's stubs and rollout files in line; False (with `error` set) when
        the store could not be read, or while backing off after such a failure."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            listing = self._list()
            for name, versions in listing.items():
                self._sync_model(name, versions)
            for gone in set(store.list_models(self.cache)) - set(listing):
                self._drop_model(gone)
        except Exception as exc:  # the store, the network or the local disk: keep what is cached
            return self._failed(exc)
        if self.error:
            logger.info("model store %s can be read again", self.url)
        self.listing, self.error, self._reason, self._failures, self._retry_at = listing, None, None, 0, 0.0
        self.last_sync = time.monotonic()
        return True

    def _failed(self, exc: BaseException) -> bool:
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        reason = f"{exc.__class__.__name__}: {exc}".strip()
        if reason != self._reason:
            logger.error("model store %s could not be read (retrying in %.0fs, then with backoff): %s", self.url,
                         delay, reason)
        self._reason = reason
        self.error = f"{reason} (retrying in {delay:.0f}s)"
        return False

    def _sync_model(self, name: str, versions: dict[int, dict[str, RemoteFile]]) -> None:
        local = self.cache / name
        local.mkdir(parents=True, exist_ok=True)
        rollout = versions.get(0, {}).get(ROLLOUT_FILE)
        self._sync_file(f"{name}/{ROLLOUT_FILE}", local / ROLLOUT_FILE, rollout)
        complete = {v for v, files in versions.items() if v and METADATA_FILE in files}
        for v in complete:
            target = local / str(v)
            meta = versions[v][METADATA_FILE]
            if self._stub_matches(target, meta):  # a stub or a whole version of this model.json
                continue
            self._write_stub(name, v, meta)
            self._fetch_failures.pop((name, v), None)  # a new model.json: worth trying at once
        for v in store.list_versions(self.cache, name):
            if v not in complete:  # deleted (or made incomplete) in the store
                shutil.rmtree(local / str(v), ignore_errors=True)

    def _stub_matches(self, target: Path, meta: RemoteFile) -> bool:
        stamp = target / ".etag"
        return stamp.is_file() and stamp.read_text() == meta.etag and (target / METADATA_FILE).is_file()

    def _write_stub(self, name: str, version: int, meta: RemoteFile) -> None:
        tmp = self.cache / name / f".stub-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            self.fs.get_file(f"{self.root}/{name}/{version}/{METADATA_FILE}", str(tmp / METADATA_FILE))
            (tmp / ".etag").write_text(meta.etag)
            _replace_dir(tmp, self.cache / name / str(version))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _sync_file(self, rel: str, local: Path, remote: RemoteFile | None) -> None:
        stamp = local.with_name(local.name + ".etag")
        if remote is None:
            local.unlink(missing_ok=True)
            stamp.unlink(missing_ok=True)
            return
        if local.is_file() and stamp.is_file() and stamp.read_text() == remote.etag:
            return
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}")
        try:
            self.fs.get_file(f"{self.root}/{rel}", str(tmp))
            os.replace(tmp, local)
            stamp.write_text(remote.etag)
        finally:
            tmp.unlink(missing_ok=True)

    def put_rollout(self, name: str) -> None:
        """Upload the model's rollout.json as the cache holds it (after a rollout command ran on the cache), so
        that every replica follows it; raises RemoteError when the store cannot be written."""
        local = self.cache / name / ROLLOUT_FILE
        dest = f"{self.root}/{name}/{ROLLOUT_FILE}"
        try:
            self.fs.put_file(str(local), dest)
            local.with_name(ROLLOUT_FILE + ".etag").write_text(_file(self.fs.info(dest)).etag)
        except Exception as exc:
            raise RemoteError(f"the rollout state could not be written to {self.url}: "
                              f"{exc.__class__.__name__}: {exc}") from exc

    def _drop_model(self, name: str) -> None:
        shutil.rmtree(self.cache / name, ignore_errors=True)

    # -- whole versions ------------------------------------------------------------------------------

    def is_fetched(self, name: str, version: int) -> bool:
        return (self.cache / name / str(version) / COMPLETE).is_file()

    def fetch(self, name: str, version: int, keep: set[tuple[str, int]] = frozenset()) -> Path:  # type: ignore[assignment]
        """Every file of the version in the cache, checked; `keep` are versions being served (never evicted
        to make room). Raises RemoteError, with backoff between attempts after a failure."""
        target = self.cache / name / str(version)
        if self.is_fetched(name, version):
            os.utime(target / COMPLETE)
            return target
        failed = self._fetch_failures.get((name, version))
        if failed is not None and time.monotonic() < failed[1]:
            raise RemoteError(f"{failed[2]} (retrying in {failed[1] - time.monotonic():.0f}s)")
        try:
            return self._fetch(name, version, keep)
        except Exception as exc:
            count = failed[0] + 1 if failed else 1
            reason = exc.args[0] if isinstance(exc, RemoteError) else f"{exc.__class__.__name__}: {exc}"
            retry = time.monotonic() + BACKOFF_S[min(count - 1, len(BACKOFF_S) - 1)]
            self._fetch_failures[(name, version)] = (count, retry, f"fetching {name} version {version}: {reason}")
            raise RemoteError(f"fetching {name} version {version} from {self.url} failed: {reason}") from exc

    def _fetch(self, name: str, version: int, keep: set[tuple[str, int]]) -> Path:
        files = self.listing.get(name, {}).get(version)
        if not files or METADATA_FILE not in files:
            raise RemoteError(f"{name} version {version} is not complete in the store")
        need = sum(f.size for f in files.values())
        self._make_room(need, keep | {(name, version)})
        free = shutil.disk_usage(self.cache).free
        if free < need + (64 << 20):
            raise RemoteError(f"the local disk holding {self.cache} is full: {free} bytes free, {need} needed")
        t0 = time.monotonic()
        tmp = self.cache / name / f".fetch-{uuid.uuid4().hex}"
        try:
            for rel, info in sorted(files.items(), key=lambda kv: kv[0] == METADATA_FILE):  # model.json last
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{self.root}/{name}/{version}/{rel}", str(dest))
                got = dest.stat().st_size
                if got != info.size:
                    raise RemoteError(f"{rel} changed while it was copied ({got} bytes, listed {info.size})")
            now = self.fs.info(f"{self.root}/{name}/{version}/{METADATA_FILE}")
            if _file(now).etag != files[METADATA_FILE].etag:
                raise RemoteError("model.json changed while the version was copied")
            manifest = {rel: {"size": f.size, "etag": f.etag} for rel, f in files.items()}
            (tmp / COMPLETE).write_text(json.dumps(manifest, sort_keys=True))
            (tmp / ".etag").write_text(files[METADATA_FILE].etag)
            _replace_dir(tmp, self.cache / name / str(version))
        except OSError as exc:
            raise RemoteError(f"{exc.__class__.__name__}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._fetch_failures.pop((name, version), None)
        logger.info("fetched %s version %d from %s: %d files, %.1f MB in %.1fs", name, version, self.url, len(files),
                    need / 1e6, time.monotonic() - t0)
        return self.cache / name / str(version)

    def cached_bytes(self) -> int:
        total = 0
        for name in store.list_models(self.cache):
            for v in store.list_versions(self.cache, name):
                if self.is_fetched(name, v):
                    total += sum(f.stat().st_size for f in (self.cache / name / str(v)).rglob("*") if f.is_file())
        return total

    def _make_room(self, need: int, keep: set[tuple[str, int]]) -> None:
        """Turn whole versions not in `keep` back into stubs, least recently used first, until `need` fits."""
        if need > self.max_bytes:
            raise RemoteError(f"the version ({need} bytes) is larger than the cache's limit ({self.max_bytes} bytes: "
                              "IMGSERVE_STORE_CACHE_MAX_GB)")
        fetched = [(self.cache / n / str(v) / COMPLETE, n, v) for n in store.list_models(self.cache)
                   for v in store.list_versions(self.cache, n) if self.is_fetched(n, v)]
        used = self.cached_bytes()
        for marker, n, v in sorted(fetched, key=lambda t: t[0].stat().st_mtime):
            if used + need <= self.max_bytes:
                return
            if (n, v) in keep:
                continue
            folder = marker.parent
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            for child in folder.iterdir():
                if child.name not in (METADATA_FILE, ".etag"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            used -= size
            logger.info("cache: %s version %d evicted (%d bytes) to make room", n, v, size)
        if used + need > self.max_bytes:
            raise RemoteError(f"the cache holds {used} bytes of versions being served; {need} more do not fit "
                              f"its limit of {self.max_bytes} (IMGSERVE_STORE_CACHE_MAX_GB)")


def _file(info: dict[str, Any]) -> RemoteFile:
    etag = info.get("ETag") or info.get("etag") or info.get("md5") or f"{info.get('size')}-{info.get('mtime')}"
    return RemoteFile(int(info.get("size") or 0), str(etag).strip('"'))


def _replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final` (a rename; an older folder there is moved aside first, then removed)."""
    old = final.with_name(f".old-{uuid.uuid4().hex}")
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def publish_version(local: Path, url: str, name: str, endpoint_url: str = "", key: str | None = None,
                    secret: str | None = None) -> int:
    """Upload a version made in a local store (`local` = <store>/<model>/<v>) as the next version of `name` at
    `url`: every file, each size checked, then model.json (with that name and number) last. The number is one
    above every version folder there, complete or not, so an interrupted upload's number is never reused.
    Returns it."""
    fs, root = filesystem(url, endpoint_url, key, secret)
    prefix = f"{root}/{name}"
    existing = []
    with contextlib.suppress(FileNotFoundError):
        existing = [store.parse_version(p.rstrip("/").rsplit("/", 1)[-1]) for p in fs.ls(prefix, detail=False)]
    version = max([v for v in existing if v is not None], default=0) + 1
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != METADATA_FILE)
    for f in files:
        dest = f"{prefix}/{version}/{f.relative_to(local).as_posix()}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)  # object stores have no folders; file systems do
        fs.put_file(str(f), dest)
        size = fs.info(dest)["size"]
        if size != f.stat().st_size:
            raise RemoteError(f"{dest}: uploaded {size} bytes of {f.stat().st_size}")
    doc = json.loads((local / METADATA_FILE).read_text())
    doc.update(name=name, version=version)
    if fs.exists(f"{prefix}/{version}/{METADATA_FILE}"):
        raise RemoteError(f"{name} version {version} was published by someone else meanwhile; publish again")
    fs.pipe_file(f"{prefix}/{version}/{METADATA_FILE}", json.dumps(doc, indent=2, sort_keys=True).encode())
    return version


def env_options() -> dict[str, Any]:
    """S3 endpoint and credentials for `train` (the service reads the same from its settings): the
    IMGSERVE_S3_* variables, else the usual AWS ones."""
    return {"endpoint_url": os.environ.get("IMGSERVE_S3_ENDPOINT_URL", ""),
            "key": os.environ.get("IMGSERVE_S3_ACCESS_KEY_ID") or None,
            "secret": os.environ.get("IMGSERVE_S3_SECRET_ACCESS_KEY") or None}


@contextlib.contextmanager
def staged_mirror(url: str, **options: Any) -> Iterator[Mirror]:
    """A mirror of `url` in a temporary folder, listed once (metadata and rollout files only)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="imgserve-stage-"))
    try:
        fs, root = filesystem(url, **options)
        mirror = Mirror(url, folder, fs, root, max_bytes=1 << 62)
        if not mirror.sync():
            raise RemoteError(f"the model store {url} could not be read: {mirror.error}")
        yield mirror
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged(url: str, name: str, **options: Any) -> Iterator[Path]:
    """A local store standing in for `url` while a version is trained: every complete version of `name`
    as metadata, and the newest one whole (what the new version is compared with). Removed afterwards."""
    with staged_mirror(url, **options) as mirror:
        complete = sorted(v for v, files in mirror.listing.get(name, {}).items() if v and METADATA_FILE in files)
        if complete:
            mirror.fetch(name, complete[-1])
        yield mirror.cache
