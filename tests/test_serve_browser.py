"""The web UI in a real browser: Chromium from the distribution's packages, driven by Playwright (no browser
download), against ``stylegrad serve``'s app on 127.0.0.1 with a tiny model. Upload pictures, make a style,
generate with and without it, see both images; drop a generated PNG on PNG info and send it to Generate. A
screenshot is kept in tests/artifacts/."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = os.environ.get("STYLEGRAD_CHROMIUM", "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("STYLEGRAD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"Chromium is missing at {CHROMIUM} (.ci/run installs the distribution's package)")
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set STYLEGRAD_CHROMIUM)")
    import uvicorn

    from stylegrad.apps.serve.app import create_app
    from stylegrad.apps.serve.service import Service
    from stylegrad.apps.serve.settings import ServeSettings
    from stylegrad.pipelines.generation import Generator

    clip_dir, sd_dir = world
    styles = tmp_path_factory.mktemp("ui-styles")
    generator = Generator.load(str(sd_dir), "cpu", str(clip_dir))
    service = Service(generator, ServeSettings(styles_dirs=(str(styles),), max_side=256), clip_model=str(clip_dir))
    port = _free_port()
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_style_generate_and_png_info_in_a_browser(server, tmp_path):
    from stylegrad.world.demo import HERE

    pictures = [str(p) for p in sorted((HERE / "examples").glob("striped-*.png"))[:4]]
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(server, wait_until="networkidle")
            # Style: upload pictures, make the style
            page.locator("#style-files input[type=file]").set_input_files(pictures)
            page.locator("#style-name textarea, #style-name input").first.fill("ui-stripes")
            page.locator("#make-style").click()
            summary = page.locator("#style-summary")
            summary.get_by_text("a style from 4 images").wait_for(timeout=120_000)
            # Generate: prompt, the new style (already picked), with and without it
            page.get_by_role("tab", name="Generate").click()
            page.locator("#prompt textarea").fill("a red triangle")
            page.locator("#generate-button").click()
            gallery = page.locator("#gallery")
            gallery.locator("img").nth(1).wait_for(timeout=180_000)
            assert gallery.locator("img").count() >= 2  # without and with the style
            infotext = page.locator("#infotext textarea")
            page.wait_for_function("() => document.querySelector('#infotext textarea').value.length > 0")
            text = infotext.input_value()
            assert "a red triangle" in text and "Aesthetic embedding: ui-stripes" in text
            page.screenshot(path=str(ARTIFACTS / "serve-generate.png"), full_page=True)
            # download the styled image as the browser has it, then drop it on PNG info
            src = gallery.locator("img").nth(1).get_attribute("src")
            data = page.request.get(src if src.startswith("http") else server + src).body()
            png = tmp_path / "styled.png"
            png.write_bytes(data)
            page.get_by_role("tab", name="PNG info").click()
            page.locator("#png input[type=file]").set_input_files(str(png))
            page.wait_for_function(
                "() => (document.querySelector('#png-text textarea') || {}).value?.includes('a red triangle')",
                timeout=60_000)
            page.locator("#prompt textarea").evaluate("el => { el.value = ''; el.dispatchEvent(new Event('input')); }")
            page.locator("#send-to-generate").click()
            page.wait_for_function(
                "() => document.querySelector('#prompt textarea').value === 'a red triangle'", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "serve-pnginfo.png"), full_page=True)
        finally:
            browser.close()
