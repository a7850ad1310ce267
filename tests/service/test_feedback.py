"""service/feedback.py on a real folder: the feedback store (content-addressed, one label per photo, nothing
half-written), the recent-images buffer (bounded in bytes, shared by the server's processes) and the
request log (rotated within its bound)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import NotFound
from service.feedback import LOG_FILE, Conflict, FeedbackStore, RecentImages, RequestLog, StorageUnavailable
from tests.support import clothing_images


def test_a_photo_is_stored_once_under_its_label_and_another_label_for_it_is_refused(tmp_path: Path) -> None:
    fs = FeedbackStore(tmp_path)
    photo = clothing_images(1)[0].read_bytes()
    first = fs.save("clothing", "shoes", photo, "JPEG", {"who": "ana"})
    assert first.created and first.path.parent == tmp_path / "clothing" / "shoes"
    assert first.path.suffix == ".jpg" and first.path.read_bytes() == photo
    again = fs.save("clothing", "shoes", photo, "JPEG", {"who": "bo"})
    assert not again.created and again.path == first.path
    with pytest.raises(Conflict, match="already labelled 'shoes'"):
        fs.save("clothing", "hat", photo, "JPEG", {})
    assert not (tmp_path / "clothing" / "hat").exists()
    assert fs.counts("clothing") == {"shoes": 1}
    lines = [json.loads(x) for x in (tmp_path / "clothing" / LOG_FILE).read_text().splitlines()]
    assert [(x["label"], x["who"]) for x in lines] == [("shoes", "ana")]  # the stored one, once


def test_a_full_disk_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FeedbackStore(tmp_path)
    photo = clothing_images(1)[0].read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageUnavailable, match="No space left on device"):
        fs.save("clothing", "shoes", photo, "JPEG", {})
    assert [p.name for p in (tmp_path / "clothing").iterdir()] == [".lock"]  # no class folder, file or log line
    monkeypatch.undo()
    assert fs.save("clothing", "shoes", photo, "JPEG", {}).created  # and it works once there is room


def test_a_feedback_folder_that_is_a_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "clothing").write_text("not a folder")
    with pytest.raises(StorageUnavailable, match="cannot be written"):
        FeedbackStore(tmp_path).save("clothing", "shoes", b"\xff\xd8\xff", "JPEG", {})


def test_recent_images_are_found_by_any_process_and_bounded_in_bytes(tmp_path: Path) -> None:
    one, two = RecentImages(tmp_path, 3000), RecentImages(tmp_path, 3000)  # two server processes
    one.put("req-1", "clothing", 2, ["shoes"], [b"a" * 1000])
    two.put("req-2", "clothing", 2, ["hat", "shirt"], [b"b" * 500, b"c" * 500])
    got = two.get("req-1")  # kept by the other process
    assert (got.model, got.version, got.predicted, got.images) == ("clothing", 2, ["shoes"], [b"a" * 1000])
    assert one.get("req-2").images == [b"b" * 500, b"c" * 500]
    for i in range(3, 6):  # 3 more of 1000 bytes: the oldest goes
        one.put(f"req-{i}", "clothing", 2, ["shoes"], [b"x" * 1000])
    with pytest.raises(NotFound, match="not among the recent predictions"):
        two.get("req-1")
    assert one.get("req-5").images == [b"x" * 1000]
    assert sum(f.stat().st_size for f in one.mine.iterdir() if not f.name.endswith(".json")) <= 3000
    one.put("huge", "clothing", 2, ["shoes"], [b"y" * 4000])  # over the bound alone: not kept
    with pytest.raises(NotFound):
        one.get("huge")
    one.close()
    with pytest.raises(NotFound):
        two.get("req-5")


def test_a_dead_processs_recent_images_are_removed_and_another_hosts_kept(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = proc.stdout.strip()
    here = RecentImages(tmp_path, 100).host
    dead = tmp_path / ".recent" / f"{here}-{pid}-abcd1234"
    elsewhere = tmp_path / ".recent" / f"other_host-{pid}-abcd1234"  # a replica on another host shares the folder
    for d in (dead, elsewhere):
        d.mkdir(parents=True)
        (d / "x.json").write_text("{}")
    RecentImages(tmp_path, 100)
    assert not dead.exists() and elsewhere.exists()


def test_the_request_log_rotates_within_its_bound(tmp_path: Path) -> None:
    log = RequestLog(str(tmp_path / "requests.log"), 50_000, images=False, worker=1)
    for i in range(2000):
        log.write({"request_id": str(i), "model": "m", "top": [[{"label": "a", "score": 0.5}]]}, [b"image"])
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files][:2] == ["requests.1.log", "requests.1.log.1"]  # one file per process
    assert sum(f.stat().st_size for f in files) <= 50_000 + 200
    newest = [json.loads(x) for x in (tmp_path / "requests.1.log").read_text().splitlines()]
    assert newest[-1]["request_id"] == "1999" and "image_b64" not in newest[-1]


def test_the_request_log_carries_images_only_when_asked(tmp_path: Path) -> None:
    log = RequestLog(str(tmp_path / "r.log"), 10_000, images=True)
    log.write({"request_id": "1"}, [b"\x01\x02"])
    log.close()
    assert json.loads((tmp_path / "r.log").read_text())["image_b64"] == ["AQI="]
