"""The README documents every setting and shows the test command CI runs."""

from __future__ import annotations

from service.settings import Settings
from tests.support import REPO


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [f"IMGSERVE_{n.upper()}" for n in Settings.model_fields if f"`IMGSERVE_{n.upper()}`" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme.split("\n\n")[2]
