"""End-to-end tests run against one server process and, where more than one process changes what is
tested (batching, overload, metrics, draining, bad input beside good), also against two behind one port
(IMGSERVE_WORKERS=2, the supervisor). A module says which with `SERVER_PROCESSES` (default: one), a test
with `@pytest.mark.server_processes("1")`; servers a test starts inherit the setting from the environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

DEFAULT_PROCESS_COUNTS = ["1"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server_processes" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("server_processes")
        counts = list(marker.args) if marker else getattr(metafunc.module, "SERVER_PROCESSES", DEFAULT_PROCESS_COUNTS)
        metafunc.parametrize("server_processes", counts, indirect=True, scope="module",
                             ids=[f"{n}proc" for n in counts])


@pytest.fixture(scope="module", autouse=True)
def server_processes(request: pytest.FixtureRequest) -> Iterator[int]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGSERVE_WORKERS", request.param)
        yield int(request.param)
