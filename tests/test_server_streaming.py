"""Speech streamed in (speechlm.serving.streaming) on a tiny random run: with the causal SSR connector, vectors
emitted chunk by chunk equal the offline ones given the same frames and boundaries (max abs difference < 1e-5);
the full scheme (Whisper re-encoded every hop, the aligner in free mode) closes tokens before the audio ends and
answers exactly what the same vectors answer in one batch; the WebSocket endpoint speaks its protocol."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from speechlm.inference import DEFAULT_PROMPT, SpeechLMPipeline
from speechlm.inference.batched import DecodeRequest, decode_batch
from speechlm.models.speechlm import SpeechSegment
from speechlm.serving.config import ServerConfig
from speechlm.serving.streaming import StreamingSession
from tests.test_inference import ENCODER_NAME, LLM_NAME, build_tiny_run, speech_wav

TOLERANCE = 1e-5  # fp32, same frames and boundaries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stream")
    run, models = build_tiny_run(root)
    pipe = SpeechLMPipeline.from_run(run, llm=models / LLM_NAME, encoder=models / ENCODER_NAME)
    wav = speech_wav(root / "cat.wav", "The cat sat on the mat, and the dog ran to the door.")
    wave = torch.from_numpy(sf.read(wav, dtype="float32")[0])
    return {"pipe": pipe, "wav": wav, "wave": wave}


def chunks(wave: torch.Tensor, seconds: float = 0.1):
    n = int(16000 * seconds)
    return [wave[k:k + n].numpy() for k in range(0, wave.numel(), n)]


@pytest.fixture(params=["causal", "blockwise"])
def mask(tiny, request):
    cfg = tiny["pipe"].model.connector.cfg
    before, cfg.mask = cfg.mask, request.param
    yield request.param
    cfg.mask = before


def test_causal_connector_streams_the_offline_vectors(tiny, mask):
    """Both SSR masks only look back (blockwise: inside the token's own segment), so both stream exactly."""
    pipe, wave = tiny["pipe"], tiny["wave"]
    assert pipe.model.connector.cfg.mask == mask
    with torch.no_grad():
        enc = pipe.model.encoder([wave])
        [res] = pipe.aligner.align(enc.features, enc.lengths, [None], target_frame_rate_hz=50.0,
                                   target_num_frames=[int(enc.lengths[0])])
        bounds = torch.tensor([res.token_boundaries])
        offline = pipe.model.speech_embeds(enc.features, enc.lengths, bounds, torch.ones_like(bounds, dtype=torch.bool))
    offline = offline.embeds[0]
    assert len(res.token_ids) >= 8

    def features(w):  # a causal encoder: the offline frames the audio so far covers
        t = int(pipe.model.encoder.frame_lengths(torch.tensor([w.numel()]))[0])
        return enc.features[:, :, :t], torch.tensor([t])

    def align(f, lengths):  # the offline boundaries the frames so far reach
        n = sum(1 for b in res.token_boundaries if b < int(lengths[0]))
        return list(res.token_ids[:n]), list(res.token_boundaries[:n])

    # gate=False: the random aligner's boundaries include tokens in the clip's edge silence; exactness is the point
    s = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=0.2, margin_s=0.2, features_fn=features, align_fn=align,
                         gate=False)
    early = [t for c in chunks(wave) for t in s.push(c)]
    assert early and len(s.passes) > 3  # tokens closed while the audio was still coming
    s.finish()
    streamed = s.segment.embeds
    assert [t.id for t in s.tokens] == list(res.token_ids)
    assert streamed.shape == offline.shape
    assert float((streamed - offline).abs().max()) < TOLERANCE
    assert all(t.audio_s >= t.end_s for t in early)


def test_streaming_session_with_whisper_and_free_alignment_answers_like_a_batch(tiny):
    pipe, wave = tiny["pipe"], tiny["wave"]
    s = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=0.3, margin_s=0.2)
    early = [t for c in chunks(wave) for t in s.push(c)]
    late = s.finish()
    assert early and late is not None and s.tokens
    ends = [t.end_s for t in s.tokens]
    assert ends == sorted(ends) and ends[-1] <= wave.numel() / 16000 + 0.05
    assert all(t.latency_s >= 0 for t in s.tokens)
    out = s.answer(DecodeRequest([], max_new_tokens=10))
    # the same vectors through the batched decoder: the same greedy answer
    speech = pipe.speech((wave, 16000))
    prefix = pipe.prefix(DEFAULT_PROMPT, speech)
    prefix[1] = SpeechSegment(s.segment.embeds)
    [ref] = decode_batch(pipe.model, pipe.tokenizer, [DecodeRequest(prefix, max_new_tokens=10)])
    assert out.token_ids == ref.token_ids and out.answer == ref.answer


def test_websocket_stream_protocol(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from speechlm.serving.server import create_app

    pipe, wave = tiny["pipe"], tiny["wave"]
    app = create_app(pipe, ServerConfig(stream_hop_s=0.3, api_key="k"))
    pcm = (wave.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes()
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/audio/stream") as ws:
            ws.receive_json()  # no key: the handshake is refused
        with client.websocket_connect("/v1/audio/stream?api_key=k") as ws:
            ws.send_text(json.dumps({"type": "start", "instruction": "", "max_tokens": 6}))
            for k in range(0, len(pcm), 3200):
                ws.send_bytes(pcm[k:k + 3200])
            ws.send_text(json.dumps({"type": "end"}))
            events = []
            while True:
                ev = ws.receive_json()
                events.append(ev)
                if ev["type"] in ("done", "error"):
                    break
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "done" and "tokens" in kinds, kinds
        done = events[-1]
        tokens = [t for e in events if e["type"] == "tokens" for t in e["tokens"]]
        assert "".join(t["token"] for t in tokens).strip() == done["transcript"]
        assert "".join(e["content"] for e in events if e["type"] == "delta") == done["answer"]
        assert done["usage"]["completion_tokens"] <= 6 and done["latency"]["first_answer_token_s"] > 0
        # odd byte counts and a wrong rate are refused with an error event
        with client.websocket_connect("/v1/audio/stream?api_key=k") as ws:
            ws.send_bytes(b"\x00\x01\x02")
            ev = ws.receive_json()
            assert ev["type"] == "error" and "whole number" in ev["error"]["message"]
        with client.websocket_connect("/v1/audio/stream?api_key=k") as ws:
            ws.send_text(json.dumps({"type": "start", "sample_rate": 8000}))
            assert "16000 Hz" in ws.receive_json()["error"]["message"]


def test_a_sliding_window_keeps_clip_times_and_order(tiny):
    """Past ``window_s`` only the last window is re-encoded; boundaries stay in the clip's time."""
    pipe, wave = tiny["pipe"], tiny["wave"]
    long = torch.cat([wave, wave, wave])
    s = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=0.5, margin_s=0.2, window_s=2.0)
    for c in chunks(long):
        s.push(c)
    s.finish()
    ends = [t.end_s for t in s.tokens]
    total = long.numel() / 16000
    assert ends == sorted(ends) and ends[-1] <= total + 0.05
    assert ends[-1] > total - 2.0 and sum(e > 2.0 for e in ends) > len(ends) // 2  # later windows' tokens
    assert s.prompt_tokens == s.cache.length
    # re-encoding only 1 s before the last closed token: the same bookkeeping, shorter passes
    c = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=0.5, margin_s=0.2, context_s=1.0)
    for piece in chunks(long):
        c.push(piece)
    c.finish()
    ends = [t.end_s for t in c.tokens]
    assert ends == sorted(ends) and ends[-1] <= total + 0.05 and len(ends) > 10


def test_silence_streamed_in_becomes_no_tokens_and_a_refusal(tiny):
    """The pipeline's voice-activity detector gates the stream too: nothing is emitted from silence or noise."""
    pipe, wave = tiny["pipe"], tiny["wave"]
    for quiet in (torch.zeros(3 * 16000), torch.randn(3 * 16000, generator=torch.Generator().manual_seed(0)) * 0.3):
        s = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=0.5)
        assert not [t for c in chunks(quiet, 0.25) for t in s.push(c)]
        s.finish()
        out = s.answer(DecodeRequest([], max_new_tokens=5))
        assert s.no_speech and s.speech_s == 0 and not s.tokens
        assert out.answer == "" and out.finish_reason == "no_speech" and out.token_ids == []
    # 2 s of silence, then the sentence: no token ends inside the silence
    padded = torch.cat([torch.zeros(2 * 16000), wave])
    s = StreamingSession(pipe, DEFAULT_PROMPT, hop_s=0.5)
    for c in chunks(padded, 0.25):
        s.push(c)
    s.finish()
    assert s.tokens and not s.no_speech and 0 < s.speech_s <= wave.numel() / 16000 + 0.2
    assert min(t.end_s for t in s.tokens) > 1.9
