"""The page of the server (``GET /``): upload or record a clip, give an instruction, read the answer -- SSR's
beside the Whisper cascade's when the server has the cascade -- with the transcript the aligner decoded and a
PNG of the LLM-token boundaries over the clip's spectrogram.

Plain HTML + fetch against the server's own API: ``GET /api/info`` (run, limits, cascade on/off) and
``POST /v1/chat/completions`` with the clip as a base64 ``input_audio`` part and ``"speechlm": {"picture": true,
"cascade": ...}``; errors come back in OpenAI's error JSON and are shown as they are. Recordings are turned
into WAV in the browser.
"""

from __future__ import annotations

import io

import torch

from speechlm.inference import TokenSpan


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
  .answers { display: flex; gap: .8rem; }
  .answers > div { flex: 1; min-width: 0; }
  #cascade_answer { background: #eef0f8; padding: .4rem .7rem; border-radius: 6px; white-space: pre-wrap; margin: 0;
                    overflow-wrap: anywhere; }
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
<p class="muted" id="expect">What to expect: a connector trained on a few hours of synthetic speech (the tiny and
  small presets) gets about 4 in 10 tokens right and none it never heard in training, so its transcripts and answers
  are mostly wrong; the 30-hour preset gets 2 in 3, enough to carry what a sentence is about but not what it says
  (its spoken stories add nothing to StoryCloze over the endings alone). The Whisper cascade beside it (Whisper's
  text into the same LLM) shows what the LLM answers when it hears the words. The run's <code>summary.json</code>
  has the measured numbers.</p>
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
      <label id="cascade_opt" hidden><input type="checkbox" id="cascade" checked> Whisper cascade too</label>
      <label id="key_opt" hidden>API key <input type="password" id="api_key" style="width:8em"></label>
      <button type="submit" id="submit">Answer</button>
      <span id="busy" class="muted" hidden>working…</span>
    </div>
  </fieldset>
</form>
<div id="error" role="alert" hidden></div>
<section id="result" hidden>
  <div class="answers">
    <div><h2>Answer (SSR: speech vectors into the LLM)</h2><p id="answer"></p></div>
    <div id="cascade_box" hidden><h2>Whisper cascade (Whisper's text into the LLM)</h2><p id="cascade_answer"></p>
      <div class="muted" id="cascade_transcript"></div></div>
  </div>
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
  $("cascade_opt").hidden = !i.cascade;
  $("key_opt").hidden = !i.api_key_required;
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

function toBase64(blob) {  // Blob -> base64 (no data: prefix)
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(String(fr.result).split(",", 2)[1] || "");
    fr.onerror = () => reject(fr.error);
    fr.readAsDataURL(blob);
  });
}

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
    showError(`The file is ${(body.size / 1048576).toFixed(1)} MB; the server takes files up to ${info.max_mb} MB.`);
    return;
  }
  const name = file ? file.name : "recording.wav";
  const ext = name.split(".").pop().toLowerCase();
  const body_ = {
    model: info ? info.model : undefined, max_tokens: Number($("max_new_tokens").value),
    messages: [{ role: "user", content: [
      { type: "text", text: $("instruction").value },
      { type: "input_audio", input_audio: { data: await toBase64(body), format: ["mp3", "flac"].includes(ext) ? ext : "wav" } },
    ] }],
    speechlm: { chat: $("chat").checked, picture: true, cascade: !!(info && info.cascade && $("cascade").checked) },
  };
  const headers = { "Content-Type": "application/json" };
  if ($("api_key").value) headers.Authorization = `Bearer ${$("api_key").value}`;
  $("submit").disabled = true; $("busy").hidden = false;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(body_), headers });
    const res = await r.json();
    if (!r.ok || res.error) {
      $("result").hidden = true;
      showError(res.error ? res.error.message : `HTTP ${r.status}`);
      return;
    }
    const out = { ...res.speechlm, answer: res.choices[0].message.content };
    $("answer").textContent = out.answer || "(empty answer)";
    $("transcript").textContent = out.transcript || "(the aligner decoded no speech)";
    $("boundaries").src = out.picture;
    const t = out.timings;
    $("timings").innerHTML = "";
    for (const [k, v] of Object.entries({ "clip (s)": out.duration_s, "encoder": t.encode_s, "aligner": t.align_s,
        "connector": t.connector_s, "first token": t.first_token_s, "total": t.total_s })) {
      const row = $("timings").insertRow();
      row.insertCell().textContent = k;
      row.insertCell().textContent = v === undefined ? "-" : k === "clip (s)" ? v.toFixed(2) : `${v.toFixed(3)} s`;
    }
    $("cascade_box").hidden = !out.cascade;
    if (out.cascade) {
      $("cascade_answer").textContent = out.cascade.answer || "(empty answer)";
      $("cascade_transcript").textContent = `Whisper heard: ${out.cascade.transcript}`;
    }
    if (out.no_speech) showError("No speech was found in this clip.");
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
