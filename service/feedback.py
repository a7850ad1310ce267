"""Feedback that becomes training data, the images of recent predictions, and the request log.

    IMGSERVE_FEEDBACK_DIR/<model>/<label>/<sha256 of the photo>.<jpg|png|webp|bmp>

is the folder-per-class layout `python -m train --data` reads, so `--extra-data FEEDBACK_DIR/<model>` adds
the corrections to a training run. A file is named by its content: the same photo twice is stored once,
and the same photo with another label is refused (409) naming the label it has. A file is written under
a hidden name and renamed into place, under a per-model lock (several server processes share the folder):
nothing is ever half-written. `feedback.jsonl` beside the classes records who said what, and when.

The recent-images buffer (`IMGSERVE_RECENT_IMAGES_MB`, off by default) keeps the images of the last
predictions on disk under FEEDBACK_DIR/.recent, one folder per host and server process, bounded in bytes per
process, so that any process can find a request's images by its id (X-Request-ID) when feedback names it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import NotFound, ServiceError

logger = logging.getLogger(__name__)

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")  # a folder name, and a class name train reads
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
RECENT = ".recent"
LOG_FILE = "feedback.jsonl"


class Conflict(ServiceError):
    status_code, code = 409, "conflict"


class StorageUnavailable(ServiceError):
    status_code, code = 503, "feedback_storage_unavailable"


@dataclass(frozen=True)
class Saved:
    path: Path
    created: bool  # False: the same photo with the same label was there already
    sha256: str


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeedbackStore:
    """Labelled photos in the folder layout `train` reads (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, model: str, sha: str, image_format: str | None = None) -> Path | None:
        """Where this photo is stored, whatever its label: one look per class (the same bytes always have the
        same format, so the same extension), not a listing of every stored photo."""
        try:
            classes = [e.path for e in os.scandir(self.root / model) if e.is_dir() and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return None
        exts = [EXTENSIONS[image_format]] if image_format else list(EXTENSIONS.values())
        return next((p for d in classes for x in exts if (p := Path(d) / f"{sha[:32]}.{x}").is_file()), None)

    def counts(self, model: str) -> dict[str, int]:
        folder = self.root / model
        if not folder.is_dir():
            return {}
        return {d.name: sum(1 for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
                for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}

    def save(self, model: str, label: str, data: bytes, image_format: str, record: dict[str, Any]) -> Saved:
        sha = digest(data)
        try:
            folder = self.root / model
            folder.mkdir(parents=True, exist_ok=True)
            with self._lock(folder):
                existing = self.find(model, sha, image_format)
                if existing is not None:
                    if existing.parent.name != label:
                        raise Conflict(f"this photo is already labelled {existing.parent.name!r} "
                                       f"({existing.relative_to(self.root)}); remove that file to label it again")
                    return Saved(existing, False, sha)
                dest = folder / label / f"{sha[:32]}.{EXTENSIONS[image_format]}"
                self._write(dest, data)
                line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "label": label,
                        "file": str(dest.relative_to(folder)), "sha256": sha, **record}
                with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
                    log.write(json.dumps(line, sort_keys=True) + "\n")
                return Saved(dest, True, sha)
        except OSError as exc:
            raise StorageUnavailable(f"the feedback folder cannot be written ({exc.strerror or exc}); nothing was "
                                     "stored") from exc

    @staticmethod
    def _write(dest: Path, data: bytes) -> None:
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                dest.parent.rmdir()  # a class folder made for this photo alone
            raise

    @staticmethod
    @contextlib.contextmanager
    def _lock(folder: Path) -> Any:
        with open(folder / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Recent:
    """A recent prediction's images, as the buffer holds them."""

    model: str
    version: int
    predicted: list[str]
    images: list[bytes]


class RecentImages:
    """The images of this process's recent predictions, bounded in bytes (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root / RECENT
        self.max_bytes = max_bytes
        # <host>-<pid>-<random>: replicas on other hosts (or in other containers) may share the folder
        self.host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
        self.mine = self.root / f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sizes: OrderedDict[str, int] = OrderedDict()
        self.bytes = 0
        self._clean_dead()
        self.mine.mkdir(parents=True)

    def _clean_dead(self) -> None:
        """Folders of this host's server processes that are gone (a crash, a restart) hold nothing anyone can
        ask for; another host's folders are its own to clean."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            host, pid, *_ = [*d.name.split("-"), "", ""]  # the host name has no '-' (see __init__)
            if host == self.host and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def key(request_id: str) -> str:
        return hashlib.sha256(request_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]

    def put(self, request_id: str, model: str, version: int, predicted: list[str], images: list[bytes]) -> None:
        size = sum(len(b) for b in images)
        if size > self.max_bytes:
            return
        key = self.key(request_id)
        try:
            if key in self.sizes:
                self._drop(key)
            for i, blob in enumerate(images):
                (self.mine / f"{key}-{i}").write_bytes(blob)
            (self.mine / f"{key}.json").write_text(json.dumps({"model": model, "version": version,
                                                               "predicted": predicted, "images": len(images)}))
        except OSError as exc:  # the buffer is a convenience: a prediction never fails for it
            logger.warning("recent images: %s", exc)
            return
        self.sizes[key] = size
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.sizes)))

    def _drop(self, key: str) -> None:
        self.bytes -= self.sizes.pop(key)
        for f in self.mine.glob(f"{key}*"):
            f.unlink(missing_ok=True)

    def get(self, request_id: str) -> Recent:
        key = self.key(request_id)
        for meta in self.root.glob(f"*/{key}.json"):
            try:
                doc = json.loads(meta.read_text())
                images = [(meta.parent / f"{key}-{i}").read_bytes() for i in range(int(doc["images"]))]
            except (OSError, ValueError, KeyError):
                continue  # evicted while being read
            return Recent(doc["model"], int(doc["version"]), list(doc["predicted"]), images)
        raise NotFound(f"request {request_id!r} is not among the recent predictions kept "
                       "(IMGSERVE_RECENT_IMAGES_MB); send the image itself")

    def close(self) -> None:
        shutil.rmtree(self.mine, ignore_errors=True)


class RequestLog:
    """One JSON line per answer, to standard output or a rotated file (IMGSERVE_REQUEST_LOG)."""

    def __init__(self, target: str, max_bytes: int, images: bool, worker: int | None = None) -> None:
        self.images = images
        self.logger = logging.getLogger(f"imgserve.requests.{uuid.uuid4().hex[:8]}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        handler: logging.Handler
        if target == "-":
            handler = logging.StreamHandler(sys.stdout)
            self.path = None
        else:
            path = Path(target)
            if worker is not None:  # one file per server process: rotation is never shared
                path = path.with_name(f"{path.stem}.{worker}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            # the file and its 4 rotated copies share the bound
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max(1, max_bytes // 5), backupCount=4,
                                                           encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        self.handler = handler

    def write(self, doc: dict[str, Any], blobs: list[bytes]) -> None:
        if self.images and blobs:
            doc["image_b64"] = [base64.b64encode(b).decode() for b in blobs]
        self.logger.info(json.dumps(doc, separators=(",", ":")))

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
