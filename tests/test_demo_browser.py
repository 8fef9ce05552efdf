"""The page of the server (speechlm.serving.page, served at / by speechlm.serving.server; tools/serve.py) on a
tiny random run: the page and its info over HTTP, and the page driven in a real headless Chromium (Selenium +
Debian's chromium / chromium-driver): a spoken clip gets SSR's answer beside the Whisper cascade's (a stand-in
transcriber here), a transcript and the boundary picture; a non-audio file gets a clear message. The browser test
takes a 900 x 700 screenshot and writes it to docs/demo.png when that file is missing or when

``SPEECHLM_DEMO_RUN=runs/tiny`` drives the page with that trained run instead of the random one (how the
README's screenshot was made; it needs the run's models, ~10 s more; the embedded whisper-base is the cascade
when it is there). A plain test run never replaces the picture with one of the random model."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from speechlm.serving import page as mod
from speechlm.serving.config import ServerConfig
from tests.test_inference import ENCODER_NAME, LLM_NAME, build_tiny_run, speech_wav

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "demo.png"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--window-size=900,700"]


class FakeCascade:
    sample_rate = 16000

    def transcribe(self, waves):
        return ["tom went to the store" for _ in waves]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import torch

    from speechlm.inference import SpeechLMPipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    run, models = build_tiny_run(root)
    pipe = SpeechLMPipeline.from_run(run, llm=models / LLM_NAME, encoder=models / ENCODER_NAME)
    return {"root": root, "run": run, "pipe": pipe, "wav": speech_wav(root / "tom.wav", "Tom went to the store.")}


def serve(pipe, run, cascade=None, **limits):
    """A BackgroundServer of the new server with the page (use as a context manager: its value is the base url)."""
    from speechlm.serving.server import BackgroundServer, create_app

    return BackgroundServer(create_app(pipe, ServerConfig(**limits), cascade=cascade, run=str(run)))


def test_page_and_info_over_http(demo_run):
    import httpx

    wav_b64 = base64.b64encode(demo_run["wav"].read_bytes()).decode()
    with serve(demo_run["pipe"], demo_run["run"], cascade=FakeCascade()) as url:
        r = httpx.get(f"{url}/", timeout=30)
        assert r.status_code == 200 and 'id="audio"' in r.text and "/v1/chat/completions" in r.text
        info = httpx.get(f"{url}/api/info", timeout=30).json()
        assert info["chat_template"] and info["max_mb"] == 20 and "{speech}" in info["default_prompt"]
        assert info["cascade"] is True and info["model"] == "speechlm"
        body = {"model": "speechlm", "max_tokens": 4, "speechlm": {"picture": True, "cascade": True},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Repeat the text."},
                              {"type": "input_audio", "input_audio": {"data": wav_b64, "format": "wav"}}]}]}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        extra = out["speechlm"]
        assert isinstance(out["choices"][0]["message"]["content"], str) and extra["transcript"] and extra["tokens"]
        assert extra["picture"].startswith("data:image/png;base64,") and extra["timings"]["total_s"] > 0
        assert extra["prompt"] == "Repeat the text.\nText: {speech}\nAnswer:"
        assert extra["cascade"]["transcript"] == "tom went to the store"


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

    pipe, run, cascade = demo_run["pipe"], demo_run["run"], FakeCascade()
    if os.environ.get("SPEECHLM_DEMO_RUN"):
        from speechlm.inference import SpeechLMPipeline
        from speechlm.serving.launch import cascade_folder

        run = os.environ["SPEECHLM_DEMO_RUN"]
        pipe = SpeechLMPipeline.from_run(run)
        folder = cascade_folder("auto")
        if folder is not None:
            from speechlm.eval.asr import WhisperCascade

            cascade = WhisperCascade(folder)
    with serve(pipe, run, cascade=cascade) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "connector" in d.find_element(By.ID, "runinfo").text)
        assert "{speech}" in browser.find_element(By.ID, "instruction").get_attribute("value")
        assert "cascade" in browser.find_element(By.ID, "expect").text  # the page says what the model can do
        # a spoken clip: answer, transcript and the boundary picture appear
        clip = tmp_path / "tom.wav"
        shutil.copy(demo_run["wav"], clip)
        browser.find_element(By.ID, "audio").send_keys(str(clip))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        answer = browser.find_element(By.ID, "answer").text
        assert answer and answer != "(empty answer)"
        assert browser.find_element(By.ID, "cascade_box").is_displayed()  # Whisper's answer beside SSR's
        assert browser.find_element(By.ID, "cascade_answer").text
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

