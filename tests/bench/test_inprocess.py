"""bench.inprocess drives the real app through ASGI and measures it; its figure must be a real one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_it_answers_real_requests_and_reports_the_decoder_inside_the_total() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.inprocess", "--requests", "50", "--rounds", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["rounds_us_per_request"]) == 2
    assert 0 < res["us_decode"] < res["us_per_request"]  # the request decodes the image, and does more


def test_a_refused_request_fails_the_run_instead_of_being_timed() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.inprocess", "--requests", "5", "--rounds", "1",
                        "--query", "top_k=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "/predict answered 422" in r.stderr


def test_a_presized_body_is_sent_at_the_model_size_and_answered() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.inprocess", "--requests", "20", "--rounds", "1",
                        "--size", "224", "--presized"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    image = (REPO / res["image"]).read_bytes()  # an absolute path stays as it is
    assert res["size"] == 224 and res["presized"] is True
    assert 0 < res["body_bytes"] < len(image)  # re-encoded smaller than the photo it came from
    assert 0 < res["us_decode"] < res["us_per_request"]


def test_a_multipart_body_is_answered_and_costs_more_than_its_image() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.inprocess", "--requests", "20", "--rounds", "1",
                        "--multipart"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]  # a refused upload fails the run (the test above)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    image = (REPO / res["image"]).read_bytes()
    assert res["multipart"] is True and res["body_bytes"] > len(image)  # the part's headers and boundaries
    assert 0 < res["us_decode"] < res["us_per_request"]


def test_cpu_targets_carry_their_settings() -> None:
    from bench.cpu import _target

    assert _target("before=/tmp/x:1") == ("before", Path("/tmp/x"), "1", {})
    assert _target("tf=.:auto,IMGSERVE_CONVERT_SAVEDMODEL=false,IMGSERVE_MAX_BATCH_SIZE=8") == (
        "tf", REPO.resolve(), "auto", {"IMGSERVE_CONVERT_SAVEDMODEL": "false", "IMGSERVE_MAX_BATCH_SIZE": "8"})
