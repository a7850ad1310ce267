"""The upload page and Swagger UI in headless Chromium (Debian's), served by a real uvicorn; and the client."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client import AsyncClient, Client, PredictionError
from tests.support import REPO, LiveServer, Trained, clothing_images, start_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_upload_page_classifies_and_reports_errors(browser, live: LiveServer, trained: Trained,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844})  # phone-sized
    # a listener from the start turns on Chromium's file-chooser interception long before the keypress:
    # expect_file_chooser alone turns it on without waiting for it, and on a loaded machine the keypress
    # won that race (CI: no filechooser event in 30 s)
    page.on("filechooser", lambda chooser: None)
    page.goto(live.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model").input_value() == "clothing"
    assert page.locator("#version").input_value() == str(trained.version)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    images = clothing_images(2)
    page.set_input_files("#files", [str(images[0]), str(images[1]), str(text)])
    page.wait_for_function("document.querySelectorAll('.card .bar').length >= 10 && "
                           "document.querySelector('.card .error:not([hidden])') !== null", timeout=30000)
    cards = page.locator(".card")
    assert cards.count() == 3
    ok_cards = page.locator(".card:not(.failed)")
    assert ok_cards.count() == 2
    for i in range(2):
        card = ok_cards.nth(i)
        assert card.locator(".bar").count() == 5
        assert card.locator(".bar .label").first.inner_text() in trained.labels
        assert "%" in card.locator(".bar .pct").first.inner_text()
        assert f"clothing v{trained.version} (stable)" in card.locator(".meta").inner_text()
        width = card.locator(".bar .fill").first.evaluate("e => parseFloat(e.style.width)")
        assert 0 < width <= 100
    error = page.locator(".card.failed .error").inner_text()
    assert "not an image" in error
    assert ok_cards.first.locator(".feedback").is_hidden()  # this server stores no feedback: no correction offered
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
    assert (tmp_path / "upload.png").stat().st_size > 1000
    # keyboard only: Tab reaches the drop zone, and Enter on it opens the file chooser, whose image is classified
    page.evaluate("document.activeElement && document.activeElement.blur()")
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if order[-1] == "drop":
            break
    assert order[-1] == "drop", f"Tab never reached the drop zone: {order}"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(images[1]))
    page.wait_for_function("document.querySelectorAll('.card:not(.failed) .bars .bar').length >= 15", timeout=30000)
    assert page.locator(".card").count() == 4


def test_a_correction_sent_from_the_upload_page_is_stored_for_training(browser, trained: Trained,  # type: ignore[no-untyped-def]
                                                                         tmp_path: Path) -> None:
    shutil.copytree(trained.store, tmp_path / "store")
    server = start_server(tmp_path / "store", tmp_path, IMGSERVE_FEEDBACK_DIR=str(tmp_path / "feedback"))
    try:
        page = browser.new_page()
        # the page asks whether feedback is on; that answer is held until a photo is classified, as a slow
        # server may do: the correction is offered once the answer to that question comes
        held = []
        page.route("**/v1/feedback", lambda route: held.append(route) if route.request.method == "GET"
                   else route.continue_())
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        image = clothing_images(3)[2]
        page.set_input_files("#files", [str(image)])
        page.wait_for_function("document.querySelectorAll('.card .bars .bar').length > 0", timeout=30000)
        assert len(held) == 1
        held[0].continue_()
        form = page.locator(".card .feedback")
        form.wait_for(state="visible", timeout=30000)
        predicted = page.locator(".card .bar .label").first.inner_text()
        assert form.locator("select").input_value() == predicted  # the answer, until the user picks another
        right = next(label for label in trained.labels if label != predicted)
        form.locator("select").select_option(right)
        form.locator("select").focus()
        page.keyboard.press("Tab")  # keyboard only: the button is next, Enter sends
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('.card .sent').textContent.startsWith('Saved')",
                               timeout=30000)
        assert f"Saved as {right}" in form.locator(".sent").inner_text()
        stored = list((tmp_path / "feedback" / trained.name / right).iterdir())
        assert [p.read_bytes() for p in stored] == [image.read_bytes()]
        form.locator("button").click()  # sent again: the same photo is stored once
        page.wait_for_function("document.querySelector('.card .sent').textContent.startsWith('Saved')")
        assert len(list((tmp_path / "feedback" / trained.name / right).iterdir())) == 1
    finally:
        server.stop(signal.SIGKILL)


def test_swagger_ui_renders_offline(browser, live: LiveServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.goto(live.url + "/docs")
    page.wait_for_selector(".opblock", timeout=30000)
    summaries = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/predict" in s for s in summaries)
    assert any("/v2/models/{model}/infer" in s for s in summaries)
    assert failed == []  # every asset came from the app itself
    page.screenshot(path=str(tmp_path / "docs.png"))
    # "try it out" on /predict shows a file chooser
    page.locator("#operations-predict-predict_predict_post .opblock-summary").click()
    page.locator("#operations-predict-predict_predict_post .try-out__btn").click()
    assert page.locator("#operations-predict-predict_predict_post input[type=file]").count() >= 1


def test_client_library_and_cli(live: LiveServer, trained: Trained) -> None:
    images = clothing_images(2)
    with Client(live.url) as client:
        answer = client.predict(*images, top_k=3)
        assert answer["model"] == "clothing" and len(answer["predictions"]) == 2
        assert len(answer["predictions"][0]["top"]) == 3
        assert client.models()[0]["name"] == "clothing"
        with pytest.raises(PredictionError) as err:
            client.predict(images[0], model="nope")
        assert err.value.status == 404

    async def run() -> dict[str, object]:
        async with AsyncClient(live.url) as client:
            return await client.predict(images[0])

    assert asyncio.run(run())["version"] == trained.version
    r = subprocess.run([sys.executable, "-m", "service.client", *map(str, images), "--url", live.url,
                        "--top-k", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert images[0].name in r.stdout and "%" in r.stdout
    assert r.stdout.count("%") == 4
