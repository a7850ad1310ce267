"""The model store contract: names, versions, metadata, atomic and concurrent publishing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from service import store
from tests.support import write_fake_version

META = {"created_at": "2026-01-01T00:00:00Z", "labels": ["a", "b"], "backbone": "cnn",
        "input": {"height": 8, "width": 8, "channels": 3, "dtype": "uint8", "color": "RGB"}}


@pytest.mark.parametrize("name", ["a", "clothing", "vgg16.v2", "x_y-z", "0" * 64])
def test_valid_names(name: str) -> None:
    assert store.is_model_name(name)


@pytest.mark.parametrize("name", ["", "A", "../x", ".hidden", "-x", "a/b", "0" * 65, "a b"])
def test_invalid_names(name: str) -> None:
    assert not store.is_model_name(name)


def test_only_positive_integers_are_versions(tmp_path: Path) -> None:
    for d in ["1", "2", "10", "01", "0", "-1", "x", ".tmp-abc", "3.5"]:
        (tmp_path / "m" / d).mkdir(parents=True)
    (tmp_path / "m" / "7").write_text("a file, not a folder")
    assert store.list_versions(tmp_path, "m") == [1, 2, 10]
    assert store.list_models(tmp_path) == ["m"]


def test_metadata_validation_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(store.StoreError, match="missing"):
        store.read_metadata(tmp_path)
    (tmp_path / "model.json").write_text("[]")
    with pytest.raises(store.StoreError, match="not a JSON object"):
        store.read_metadata(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**META, "format": 1, "name": "m", "version": 1,
                                                     "labels": ["only-one"]}))
    with pytest.raises(store.StoreError, match="labels"):
        store.read_metadata(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**META, "format": 1, "name": "m", "version": 2}))
    with pytest.raises(store.StoreError, match="folder 1"):
        store.read_metadata(tmp_path, name="m", version=1)


def test_publish_numbers_versions_and_writes_metadata_last(tmp_path: Path) -> None:
    seen_meta_during_write = []

    def write(tmp: Path) -> None:
        seen_meta_during_write.append((tmp / "model.json").exists())
        (tmp / "saved_model.pb").write_bytes(b"x")

    v1 = store.publish(tmp_path, "m", write, META)
    v2 = store.publish(tmp_path, "m", write, META)
    assert (v1.name, v2.name) == ("1", "2")
    assert seen_meta_during_write == [False, False]
    meta = store.read_metadata(v2, name="m", version=2)
    assert meta.labels == ["a", "b"] and meta.input.height == 8
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp-")]


def test_failed_publish_leaves_nothing(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "saved_model.pb").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.publish(tmp_path, "m", write, META)
    assert store.list_versions(tmp_path, "m") == []
    assert list((tmp_path / "m").iterdir()) == []


def test_concurrent_publishers_never_clobber(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        def write(tmp: Path) -> None:
            (tmp / "who").write_text(str(i))
            time.sleep(0.01)

        try:
            store.publish(tmp_path, "m", write, META)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.list_versions(tmp_path, "m") == list(range(1, 9))
    whos = sorted((tmp_path / "m" / str(v) / "who").read_text() for v in range(1, 9))
    assert whos == [str(i) for i in range(8)]
    for v in range(1, 9):
        assert store.read_metadata(tmp_path / "m" / str(v)).version == v


def test_reader_never_sees_a_partial_version(tmp_path: Path) -> None:
    """While versions are being written, every version a scanner finds is complete."""
    stop = threading.Event()
    partial: list[str] = []

    def scan() -> None:
        while not stop.is_set():
            for v in store.list_versions(tmp_path, "m"):
                d = tmp_path / "m" / str(v)
                files = {p.name for p in d.iterdir()} if d.exists() else set()
                if files != {"a", "b", "c", "model.json"}:
                    partial.append(f"{v}: {sorted(files)}")

    def write(tmp: Path) -> None:
        for name in ("a", "b", "c"):
            (tmp / name).write_bytes(b"x" * 10000)
            time.sleep(0.002)

    t = threading.Thread(target=scan)
    t.start()
    for _ in range(15):
        store.publish(tmp_path, "m", write, META)
    stop.set()
    t.join()
    assert partial == []
    assert store.list_versions(tmp_path, "m") == list(range(1, 16))


def test_fake_helper_publishes(tmp_path: Path) -> None:
    assert write_fake_version(tmp_path, "m", 1, ["a", "b"]).name == "1"


def test_savedmodel_digest_follows_the_graph_and_variables(tmp_path: Path) -> None:
    """A variant names the SavedModel it was made from by this digest; any change to either part shows."""
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"graph")
    (tmp_path / "variables" / "variables.index").write_bytes(b"index")
    (tmp_path / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights")
    first = store.savedmodel_digest(tmp_path)
    assert len(first) == 64 and store.savedmodel_digest(tmp_path) == first
    (tmp_path / "variables" / "variables.data-00000-of-00001").write_bytes(b"weightz")
    assert store.savedmodel_digest(tmp_path) != first
    (tmp_path / "saved_model.pb").unlink()
    assert store.savedmodel_digest(tmp_path).startswith("incomplete")
