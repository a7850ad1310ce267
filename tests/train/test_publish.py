"""`python -m train publish`: a published version copied into another store, a folder or S3 (moto's real
server on 127.0.0.1), as the next version there, model.json last; `--if-missing` makes it idempotent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.store import read_metadata
from tests.support import S3, Trained
from train.__main__ import main

pytestmark = pytest.mark.slow  # a model trained by `train`


def files(version_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(version_dir).as_posix(): p.read_bytes() for p in sorted(version_dir.rglob("*"))
            if p.is_file() and p.name != "model.json"}


def test_a_version_is_copied_into_a_folder_store_as_its_next_version(trained: Trained, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = trained.store / trained.name / str(trained.version)
    dest = tmp_path / "prod"
    assert main(["publish", str(source), "--store", str(dest), "--name", "shirts"]) == 0
    assert main(["publish", str(trained.store / trained.name), "--store", str(dest), "--name", "shirts"]) == 0
    assert sorted(p.name for p in (dest / "shirts").iterdir() if not p.name.startswith(".")) == ["1", "2"]
    meta = read_metadata(dest / "shirts" / "2", name="shirts", version=2)  # valid, with its new name and number
    assert meta.labels == trained.labels
    assert files(dest / "shirts" / "2") == files(source)
    assert not [p for p in (dest / "shirts").iterdir() if p.name.startswith(".tmp-")]
    assert "published " + str(dest / "shirts" / "2") in capsys.readouterr().out
    # --if-missing: the model is there already, nothing is copied
    assert main(["publish", str(source), "--store", str(dest), "--name", "shirts", "--if-missing"]) == 0
    assert not (dest / "shirts" / "3").exists()
    assert "already in" in capsys.readouterr().out


def test_a_version_is_copied_into_s3_and_if_missing_copies_it_once(trained: Trained, s3: S3,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSERVE_S3_ENDPOINT_URL", s3.endpoint)
    source = trained.store / trained.name
    for _ in range(2):
        assert main(["publish", str(source), "--store", s3.url, "--if-missing"]) == 0
    keys = s3.keys()
    assert {k.split("/")[2] for k in keys} == {"1"}, sorted(keys)  # one version, copied once
    local = files(source / str(trained.version))
    assert {k.removeprefix(f"models/{trained.name}/1/"): size for k, size in keys.items()
            if not k.endswith("model.json")} == {k: len(v) for k, v in local.items()}
    doc = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f"models/{trained.name}/1/model.json")["Body"]
                     .read())
    assert doc["name"] == trained.name and doc["version"] == 1


def test_a_source_that_is_not_a_version_is_refused_with_the_reason(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    trained: Trained) -> None:
    half = tmp_path / "store" / "shirts" / "1"  # a version folder without its model.json: incomplete
    shutil.copytree(trained.store / trained.name / str(trained.version), half,
                    ignore=shutil.ignore_patterns("model.json"))
    assert main(["publish", str(half.parent), "--store", str(tmp_path / "dest")]) == 2
    assert "neither a version folder" in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()
