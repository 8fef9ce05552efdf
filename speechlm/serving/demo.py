"""Local web demo of a trained SpeechLM (tools/demo_server.py): upload or record a clip, give an instruction,
read the answer.

The page (plain HTML + fetch, served by the standard library's http.server) shows the answer, the transcript
the aligner decoded, and a PNG of the LLM-token boundaries over the clip's spectrogram. Uploads must decode as
audio (WAV, FLAC, OGG or MP3: whatever soundfile reads; recordings are turned into WAV in the browser), be at
most ``--max-mb`` (20) MB and ``--max-seconds`` (120) s long; otherwise the page says why. The model is loaded
once; requests are answered one at a time. It listens on 127.0.0.1 unless ``--host`` says otherwise.

API: ``POST /api/answer?instruction=...&max_new_tokens=64&chat=0`` with the audio file as the request body
-> JSON (answer, transcript, tokens, timings, duration_s, picture: a PNG data URL) or ``{"error": ...}``
with status 400/413; ``GET /api/info`` -> the run's folders, limits and the default prompt.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import torch

from speechlm.data.audio import audio_info
from speechlm.errors import AudioError, SpeechLMError
from speechlm.inference import (
    DEFAULT_PROMPT,
    DEFAULT_STOP,
    SpeechLMPipeline,
    TokenSpan,
    prompt_from_instruction,
)

log = logging.getLogger("demo_server")

MAX_MB = 20.0
MAX_SECONDS = 120.0
MAX_NEW_TOKENS = 256  # the most a request may ask for


class UploadError(Exception):
    """An upload the demo refuses; the message is shown in the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def boundary_png(wave: torch.Tensor, sample_rate: int, tokens: list[TokenSpan], title: str = "") -> bytes:
    """A 900 x 280 px PNG: the log-mel spectrogram (alignment.plot.log_mel) with one line at the end of each
    LLM token of the transcript and the token's text over its segment (labels left out when too crowded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignment.plot import log_mel

    mel = log_mel(wave, sample_rate)
    duration = wave.shape[0] / sample_rate
    fig, ax = plt.subplots(figsize=(9, 2.8), dpi=100)
    ax.imshow(mel, origin="lower", aspect="auto", extent=(0, duration, 0, mel.shape[0]), cmap="magma",
              vmin=mel.max() - 80)
    label = len(tokens) <= 60
    for k, t in enumerate(tokens):
        ax.axvline(t.end_s, color="cyan", lw=0.9)
        if label:
            ax.text((t.start_s + t.end_s) / 2, mel.shape[0] * (0.9 - 0.08 * (k % 3)), repr(t.token)[1:-1],
                    color="white", fontsize=7, ha="center", clip_on=True)
    ax.set_xlim(0, duration)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(title or f"{len(tokens)} LLM-token boundaries (cyan: end of each token)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class Demo:
    """The loaded pipeline and the upload checks; :meth:`answer` is what the endpoint does."""

    def __init__(self, pipe: SpeechLMPipeline, max_mb: float = MAX_MB, max_seconds: float = MAX_SECONDS,
                 run: str = ""):
        self.pipe = pipe
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.max_mb, self.max_seconds = max_mb, max_seconds
        self.run = run
        self.lock = threading.Lock()  # one request at a time through the model

    def info(self) -> dict:
        f = self.pipe.folders
        return {"run": self.run, "connector": str(f.connector) if f else "", "llm": str(f.llm) if f else "",
                "chat_template": bool(getattr(self.pipe.tokenizer, "chat_template", None)),
                "max_mb": self.max_mb, "max_seconds": self.max_seconds, "default_prompt": DEFAULT_PROMPT,
                "max_new_tokens": MAX_NEW_TOKENS}

    def check_size(self, n_bytes: int) -> None:
        if n_bytes <= 0:
            raise UploadError("The upload is empty: choose an audio file or record a clip.")
        if n_bytes > self.max_bytes:
            raise UploadError(f"The file is {n_bytes / 1024 / 1024:.1f} MB; the demo takes files up to "
                              f"{self.max_mb:g} MB.", status=413)

    def answer(self, data: bytes, name: str = "upload", instruction: str = "", max_new_tokens: int = 64,
               chat: bool = False) -> dict:
        self.check_size(len(data))
        suffix = Path(name).suffix.lower()[:8] if Path(name).suffix else ".audio"
        with tempfile.TemporaryDirectory(prefix="speechlm-demo-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                _, seconds = audio_info(path)
            except AudioError:
                raise UploadError(f"{name!r} is not an audio file the demo can read (WAV, FLAC, OGG or MP3).") from None
            if seconds > self.max_seconds:
                raise UploadError(f"The clip is {seconds:.1f} s long; the demo takes clips up to "
                                  f"{self.max_seconds:g} s.")
            prompt = prompt_from_instruction(instruction)
            with self.lock:
                try:
                    speech = self.pipe.speech(path)
                    result = self.pipe.generate(speech, prompt, max_new_tokens=max(1, min(max_new_tokens, MAX_NEW_TOKENS)),
                                                chat=chat, stop=DEFAULT_STOP)
                except SpeechLMError as e:
                    raise UploadError(str(e).replace(str(path), repr(name))) from None
            png = boundary_png(speech.wave, self.pipe.sample_rate, speech.tokens)
        out = result.to_dict()
        out["picture"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return out


class Handler(BaseHTTPRequestHandler):
    demo: Demo  # set by make_server on a subclass
    server_version = "speechlm-demo"

    def log_message(self, fmt: str, *args) -> None:  # through logging, not raw stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(200, self.demo.info())
        else:
            self._json(404, {"error": f"no page {path}"})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if url.path != "/api/answer":
            self._json(404, {"error": f"no endpoint {url.path}"})
            return
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            n = int(self.headers.get("Content-Length") or 0)
            try:
                self.demo.check_size(n)
            except UploadError:
                self._drain(n)
                raise
            data = self.rfile.read(n)
            out = self.demo.answer(data, name=unquote(self.headers.get("X-Filename") or "upload"),
                                   instruction=q.get("instruction", ""),
                                   max_new_tokens=int(q.get("max_new_tokens") or 64), chat=q.get("chat") == "1")
            self._json(200, out)
        except UploadError as e:
            self._json(e.status, {"error": str(e)})
        except ValueError as e:
            self._json(400, {"error": f"bad request: {e}"})
        except Exception as e:  # noqa: BLE001 -- the page shows it; the server keeps running
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {e}"})

    def _drain(self, n: int) -> None:
        """Read and drop a refused body (so the browser gets the answer, not a reset); very large: close."""
        if n > 256 * 1024 * 1024:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The HTTP server (not started: ``serve_forever()``); port 0 picks a free one (``server.server_address``)."""
    handler = type("DemoHandler", (Handler,), {"demo": demo})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SpeechLM demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font-family: system-ui, sans-serif; margin: .8rem auto; max-width: 860px; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.25rem; margin: 0; }
  h2 { font-size: .95rem; margin: .6rem 0 .25rem; }
  .muted { color: #666; font-size: .8rem; }
  #runinfo { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: .5rem 0; padding: .3rem .7rem .5rem; }
  legend { font-size: .85rem; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; }
  .row { display: flex; gap: .8rem; align-items: center; flex-wrap: wrap; margin: .3rem 0 0; }
  button { font: inherit; padding: .25rem .9rem; }
  #error { background: #fde8e8; border: 1px solid #e0a0a0; color: #8a1111; padding: .4rem .7rem;
           border-radius: 6px; white-space: pre-wrap; margin: .5rem 0; }
  #answer { background: #eef6ee; padding: .4rem .7rem; border-radius: 6px; white-space: pre-wrap; margin: 0;
            overflow-wrap: anywhere; }
  #transcript { font-family: ui-monospace, monospace; font-size: .9rem; background: #f3f3f3; padding: .3rem .6rem;
                border-radius: 6px; margin: 0; overflow-wrap: anywhere; }
  #boundaries { width: 100%; border: 1px solid #ddd; display: block; }
  table { border-collapse: collapse; font-size: .8rem; margin-top: .3rem; }
  td { padding: 0 .8rem 0 0; }
</style>
</head>
<body>
<h1>SpeechLM demo</h1>
<div class="muted" id="runinfo">loading…</div>
<form id="form">
  <fieldset>
    <legend>Speech</legend>
    <div class="row">
      <input type="file" id="audio" accept="audio/*,.wav,.flac,.ogg,.mp3">
      <button type="button" id="record" hidden>● Record</button>
      <span id="recstatus" class="muted"></span>
    </div>
    <audio id="preview" controls hidden></audio>
  </fieldset>
  <fieldset>
    <legend>Instruction (<code>{speech}</code> marks where the speech goes; without it, the speech follows
      the instruction)</legend>
    <textarea id="instruction" rows="3"></textarea>
    <div class="row">
      <label>max new tokens <input type="number" id="max_new_tokens" value="64" min="1" max="256" style="width:5em"></label>
      <label><input type="checkbox" id="chat"> chat template</label>
      <button type="submit" id="submit">Answer</button>
      <span id="busy" class="muted" hidden>working…</span>
    </div>
  </fieldset>
</form>
<div id="error" role="alert" hidden></div>
<section id="result" hidden>
  <h2>Answer</h2>
  <p id="answer"></p>
  <h2>Transcript (decoded by the aligner)</h2>
  <p id="transcript"></p>
  <h2>Token boundaries</h2>
  <img id="boundaries" alt="LLM-token boundaries over the spectrogram">
  <table id="timings"></table>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let info = null, recorded = null, recorder = null;

function showError(msg) { $("error").textContent = msg; $("error").hidden = false; }
function clearError() { $("error").hidden = true; $("error").textContent = ""; }

fetch("/api/info").then((r) => r.json()).then((i) => {
  info = i;
  $("runinfo").textContent = `clips up to ${i.max_seconds} s and ${i.max_mb} MB · run ${i.run || "?"} · ` +
    `connector ${i.connector} · LLM ${i.llm}`;
  $("runinfo").title = $("runinfo").textContent;
  $("instruction").value = i.default_prompt;
  $("max_new_tokens").max = i.max_new_tokens;
  $("chat").disabled = !i.chat_template;
});

// Recording: MediaRecorder's own format (webm/ogg) is decoded in the browser and sent as 16-bit WAV.
if (navigator.mediaDevices && window.MediaRecorder) { $("record").hidden = false; }
$("record").addEventListener("click", async () => {
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const parts = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => parts.push(e.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      $("record").textContent = "● Record";
      const ctx = new AudioContext();
      const buf = await ctx.decodeAudioData(await new Blob(parts).arrayBuffer());
      recorded = toWav(buf);
      $("audio").value = "";
      $("preview").src = URL.createObjectURL(recorded);
      $("preview").hidden = false;
      $("recstatus").textContent = `recorded ${buf.duration.toFixed(1)} s`;
    };
    recorder.start();
    $("record").textContent = "■ Stop";
    $("recstatus").textContent = "recording…";
  } catch (e) { showError(`Cannot record: ${e.message}`); }
});
$("audio").addEventListener("change", () => { recorded = null; $("preview").hidden = true; $("recstatus").textContent = ""; });

function toWav(buf) {  // AudioBuffer -> mono 16-bit PCM WAV Blob
  const n = buf.length, rate = buf.sampleRate, mono = new Float32Array(n);
  for (let c = 0; c < buf.numberOfChannels; c++) {
    const ch = buf.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += ch[i] / buf.numberOfChannels;
  }
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const str = (o, s) => { for (let i = 0; i < s.length; i++) view.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); str(36, "data"); view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 0x7fff, true);
  return new Blob([view], { type: "audio/wav" });
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearError();
  const file = $("audio").files[0];
  const body = file || recorded;
  if (!body) { showError("Choose an audio file or record a clip first."); return; }
  if (info && body.size > info.max_mb * 1024 * 1024) {
    showError(`The file is ${(body.size / 1048576).toFixed(1)} MB; the demo takes files up to ${info.max_mb} MB.`);
    return;
  }
  const q = new URLSearchParams({ instruction: $("instruction").value, max_new_tokens: $("max_new_tokens").value,
                                  chat: $("chat").checked ? "1" : "0" });
  $("submit").disabled = true; $("busy").hidden = false;
  try {
    const r = await fetch(`/api/answer?${q}`, { method: "POST", body,
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file ? file.name : "recording.wav") } });
    const out = await r.json();
    if (!r.ok || out.error) { $("result").hidden = true; showError(out.error || `HTTP ${r.status}`); return; }
    $("answer").textContent = out.answer || "(empty answer)";
    $("transcript").textContent = out.transcript || "(the aligner decoded no speech)";
    $("boundaries").src = out.picture;
    const t = out.timings;
    $("timings").innerHTML = "";
    for (const [k, v] of Object.entries({ "clip (s)": out.duration_s, "encoder": t.encode_s, "aligner": t.align_s,
        "connector": t.connector_s, "first token": t.first_token_s, "total": t.total_s })) {
      const row = $("timings").insertRow();
      row.insertCell().textContent = k;
      row.insertCell().textContent = k === "clip (s)" ? v.toFixed(2) : `${v.toFixed(3)} s`;
    }
    if (out.warnings && out.warnings.length) showError(out.warnings.join("\n"));
    $("result").hidden = false;
  } catch (e) {
    showError(`Request failed: ${e.message}`);
  } finally {
    $("submit").disabled = false; $("busy").hidden = true;
  }
});
</script>
</body>
</html>
"""
