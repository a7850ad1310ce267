"""Fixtures: the shared dataset, a real model trained by `train`, and a real server on a copy of it.
Helpers live in tests/support.py."""

from __future__ import annotations

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# in-process apps serve no gRPC unless a test asks (a real server from tests/support.py gets a free port)
os.environ.setdefault("IMGSERVE_GRPC_PORT", "0")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.support import CLOTHING, S3, SLOW_TEST, LiveServer, Trained, free_port, start_server  # noqa: E402

# What only slow tests may use: the quick loop (`-m "not slow"`) trains nothing and starts no server.
SLOW_FIXTURES = {"trained", "live"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        if needs and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(sorted(needs))} but is not marked slow")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist (`make test`: three workers, a file to each at a time, in this order, as
        # `--no-loadscope-reorder` keeps it) the workers cannot know which of them will get the compose
        # file, so nobody builds its images ahead: it goes first instead, and its worker builds while the
        # others work through the rest. The slow files follow and the quick ones come last, so that the
        # workers end close together. (Here, not at collection's end: xdist reads the order first.)
        items.sort(key=lambda item: (item.get_closest_marker("compose") is None,
                                     item.get_closest_marker("slow") is None))


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected
def pytest_collection_finish(session: pytest.Session) -> None:
    """In one process, the compose tests run last and their engine and image build (tests/deploy/engine.py)
    starts now, in the background, so the minutes it takes overlap the rest of the suite."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # ordered in pytest_collection_modifyitems
    items = session.items
    compose = [item for item in items if item.get_closest_marker("compose")]
    if compose and len(compose) < len(items) and not session.config.option.collectonly:
        from tests.deploy.engine import BUILD

        items[:] = [item for item in items if item not in compose] + compose
        BUILD.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.deploy.engine import BUILD

    BUILD.stop()


@pytest.fixture(autouse=True)
def _only_slow_tests_start_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    SLOW_TEST.value = request.node.get_closest_marker("slow") is not None
    yield
    SLOW_TEST.value = True


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a loopback port, for the whole session (each test makes its own bucket)."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> S3:
    bucket = S3(s3_endpoint, f"models-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket


@pytest.fixture(scope="session")
def clothing() -> Path:
    if not CLOTHING.is_dir():
        pytest.fail(f"the shared dataset is missing at {CLOTHING}")
    return CLOTHING


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, clothing: Path) -> Trained:
    """A real SavedModel published by `train`: a small CNN on a few clothing photos per class."""
    from train.pipeline import TrainConfig, run

    store_dir = tmp_path_factory.mktemp("store")
    result = run(TrainConfig(data=clothing, store=store_dir, name="clothing", backbone="cnn", weights="none",
                             image_size=48, max_per_class=6, head_epochs=2, batch_size=16, workers=2))
    meta = json.loads((result.version_dir / "model.json").read_text())
    return Trained(store_dir, "clothing", meta["version"], 48, 48, meta["labels"], list(result.test_paths))


@pytest.fixture
def live(trained: Trained, tmp_path: Path) -> Iterator[LiveServer]:
    """A real server on a private copy of the trained store (tests may publish into it)."""
    store = tmp_path / "store"
    shutil.copytree(trained.store, store)
    server = start_server(store, tmp_path)
    yield server
    server.stop(signal.SIGKILL if server.proc.poll() is None else 0)
