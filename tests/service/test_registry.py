"""The registry (service/registry.py) with a fake runtime: which version a request resolves to, swapping
in a new version while the old one finishes its requests, unloading, and the drain cut-off."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from service.batcher import BatcherStopped
from service.errors import BadRequest, NotFound, NotReady
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings
from tests.support import LABELS, FakeClassifier, write_fake_version


def registry(store: Path, loader: object = None, **settings: object) -> Registry:
    return Registry(Settings(model_store=store, **settings), Metrics(),  # type: ignore[arg-type]
                    loader or (lambda p, m: FakeClassifier(m)))  # type: ignore[arg-type]


async def test_resolve_names_what_is_served(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    with pytest.raises(NotReady):
        reg.resolve(None)
    write_fake_version(tmp_path, "a", 1, LABELS)
    await reg.scan()
    assert reg.resolve(None).name == "a"  # the only model
    write_fake_version(tmp_path, "b", 1, LABELS)
    await reg.scan()
    with pytest.raises(BadRequest, match="several models are served \\(a, b\\)"):
        reg.resolve(None)
    with pytest.raises(NotFound, match="served models: a, b"):
        reg.resolve("c")
    with pytest.raises(NotFound, match="loaded version: 1"):
        reg.resolve("a", 2)
    assert registry(tmp_path, default_model="b").resolve is not None
    await reg.stop(1)


async def test_a_new_version_is_swapped_in_and_the_old_one_retired_after_its_requests(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1, LABELS)
    reg = registry(tmp_path)
    await reg.scan()
    old = reg.resolve("m")
    with old.acquire():  # a request still holds version 1
        write_fake_version(tmp_path, "m", 2, LABELS)
        await reg.scan()
        assert reg.resolve("m").version == 2  # new requests go to 2 at once
        await asyncio.sleep(0)
        assert old.batcher.accepting  # but 1 is not stopped under its request
    await asyncio.wait_for(asyncio.gather(*reg._retiring), 10)
    assert not old.batcher.accepting  # retired once its request was done
    await reg.stop(1)


async def test_unload_and_load_again(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1, LABELS)
    reg = registry(tmp_path)
    await reg.scan()
    await reg.unload("m")
    with pytest.raises(NotReady):
        reg.resolve("m")
    await reg.scan()
    assert "m" not in reg.served  # a scan does not bring an unloaded model back
    assert (await reg.load("m")).version == 1
    with pytest.raises(NotFound, match="not in the model store"):
        await reg.load("nope")
    await reg.stop(1)


async def test_the_drain_gives_up_on_queued_rows_at_the_timeout(tmp_path: Path) -> None:
    """Rows still queued when the drain timeout passes fail with BatcherStopped (a 503 for their callers);
    the registry's stop returns instead of waiting for a model that never finishes."""
    write_fake_version(tmp_path, "m", 1, LABELS)
    gate = threading.Event()
    gate.set()

    class Held(FakeClassifier):
        def predict(self, images: np.ndarray) -> np.ndarray:
            gate.wait(60)
            return super().predict(images)

    reg = registry(tmp_path, loader=lambda p, m: Held(m), max_batch_size=1, inline_run_max_ms=0)
    await reg.scan()
    gate.clear()
    served = reg.resolve("m")
    row = np.zeros((16, 16, 3), np.uint8)
    futures = served.batcher.submit([row]) + served.batcher.submit([row]) + served.batcher.submit([row])
    await asyncio.wait_for(reg.stop(0.2), 30)
    settled = await asyncio.gather(*futures[1:], return_exceptions=True)
    assert any(isinstance(r, BatcherStopped) for r in settled), settled
    gate.set()
