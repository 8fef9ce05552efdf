"""The OpenAI-compatible server (speechlm.serving.server) on a tiny random run, driven by the official `openai`
client and httpx: plain, streamed and concurrent answers, usage, the API key, every refusal in OpenAI's error
shape, batching (batched answers equal one-at-a-time ones), a bounded load test, the request timeout, and the
Whisper cascade's answer beside SSR's (a stand-in transcriber)."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.inference import DEFAULT_PROMPT, SpeechLMPipeline
from speechlm.inference.batched import DecodeRequest, PrefixCache, decode_batch, prefix_length
from speechlm.serving.config import ServerConfig
from speechlm.serving.server import BackgroundServer, create_app
from tests.test_inference import ENCODER_NAME, LLM_NAME, build_tiny_run, speech_wav

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    run, models = build_tiny_run(root)
    pipe = SpeechLMPipeline.from_run(run, llm=models / LLM_NAME, encoder=models / ENCODER_NAME)
    wavs = [speech_wav(root / "tom.wav"), speech_wav(root / "cat.wav", "The cat sat on the mat near the door."),
            speech_wav(root / "sun.wav", "Sun.")]
    return {"run": run, "pipe": pipe, "wavs": wavs}


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def messages(path, text: str | None = "Repeat the text.", fmt: str = "wav", data: str | None = None) -> list:
    parts = [{"type": "text", "text": text}] if text is not None else []
    parts.append({"type": "input_audio", "input_audio": {"data": data if data is not None else b64(path), "format": fmt}})
    return [{"role": "user", "content": parts}]


class FakeCascade:
    sample_rate = 16000

    def __init__(self):
        self.calls = 0

    def transcribe(self, waves):
        self.calls += 1
        return ["tom went to the store" for _ in waves]


# ------------------------------------------------------------------------------------------ batched decoding
def test_batched_greedy_answers_equal_one_at_a_time(tiny):
    pipe = tiny["pipe"]
    prompts = [DEFAULT_PROMPT, "Summarize: {speech}\nAnswer:", DEFAULT_PROMPT]
    speeches = [pipe.speech(w) for w in tiny["wavs"]]
    single = [pipe.generate(s, p, max_new_tokens=12) for s, p in zip(speeches, prompts)]
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    reqs = [DecodeRequest(pipe.prefix(p, s), max_new_tokens=12) for s, p in zip(speeches, prompts)]
    assert len({prefix_length(r.prefix) for r in reqs}) == 3  # really different lengths: left padding matters
    outs = decode_batch(pipe.model, pipe.tokenizer, reqs, on_piece=lambda i, p: pieces[i].append(p))
    for one, out, i in zip(single, outs, range(3)):
        assert out.token_ids == one.token_ids and out.answer == one.answer
        assert "".join(pieces[i]) == out.answer
    # the KV cache fed piece by piece (streaming speech in) decodes the same tokens
    cache = PrefixCache(pipe.model)
    for seg in reqs[1].prefix:
        if hasattr(seg, "embeds"):
            for k in range(0, seg.embeds.shape[0], 3):
                cache.extend(type(seg)(seg.embeds[k:k + 3]))
        else:
            cache.extend(seg)
    assert cache.answer(pipe.tokenizer, DecodeRequest([], max_new_tokens=12)).token_ids == single[1].token_ids


# ------------------------------------------------------------------------------------------ the openai client
def test_openai_client_plain_streamed_and_concurrent(tiny):
    pipe, wav = tiny["pipe"], tiny["wavs"][0]
    cascade = FakeCascade()
    cfg = ServerConfig(api_key="sekrit", max_batch=4, max_wait_ms=300)
    app = create_app(pipe, cfg, cascade=cascade, run=str(tiny["run"]))
    expected = pipe.generate(wav, "Repeat the text.\nText: {speech}\nAnswer:", max_new_tokens=8)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["speechlm"]
        r = client.chat.completions.create(model="speechlm", messages=messages(wav), max_tokens=8)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected.answer
        assert r.choices[0].finish_reason in ("stop", "length")
        extra = r.model_extra["speechlm"]
        assert extra["transcript"] == expected.transcript and extra["tokens"] and extra["timings"]["total_s"] > 0
        n_prompt = len(pipe.tokenizer("Repeat the text.\nText:")["input_ids"]) + 1  # + BOS
        assert r.usage.prompt_tokens >= len(extra["tokens"]) + n_prompt - 1
        assert r.usage.completion_tokens == len(expected.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        # streamed: chat.completion.chunk events whose deltas join to the same answer, then usage, then [DONE]
        chunks = list(client.chat.completions.create(model="speechlm", messages=messages(wav), max_tokens=8,
                                                     stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected.answer
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids) and not chunks[-1].choices
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        # concurrent: each answer equals its own one-at-a-time answer, and the scheduler batched them
        clips = tiny["wavs"] * 2
        singles = [pipe.generate(w, DEFAULT_PROMPT, max_new_tokens=8).answer for w in clips]
        with ThreadPoolExecutor(6) as ex:
            outs = list(ex.map(lambda w: client.chat.completions.create(
                model="speechlm", messages=messages(w, text=None), max_tokens=8).choices[0].message.content, clips))
        assert outs == singles
        assert max(app.state.scheduler.batches) > 1
        # the cascade's answer beside SSR's, on request
        r = client.chat.completions.create(model="speechlm", messages=messages(wav), max_tokens=8,
                                           extra_body={"speechlm": {"cascade": True, "picture": True}})
        casc = r.model_extra["speechlm"]["cascade"]
        assert casc["transcript"] == "tom went to the store" and isinstance(casc["answer"], str)
        assert r.model_extra["speechlm"]["picture"].startswith("data:image/png;base64,")
        # no key, wrong key: 401
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/api/info").json()["cascade"] is True


def test_refusals_are_openai_errors_with_the_right_status(tiny, tmp_path):
    wav = tiny["wavs"][0]
    cfg = ServerConfig(max_upload_bytes=60_000, max_audio_s=1.0, max_tokens=16, default_max_tokens=8)
    app = create_app(tiny["pipe"], cfg)
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(int(16000 * 1.5), dtype=np.float32), 16000)
    big = tmp_path / "big.wav"
    sf.write(big, np.zeros(40000, dtype=np.float32), 16000, subtype="FLOAT")  # 160 KB: the body is too large
    bigger = tmp_path / "bigger.wav"
    sf.write(bigger, np.zeros(17500, dtype=np.float32), 16000, subtype="FLOAT")  # 70 KB: the audio is too large
    cases = [
        ({"messages": messages(wav, data="not base64!!")}, 400, "invalid_base64"),
        ({"messages": messages(wav, data=base64.b64encode(b"plain text, no audio" * 20).decode())}, 400,
         "invalid_audio"),
        ({"messages": messages(wav, fmt="ogg")}, 400, "unsupported_audio_format"),
        ({"messages": messages(long_wav)}, 400, "audio_too_long"),
        ({"messages": messages(big)}, 413, "request_too_large"),
        ({"messages": messages(bigger)}, 413, "audio_too_large"),
        ({"messages": messages(long_wav), "max_tokens": 17}, 400, "max_tokens_too_large"),
        ({"messages": [{"role": "user", "content": "no audio"}]}, 400, "audio_required"),
        ({"messages": messages(wav), "model": "gpt-4o"}, 404, "model_not_found"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
        ({"messages": messages(wav), "temperature": 5}, 400, None),
    ]
    with BackgroundServer(app) as url:
        for body, status, code in cases:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == status, (body.get("model"), r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] and err["code"] == code
        r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30)
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", content=b"x" * 200_000, timeout=30)
        assert r.status_code == 413
        assert httpx.get(f"{url}/v1/nothing").json()["error"]["type"] == "not_found_error"
        # a short clip is still answered after all that
        short = tmp_path / "short.wav"
        sf.write(short, sf.read(wav)[0][:14000], 16000)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages(short)}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    with BackgroundServer(create_app(tiny["pipe"], ServerConfig(request_timeout_s=0.001))) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages(wav)}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"


# ------------------------------------------------------------------------------------------ load
class SlowEngine:
    """A stand-in model: 200 ms per batch, answers "ok"; counts what it answered."""

    def __init__(self):
        self.answered = 0
        self.lock = threading.Lock()

    def info(self):
        return {"run": "fake", "sample_rate": 16000, "cascade": False}

    def run_batch(self, jobs):
        import time

        time.sleep(0.2)
        for j in jobs:
            with self.lock:
                self.answered += 1
            j.put("piece", "ok")
            j.put("done", {"answer": "ok", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1,
                           "extras": {"transcript": ""}, "wave": None, "tokens": []})


@pytest.mark.parametrize("engine", ["fake", "tiny"])
def test_fifty_concurrent_requests_are_answered_or_refused_never_lost(tiny, engine):
    import asyncio

    model = SlowEngine() if engine == "fake" else tiny["pipe"]
    cfg = ServerConfig(max_batch=4, max_wait_ms=5, queue_size=4, max_tokens=4, default_max_tokens=4)
    app = create_app(model, cfg)
    buf = io.BytesIO()
    sf.write(buf, sf.read(tiny["wavs"][2])[0], 16000, format="WAV")
    body = {"messages": messages(None, data=base64.b64encode(buf.getvalue()).decode()), "max_tokens": 4}

    async def hammer(url):
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=60)) as c:
            async def one(k):
                return await c.post(f"{url}/v1/chat/completions", json={**body, "stream": k % 2 == 1})
            return await asyncio.gather(*(one(k) for k in range(50)))

    with BackgroundServer(app) as url:
        responses = asyncio.run(hammer(url))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and len(codes) == 50
        assert codes.count(429) > 0 and codes.count(200) >= 4
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                assert r.json()["choices"][0]["message"]["content"] is not None
        if engine == "fake":
            assert model.answered == codes.count(200)
        assert sum(app.state.scheduler.batches) == codes.count(200)
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200  # still alive


def test_config_is_checked_and_silence_is_flagged_not_answered(tiny, tmp_path):
    from speechlm.errors import ConfigError

    for bad in ({"max_batch": 0}, {"queue_size": 0}, {"default_max_tokens": 300}, {"port": 70000},
                {"request_timeout_s": 0}):
        with pytest.raises(ConfigError, match="server config"):
            ServerConfig(**bad)
    with pytest.raises(ConfigError, match="unknown keys"):
        ServerConfig.from_dict({"max_batch": 2, "batch": 3})
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(16000, dtype=np.float32), 16000)
    with BackgroundServer(create_app(tiny["pipe"], ServerConfig())) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages(silence)}, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        extra = out["speechlm"]
        if "no_speech" in extra:  # the pipeline's voice-activity check is there: the speechlm extras pass it on
            assert extra["no_speech"] is True and out["choices"][0]["message"]["content"] == ""
            assert extra["speech_s"] == 0 and out["usage"]["completion_tokens"] == 0
            assert any("no speech" in w for w in extra["warnings"])


def test_serve_cli_refuses_bad_settings_and_missing_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "serve.py"
    r = subprocess.run([sys.executable, str(tool), "--max-batch", "0"], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max_batch must be at least 1" in r.stderr
    r = subprocess.run([sys.executable, str(tool), "--run", str(tmp_path / "nothing"), "--cascade", "off"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "run folder not found" in r.stderr


def test_serving_benchmark_measures_on_the_tiny_run(tiny):
    from speechlm.perf.benchmarks.serving import _request, streaming, throughput

    wave = torch.from_numpy(sf.read(tiny["wavs"][1], dtype="float32")[0])
    r = throughput(tiny["pipe"], _request(wave, 16000, 4), 4, 4)
    assert r["answer_tokens"] == 16 and sum(r["batches"]) == 4 and r["requests_per_s"] > 0
    s = streaming(tiny["pipe"], wave, 0.5, 0.2, 4, context_s=1.0)
    assert s["passes"] >= 2 and s["tokens"] > 0 and s["first_answer_token_after_end_s"]["streamed"] > 0
    assert s["drift"]["offline_tokens"] > 0 and 0 <= s["drift"]["token_match_ratio"] <= 1
