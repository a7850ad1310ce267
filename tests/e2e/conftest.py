"""Every end-to-end test runs twice: against one server process and against two behind one port
(IMGSERVE_WORKERS=2, the supervisor). Servers a test starts inherit the setting from the environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

PROCESS_COUNTS = ["1", "2"]


@pytest.fixture(scope="module", autouse=True, params=PROCESS_COUNTS, ids=lambda n: f"{n}proc")
def server_processes(request: pytest.FixtureRequest) -> Iterator[int]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGSERVE_WORKERS", request.param)
        yield int(request.param)
