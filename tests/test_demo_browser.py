"""speechlm.serving.demo (tools/demo_server.py) on a tiny random run: the upload checks over HTTP, and the page
driven in a real headless Chromium (Selenium + Debian's chromium / chromium-driver): a spoken clip gets an
answer, a transcript and the boundary picture; a non-audio file gets a clear message. The browser test takes a
900 x 700 screenshot and writes it to docs/demo.png when that file is missing or when

``SPEECHLM_DEMO_RUN=runs/tiny`` drives the page with that trained run instead of the random one (how the
README's screenshot was made; it needs the run's models, ~10 s more). A plain test run never replaces the
picture with one of the random model."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from speechlm.serving import demo as mod
from tests.test_inference import ENCODER_NAME, LLM_NAME, build_tiny_run, speech_wav

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "demo.png"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--window-size=900,700"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import torch

    from speechlm.inference import SpeechLMPipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    run, models = build_tiny_run(root)
    pipe = SpeechLMPipeline.from_run(run, llm=models / LLM_NAME, encoder=models / ENCODER_NAME)
    return {"root": root, "run": run, "pipe": pipe, "wav": speech_wav(root / "tom.wav", "Tom went to the store.")}


def serve(pipe, run, **limits):
    """(module, server, base url) of a demo server on a free port, serving from a thread."""
    server = mod.make_server(mod.Demo(pipe, run=str(run), **limits), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return mod, server, f"http://{host}:{port}"


def post(url, data, **query):
    from urllib.parse import urlencode

    req = urllib.request.Request(f"{url}/api/answer?{urlencode(query)}", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream", "X-Filename": "clip.wav"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_and_checks_uploads_over_http(demo_run, tmp_path):
    wav_bytes = demo_run["wav"].read_bytes()  # ~1.4 s, ~46 KB
    _, server, url = serve(demo_run["pipe"], demo_run["run"])
    try:
        with urllib.request.urlopen(f"{url}/", timeout=30) as r:
            assert r.status == 200 and b'id="audio"' in r.read()
        with urllib.request.urlopen(f"{url}/api/info", timeout=30) as r:
            info = json.loads(r.read())
        assert info["chat_template"] and info["max_mb"] == 20 and "{speech}" in info["default_prompt"]
        status, out = post(url, wav_bytes, instruction="Repeat the text.", max_new_tokens="4")
        assert status == 200, out
        assert isinstance(out["answer"], str) and out["transcript"] and out["tokens"]
        assert out["picture"].startswith("data:image/png;base64,") and out["timings"]["total_s"] > 0
        assert out["prompt"] == "Repeat the text.\nText: {speech}\nAnswer:"
        status, out = post(url, b"just some text, no audio at all" * 20)
        assert status == 400 and "not an audio file" in out["error"]
        status, out = post(url, b"")
        assert status == 400 and "empty" in out["error"]
    finally:
        server.shutdown()
    _, server, url = serve(demo_run["pipe"], demo_run["run"], max_mb=0.06, max_seconds=1.0)
    try:
        status, out = post(url, wav_bytes)
        assert status == 400 and "1.4 s long" in out["error"] and "up to 1 s" in out["error"]
        status, out = post(url, b"\0" * 100_000)
        assert status == 413 and "0.1 MB" in out["error"] and "up to 0.06 MB" in out["error"]
    finally:
        server.shutdown()


def test_boundary_picture_is_a_png(demo_run):
    speech = demo_run["pipe"].speech(demo_run["wav"])
    png = mod.boundary_png(speech.wave, 16000, speech.tokens)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (900, 280)


# ------------------------------------------------------------------------------------------ the browser
@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in [*CHROME_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_demo_page_in_headless_chromium(demo_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, run = demo_run["pipe"], demo_run["run"]
    if os.environ.get("SPEECHLM_DEMO_RUN"):
        from speechlm.inference import SpeechLMPipeline

        run = os.environ["SPEECHLM_DEMO_RUN"]
        pipe = SpeechLMPipeline.from_run(run)
    _, server, url = serve(pipe, run)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "connector" in d.find_element(By.ID, "runinfo").text)
        assert "{speech}" in browser.find_element(By.ID, "instruction").get_attribute("value")
        # a spoken clip: answer, transcript and the boundary picture appear
        clip = tmp_path / "tom.wav"
        shutil.copy(demo_run["wav"], clip)
        browser.find_element(By.ID, "audio").send_keys(str(clip))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        answer = browser.find_element(By.ID, "answer").text
        assert answer and answer != "(empty answer)"
        assert browser.find_element(By.ID, "transcript").text
        loaded = "const i = document.getElementById('boundaries'); return i.complete && i.naturalWidth;"
        wait.until(lambda d: d.execute_script(loaded))
        assert browser.execute_script(loaded) == 900
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert "total" in browser.find_element(By.ID, "timings").text
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 900, "height": 700, "deviceScaleFactor": 1, "mobile": False})
        shot = tmp_path / "demo.png"
        browser.save_screenshot(str(shot))
        from PIL import Image

        assert Image.open(shot).size == (900, 700)
        if os.environ.get("SPEECHLM_DEMO_RUN") or not SCREENSHOT.exists():  # the random run never replaces it
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copy(shot, SCREENSHOT)
        # a file that is not audio: the page says so, and no stale answer stays up
        notes = tmp_path / "notes.wav"
        notes.write_text("these are notes, not sound\n" * 20)
        browser.find_element(By.ID, "audio").send_keys(str(notes))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "not an audio file" in browser.find_element(By.ID, "error").text
        assert not browser.find_element(By.ID, "result").is_displayed()
    finally:
        server.shutdown()

