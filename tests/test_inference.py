"""speechlm.inference and tools/infer.py (speechlm.serving.batch) on a tiny random run: loading, decoding options, streaming, scores,
chunking of long clips, boundaries in seconds, clear errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.data.vad import VADConfig
from speechlm.errors import AudioError, ConfigError, ModelError
from speechlm.inference import (
    DEFAULT_PROMPT,
    GenerationStream,
    NoSpeechError,
    SpeechLMPipeline,
    TextAssembler,
    pick_token,
    prompt_from_instruction,
    resolve_run,
)
from speechlm.models.speechlm import TextSegment
from speechlm.serving.batch import answer_files, list_inputs, unescape
from tests.alignment_helpers import byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "Tom went to the store."
LLM_NAME, ENCODER_NAME = "tiny-llm", "tiny-whisper"
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}")


# ------------------------------------------------------------------------------------------ the tiny run
def build_tiny_run(root: Path) -> tuple[Path, Path]:
    """A run folder with random tiny models, laid out like runs/tiny: ``run/stage2/connector`` (SSR, config
    naming its LLM and encoder), ``run/aligner`` (charCTC); the LLM (+ byte-level BPE tokenizer with a chat
    template) and the Whisper encoder in ``models/`` (point SPEECHLM_MODELS there, or pass the folders).
    Returns (run, models)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    from alignment.ctc_model import CTCAligner, char_ctc_config
    from speechlm.models.connectors import build_connector

    torch.manual_seed(0)
    models, run = root / "models", root / "run"
    tok = byte_level_bpe()
    tok.chat_template = CHAT_TEMPLATE
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                                       tie_word_embeddings=False))
    with torch.no_grad():  # readable answers: other tokens' logits are 0, below the best printable one's
        unreadable = [i for i in range(len(tok)) if not (tok.decode([i]).isascii() and tok.decode([i]).isprintable())]
        llm.lm_head.weight[unreadable] = 0.0
        llm.lm_head.weight.mul_(3.0)
    llm.save_pretrained(models / LLM_NAME)
    tok.save_pretrained(models / LLM_NAME)
    whisper = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                            max_source_positions=1500, vocab_size=100, max_target_positions=32, pad_token_id=1,
                            bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    WhisperForConditionalGeneration(whisper).save_pretrained(models / ENCODER_NAME)
    WhisperFeatureExtractor().save_pretrained(models / ENCODER_NAME)
    build_connector({"name": "ssr", "d_enc": 32, "d_llm": 32, "d_model": 16, "n_heads": 2, "n_layers": 1, "stack": 2,
                     "encoder_name": ENCODER_NAME, "encoder_layers": [2], "llm_name": LLM_NAME,
                     "llm_vocab_size": len(tok)}).save_pretrained(run / "stage2" / "connector")
    CTCAligner(char_ctc_config(input_dim=32, d_model=32, layers=1, heads=2, dropout=0.0,
                               encoder_name=str(models / ENCODER_NAME), encoder_layers=[2])
               ).save_pretrained(run / "aligner")
    return run, models


def speech_wav(path: Path, text: str = SENTENCE) -> Path:
    from speechlm.data.audio import save_audio
    from speechlm.data.tts import synthesize

    s = synthesize(text, voice="en-us")
    save_audio(path, s.wave, s.sample_rate)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    run, models = build_tiny_run(root)
    torch.set_num_threads(1)
    pipe = SpeechLMPipeline.from_run(run, llm=models / LLM_NAME, encoder=models / ENCODER_NAME)
    return {"run": run, "models": models, "pipe": pipe, "wav": speech_wav(root / "tom.wav")}


# ------------------------------------------------------------------------------------------ loading
def test_from_run_finds_the_connector_the_aligner_and_the_models(tiny, tmp_path, monkeypatch):
    run, models = tiny["run"], tiny["models"]
    monkeypatch.setenv("SPEECHLM_MODELS", str(models))
    f = resolve_run(run)
    assert (f.connector, f.aligner, f.llm, f.encoder) == (run / "stage2/connector", run / "aligner",
                                                          models / LLM_NAME, models / ENCODER_NAME)
    assert resolve_run(run / "stage2/connector").aligner == run / "aligner"  # a connector folder: its run's aligner
    # stage 1 only: its connector
    other = tmp_path / "run1"
    shutil.copytree(run / "aligner", other / "aligner")
    shutil.copytree(run / "stage2/connector", other / "stage1/connector")
    assert resolve_run(other).connector == other / "stage1/connector"
    pipe = SpeechLMPipeline.from_run(other)  # everything from the connector's config + SPEECHLM_MODELS
    assert pipe.folders.llm == models / LLM_NAME and pipe.sample_rate == 16000
    # overrides win; missing pieces are clear errors
    assert resolve_run(run, llm=tmp_path).llm == tmp_path
    with pytest.raises(ModelError, match="no trained connector"):
        resolve_run(tmp_path)
    with pytest.raises(ModelError, match="run folder not found"):
        resolve_run(tmp_path / "nothing")
    shutil.rmtree(other / "aligner")
    with pytest.raises(ModelError, match="needs an aligner"):
        resolve_run(other)
    monkeypatch.setenv("SPEECHLM_MODELS", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="LLM 'tiny-llm'.*--llm"):
        resolve_run(run)


def test_bad_audio_and_prompts_are_clear_errors(tiny, tmp_path):
    pipe = tiny["pipe"]
    with pytest.raises(AudioError, match="not found"):
        pipe.generate(tmp_path / "missing.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(AudioError, match="cannot read audio"):
        pipe.generate(tmp_path / "corrupt.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty|cannot read"):
        pipe.generate(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="empty"):
        pipe.generate((np.zeros(0, dtype=np.float32), 16000))
    with pytest.raises(AudioError, match="1-D"):
        pipe.generate((np.zeros((2, 800), dtype=np.float32), 16000))
    with pytest.raises(AudioError, match="sample_rate"):
        pipe.generate(np.zeros(800, dtype=np.float32))
    with pytest.raises(AudioError, match="NaN"):
        pipe.generate((np.full(800, np.nan, dtype=np.float32), 16000))
    assert pipe.generate((np.zeros(100, dtype=np.float32), 16000)).no_speech  # the detector hears nothing
    with pytest.raises(AudioError, match="shorter than one encoder frame"):  # without it the encoder refuses
        SpeechLMPipeline(pipe.model, pipe.aligner, vad=VADConfig(enabled=False)).generate(
            (np.zeros(100, dtype=np.float32), 16000))
    with pytest.raises(ConfigError, match="placeholder"):
        pipe.generate(tiny["wav"], prompt="no speech here")
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate(tiny["wav"], max_new_tokens=0)


# ------------------------------------------------------------------------------------------ generation
def test_greedy_is_deterministic_and_is_speechlm_generate(tiny):
    pipe = tiny["pipe"]
    a = pipe.generate(tiny["wav"], max_new_tokens=10, stop=[])
    b = pipe.generate(str(tiny["wav"]), max_new_tokens=10, stop=[])
    assert a.answer == b.answer and a.token_ids == b.token_ids and len(a.token_ids) >= 1
    speech = pipe.speech(tiny["wav"])
    want = pipe.model.generate([pipe.prefix(DEFAULT_PROMPT, speech)], 10, eos=pipe.tokenizer.eos_token_id)[0]
    assert a.token_ids == want
    # the same clip as a waveform at another rate (resampled) and as a prepared Speech
    wave, sr = sf.read(tiny["wav"], dtype="float32")
    assert pipe.generate(speech, max_new_tokens=10, stop=[]).token_ids == want
    assert len(pipe.generate((wave, sr), max_new_tokens=10, stop=[]).token_ids) >= 1
    assert a.transcript and len(a.tokens) == len(speech.segment.ids) == speech.segment.embeds.shape[0]
    assert set(a.timings) == {"vad_s", "encode_s", "align_s", "connector_s", "first_token_s", "total_s"}
    assert 0 < a.timings["first_token_s"] <= a.timings["total_s"]


def test_sampling_with_a_seed_is_reproducible(tiny):
    pipe, wav = tiny["pipe"], tiny["wav"]
    runs = {seed: pipe.generate(wav, max_new_tokens=8, stop=[], temperature=1.5, seed=seed).token_ids
            for seed in (1, 2, 3)}
    assert pipe.generate(wav, max_new_tokens=8, stop=[], temperature=1.5, seed=2).token_ids == runs[2]
    assert len({tuple(v) for v in runs.values()}) > 1  # different seeds, different draws
    greedy = pipe.generate(wav, max_new_tokens=8, stop=[]).token_ids
    assert pipe.generate(wav, max_new_tokens=8, stop=[], temperature=1.5, top_p=1e-6, seed=5).token_ids == greedy


def test_pick_token_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert pick_token(logits) == 0
    draws = {pick_token(logits, 1.0, 0.7, g) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: the two best only
    assert {pick_token(logits, 1.0, 1.0, g) for _ in range(400)} == {0, 1, 2, 3}


def test_max_new_tokens_and_stop_strings(tiny):
    pipe, wav, tok = tiny["pipe"], tiny["wav"], tiny["pipe"].tokenizer
    for n in (1, 3):
        assert 1 <= len(pipe.generate(wav, max_new_tokens=n, stop=[]).token_ids) <= n
    full = pipe.generate(wav, max_new_tokens=16, stop=[])
    raw = tok.decode(full.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    body = raw.strip()
    stop = next(c for c in body[len(body) // 3:] if c.isascii() and c.isalnum())  # a character from the middle
    cut = pipe.generate(wav, max_new_tokens=16, stop=["\u2603", stop])
    assert cut.answer == raw[:raw.find(stop)].strip() and stop not in cut.answer
    assert len(cut.token_ids) < len(full.token_ids) or cut.token_ids == full.token_ids


def test_stream_pieces_join_to_the_answer(tiny):
    pipe, wav = tiny["pipe"], tiny["wav"]
    for stop in ([], ["\n"], ["xq", "e"]):
        answer = pipe.generate(wav, max_new_tokens=16, stop=stop)
        stream = pipe.generate(wav, max_new_tokens=16, stop=stop, stream=True)
        assert isinstance(stream, GenerationStream)
        pieces = list(stream)
        assert "".join(pieces) == answer.answer == stream.result.answer
        assert stream.result.token_ids == answer.token_ids
    with pytest.raises(ValueError, match="one clip"):
        pipe.generate([wav, wav], stream=True)


def test_text_assembler_holds_back_possible_stop_strings():
    tok = byte_level_bpe()
    ids = tok("  hello wonderful world\nbye", add_special_tokens=False)["input_ids"]
    text = TextAssembler(tok, ["world"])
    pieces = [text.push(t) for t in ids if not text.stopped]
    pieces.append(text.finish())
    assert "".join(pieces) == text.answer == "hello wonderful"
    released = ["".join(pieces[:k]) for k in range(1, len(pieces))]
    assert not any(r.endswith(("w", "wo", "wor", "worl", " ")) for r in released)  # held: could become "world"
    assert any(r.endswith(" won") for r in released)  # and released once it cannot
    text = TextAssembler(tok, ["\n"])
    pieces = [text.push(t) for t in ids if not text.stopped] + [text.finish()]
    assert "".join(pieces) == "hello wonderful world" and text.stopped
    # a stop string in the leading whitespace does not end the answer before it begins
    ids = tok("\n\n hello\nbye", add_special_tokens=False)["input_ids"]
    text = TextAssembler(tok, ["\n"])
    pieces = [text.push(t) for t in ids if not text.stopped] + [text.finish()]
    assert "".join(pieces) == text.answer == "hello" and text.stopped


def test_batches_chat_and_instructions(tiny):
    pipe, wav = tiny["pipe"], tiny["wav"]
    one = pipe.generate(wav, max_new_tokens=5, stop=[])
    both = pipe.generate([wav, wav], max_new_tokens=5, stop=[])
    assert [r.token_ids for r in both] == [one.token_ids] * 2
    chat = pipe.generate(wav, "Summarize: {speech}", chat=True, max_new_tokens=4)
    speech = pipe.speech(wav)
    prefix = pipe.prefix("Summarize: {speech}", speech, chat=True)
    assert pipe.tokenizer.decode(prefix[0].ids) == "<|endoftext|>user: Summarize: "
    assert pipe.tokenizer.decode(prefix[2].ids) == "\n<|endoftext|>assistant:"
    assert chat.prompt == "Summarize: {speech}"
    assert prompt_from_instruction("Summarize.") == "Summarize.\nText: {speech}\nAnswer:"
    assert prompt_from_instruction("  ") == DEFAULT_PROMPT and prompt_from_instruction("a {speech} b") == "a {speech} b"


def test_a_clip_without_decoded_speech_is_flagged_and_answered_by_policy(tiny):
    import copy

    from alignment.aligner import Aligner

    pipe = tiny["pipe"]
    deaf = copy.deepcopy(pipe.aligner.model)
    with torch.no_grad():
        deaf.ctc_head.bias[0] = 1e4  # the blank always wins: free mode decodes nothing
    quiet = SpeechLMPipeline(pipe.model, Aligner(deaf, pipe.tokenizer))
    refused = quiet.generate(tiny["wav"], max_new_tokens=3, stop=[])  # speech detected, but nothing decoded
    assert refused.no_speech and refused.speech_s > 0 and refused.answer == "" and refused.token_ids == []
    assert "no speech decoded" in refused.warnings[0] and "not answered" in refused.warnings[-1]
    result = quiet.generate(tiny["wav"], max_new_tokens=3, stop=[], no_speech="answer")
    assert result.transcript == "" and result.tokens == [] and 1 <= len(result.token_ids) <= 3
    assert result.no_speech and len(result.warnings) == 2 and "prompt alone" in result.warnings[1]
    assert quiet.speech(tiny["wav"]).segment.embeds.shape == (0, 32)


def test_a_connector_without_boundaries_needs_no_aligner(tiny):
    from speechlm.models.connectors import build_connector
    from speechlm.models.speechlm import SpeechLM

    pipe = tiny["pipe"]
    stack = build_connector({"name": "stack", "d_enc": 32, "d_llm": 32, "stack": 8, "hidden": 16,
                             "encoder_layers": [2]})
    model = SpeechLM(stack, pipe.model.llm, tokenizer=pipe.tokenizer, encoder=pipe.model.encoder)
    result = SpeechLMPipeline(model).generate(tiny["wav"], max_new_tokens=3, stop=[])
    assert result.transcript == "" and result.tokens == [] and 1 <= len(result.token_ids) <= 3
    frames = int(pipe.model.encoder.frame_lengths(torch.tensor([sf.info(str(tiny['wav'])).frames]))[0])
    whole = SpeechLMPipeline(model, vad=VADConfig(enabled=False))
    assert whole.speech(tiny["wav"]).segment.embeds.shape[0] == math.ceil(frames / 8)
    speech = SpeechLMPipeline(model).speech(tiny["wav"])  # the detected speech only
    [(a, b)] = speech.chunks
    frames = int(pipe.model.encoder.frame_lengths(torch.tensor([round(b * 16000) - round(a * 16000)]))[0])
    assert speech.segment.embeds.shape[0] == math.ceil(frames / 8) and not speech.no_speech


# ------------------------------------------------------------------------------------------ scores
def test_score_is_speechlm_score(tiny):
    pipe, wav = tiny["pipe"], tiny["wav"]
    s = pipe.score(wav, " the cat sat")
    assert math.isfinite(s) and s < 0
    speech = pipe.speech(wav)
    ids = pipe.tokenizer(" the cat sat", add_special_tokens=False)["input_ids"]
    want = float(pipe.model.score([pipe.prefix("{speech}", speech)], [ids])[0].sum())
    assert s == pytest.approx(want, abs=1e-5)
    both = pipe.score([wav, wav], [" the cat sat", " a dog"])
    assert len(both) == 2 and both[0] == pytest.approx(s, abs=1e-5) and math.isfinite(both[1])
    assert pipe.score(wav, " the cat sat", prompt="Text: {speech} means") != pytest.approx(s)
    with pytest.raises(ValueError, match="continuations"):
        pipe.score([wav, wav], [" a", " b", " c"])


# ------------------------------------------------------------------------------------------ long clips
def test_a_long_clip_is_cut_at_quiet_points_and_its_vectors_concatenated(tiny):
    from speechlm.data.tts import synthesize

    pipe = SpeechLMPipeline(tiny["pipe"].model, tiny["pipe"].aligner, vad=VADConfig(enabled=False))
    parts = []
    for k, text in enumerate(["Tom went to the store.", "He bought some bread and milk.", "Then he walked home."] * 6):
        wave = synthesize(text, voice="en-us").wave.numpy()
        parts += [wave, np.zeros(int(16000 * (0.3 + 0.1 * (k % 4))), dtype=np.float32)]
    wave = np.concatenate(parts)
    assert wave.size > 31 * 16000
    bounds = pipe.chunk_bounds(torch.from_numpy(wave))
    assert len(bounds) >= 2 and bounds[0][0] == 0 and bounds[-1][1] == wave.size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous
    assert all(e - s <= 25 * 16000 for s, e in bounds)
    for _, cut in bounds[:-1]:
        assert np.abs(wave[cut - 160:cut + 160]).max() < 0.01  # cut in a pause
    speech = pipe.speech((wave, 16000))
    per_chunk = [pipe.speech((wave[s:e], 16000)) for s, e in bounds]
    assert speech.segment.embeds.shape[0] == sum(p.segment.embeds.shape[0] for p in per_chunk) > 0
    assert speech.segment.ids == [t for p in per_chunk for t in p.segment.ids]
    assert len(speech.chunks) == len(bounds) and speech.duration_s == pytest.approx(wave.size / 16000)
    check_boundaries(speech.tokens, speech.duration_s)
    assert speech.tokens[-1].start_s > 25.0  # the later windows' boundaries are shifted by their start
    result = pipe.generate(speech, max_new_tokens=3)
    assert result.tokens == speech.tokens and len(result.chunks) == len(bounds)
    # with the detector: one window per sentence, every token inside one, nothing decoded in the pauses
    gated = tiny["pipe"].speech((wave, 16000))
    assert len(gated.chunks) == 18 and gated.chunks == gated.regions
    assert gated.speech_s < 0.9 * gated.duration_s
    assert all(any(a - 1e-6 <= t.start_s <= t.end_s <= b + 1e-6 for a, b in gated.chunks) for t in gated.tokens)


def check_boundaries(tokens, duration_s):
    assert tokens
    for a, b in itertools.pairwise(tokens):
        assert a.end_s <= b.end_s and a.start_s <= b.start_s
    assert all(0 <= t.start_s <= t.end_s <= duration_s + 1e-6 for t in tokens)


def test_boundaries_in_seconds_are_ordered_and_inside_the_clip(tiny):
    result = tiny["pipe"].generate(tiny["wav"], max_new_tokens=2)
    duration = sf.info(str(tiny["wav"])).duration
    assert result.duration_s == pytest.approx(duration, abs=1e-3)
    check_boundaries(result.tokens, duration)
    row = result.to_dict()
    assert [t["token"] for t in row["tokens"]] == [t.token for t in result.tokens]
    assert json.loads(json.dumps(row)) == row


# ------------------------------------------------------------------------------------------ the CLI
def run_infer(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), *args], check=False, capture_output=True,
                          text=True, timeout=600)


def test_infer_cli_reports_a_corrupt_file_and_answers_the_good_one(tiny, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(tiny["wav"], folder / "good.wav")
    (folder / "bad.wav").write_bytes(b"\x00\x01 definitely not audio" * 50)
    (folder / "notes.txt").write_text("not an audio extension: ignored")
    out = tmp_path / "answers.jsonl"
    args = ["--run", str(tiny["run"]), "--llm", str(tiny["models"] / LLM_NAME), "--encoder",
            str(tiny["models"] / ENCODER_NAME), "--out", str(out), "--max-new-tokens", "4", "--threads", "1"]
    done = run_infer([str(folder), *args])
    assert done.returncode == 0, done.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["bad", "good"]
    assert "cannot read audio" in rows["bad"]["error"] and "answer" not in rows["bad"]
    good = rows["good"]
    assert "error" not in good and isinstance(good["answer"], str) and good["transcript"]
    assert good["audio"].endswith("good.wav") and good["prompt"] == DEFAULT_PROMPT
    assert good["tokens"] and {"token", "start_s", "end_s"} <= set(good["tokens"][0]) and "total_s" in good["timings"]
    assert "bad" in done.stderr and "cannot read audio" in done.stderr and "1 answered, 1 skipped" in done.stderr
    # a manifest: its rows' audio paths (relative to the manifest), ids, and a malformed row reported
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "u1", "audio": "clips/good.wav", "text": "x"}) + "\n{oops\n")
    assert unescape("\\n") == "\n"
    skipped = []
    rows, failed = answer_files(tiny["pipe"], list_inputs(manifest), DEFAULT_PROMPT, max_new_tokens=4,
                                stop=[unescape("\\n")], progress=False, on_error=lambda uid, e: skipped.append(uid))
    assert rows[0]["id"] == "u1" and "answer" in rows[0] and "error" in rows[1]
    assert failed == 1 and skipped == ["m.jsonl:2"]
    # setup errors stop before any output
    done = run_infer([str(folder), "--run", str(tmp_path), "--out", str(tmp_path / "x.jsonl")])
    assert done.returncode == 1
    assert "no trained connector" in done.stderr and not (tmp_path / "x.jsonl").exists()


@pytest.mark.slow
def test_pipeline_on_the_real_offline_models(tmp_path):
    """The real embedded models (Whisper base + SmolLM2-135M, converted from the registry packages) behind a
    freshly initialised SSR connector and aligner: found by the names in the connector's config, a spoken
    sentence goes through encoder, aligner, connector and LLM (plain and chat-template prompts), with
    boundaries inside the clip and finite scores. (The answers' quality is the trained run's business.)"""
    from alignment.ctc_model import CTCAligner, char_ctc_config
    from speechlm import paths
    from speechlm.models import convert
    from speechlm.models.connectors import build_connector

    convert.prepare_model(paths.SMOLLM2_135M)
    convert.prepare_model(paths.WHISPER_BASE)
    torch.manual_seed(0)
    run = tmp_path / "run"
    build_connector({"name": "ssr", "d_enc": 512, "d_llm": 576, "d_model": 64, "n_heads": 4, "n_layers": 1,
                     "stack": 4, "slot_readout": True, "encoder_name": paths.WHISPER_BASE, "encoder_layers": [6],
                     "llm_name": paths.SMOLLM2_135M, "llm_vocab_size": 49152}).save_pretrained(run / "stage1" / "connector")
    CTCAligner(char_ctc_config(input_dim=512, d_model=32, layers=1, heads=2, dropout=0.0,
                               encoder_name=paths.WHISPER_BASE, encoder_layers=[6])).save_pretrained(run / "aligner")
    torch.set_num_threads(2)
    pipe = SpeechLMPipeline.from_run(run)
    wav = speech_wav(tmp_path / "tom.wav")
    duration_s = sf.info(str(wav)).duration
    plain = pipe.generate(wav, max_new_tokens=8)
    chat = pipe.generate(wav, "Repeat this: {speech}", chat=True, max_new_tokens=8)
    for r in (plain, chat):
        assert isinstance(r.answer, str) and r.answer.strip()
        check_boundaries(r.tokens, duration_s)
        assert r.timings["total_s"] >= r.timings["first_token_s"] > 0
    assert math.isfinite(pipe.score(wav, " Tom went to the store."))


# ------------------------------------------------------------------------------------------ no speech
def no_speech_clips() -> dict[str, np.ndarray]:
    """The issue's clips without speech: 2 s of digital silence, 3 s of white noise, 20 ms."""
    rng = np.random.default_rng(0)
    return {"silence": np.zeros(32000, dtype=np.float32), "noise": rng.normal(0, 0.3, 48000).clip(-1, 1).astype(np.float32),
            "20ms": np.zeros(320, dtype=np.float32)}


def test_clips_without_speech_decode_nothing_and_are_refused(tiny, monkeypatch):
    pipe = tiny["pipe"]
    results = {name: pipe.generate((wave, 16000), max_new_tokens=4, stop=[]) for name, wave in no_speech_clips().items()}
    answered = {name: pipe.generate((wave, 16000), max_new_tokens=4, stop=[], no_speech="answer")
                for name, wave in no_speech_clips().items()}
    for name, r in results.items():
        assert r.no_speech and r.speech_s == 0 and r.speech_regions == [], name
        assert r.transcript == "" and r.tokens == [] and r.chunks == [], name  # nothing decoded
        assert r.answer == "" and r.token_ids == [] and "not answered" in r.warnings[-1], name  # refused
        row = r.to_dict()
        assert row["no_speech"] is True and row["speech_s"] == 0 and json.loads(json.dumps(row)) == row
        # "answer": the prompt alone, no vectors, flagged
        a = answered[name]
        assert a.no_speech and a.transcript == "" and 1 <= len(a.token_ids) <= 4 and "prompt alone" in a.warnings[-1]
    speech = pipe.speech((no_speech_clips()["noise"], 16000))
    prefix = pipe.prefix(DEFAULT_PROMPT, speech)
    assert all(isinstance(seg, TextSegment) for seg in prefix)  # no speech segment reaches the LLM
    assert answered["noise"].token_ids == pipe.model.generate([prefix], 4, eos=pipe.tokenizer.eos_token_id)[0]
    # refused: the LLM never runs; a stream gives no pieces and the flagged result
    monkeypatch.setattr(pipe.model, "decoder", lambda *a, **k: pytest.fail("the LLM ran on a clip without speech"))
    stream = pipe.generate((no_speech_clips()["silence"], 16000), stream=True)
    assert list(stream) == [] and stream.result.no_speech and stream.result.answer == ""
    monkeypatch.undo()
    with pytest.raises(NoSpeechError, match="clip 1: no speech detected"):
        pipe.score([tiny["wav"], (no_speech_clips()["silence"], 16000)], " the cat")
    with pytest.raises(ConfigError, match="no_speech must be one of"):
        pipe.generate(tiny["wav"], no_speech="guess")
    spoken = pipe.generate(tiny["wav"], max_new_tokens=2)
    assert not spoken.no_speech and 0.5 < spoken.speech_s <= spoken.duration_s and spoken.to_dict()["no_speech"] is False


def test_silence_around_a_sentence_changes_nothing_decoded(tiny):
    """Only the detected speech is encoded and decoded, so 5 s of silence before and after a sentence give the
    same windows (shifted by 5 s to the sample), hence exactly the same tokens and vectors (tolerance: 1e-5 on
    the vectors, 1e-6 s on the boundaries, for float summation order only). Also when the speech touches the
    clip's edges: the padding past them is decoded as zeros, as the silence would be."""
    pipe = tiny["pipe"]
    whole, sr = sf.read(tiny["wav"], dtype="float32")
    pad = np.zeros(5 * sr, dtype=np.float32)
    for wave in (whole, whole[int(0.09 * sr):-int(0.14 * sr)]):  # the TTS clip, and it cut 10 ms around its speech
        plain, padded = pipe.speech((wave, sr)), pipe.speech((np.concatenate([pad, wave, pad]), sr))
        assert plain.transcript and padded.transcript == plain.transcript
        assert padded.segment.ids == plain.segment.ids
        torch.testing.assert_close(padded.segment.embeds, plain.segment.embeds, atol=1e-5, rtol=0)
        dur, pad_s = wave.size / sr, pipe.vad.cfg.pad_ms / 1000

        def in_clip(x, dur=dur):  # the plain clip's times stop at its edges
            return min(max(x, 0.0), dur)

        for p, q in zip(padded.tokens, plain.tokens, strict=True):
            assert (p.token, in_clip(p.start_s - 5), in_clip(p.end_s - 5)) == (
                q.token, pytest.approx(q.start_s, abs=1e-6), pytest.approx(q.end_s, abs=1e-6))
        # nothing in the silence beyond a region's padding
        assert all(5 - pad_s - 1e-6 <= t.start_s <= t.end_s <= 5 + dur + pad_s + 1e-6 for t in padded.tokens)
        assert padded.duration_s == pytest.approx(plain.duration_s + 10)
    assert [x - 5 for r in padded.regions for x in r] == pytest.approx([0.0, wave.size / sr], abs=0.06)
    assert plain.regions == [(0.0, pytest.approx(wave.size / sr))]  # reported within the clip
    check_boundaries(plain.tokens, plain.duration_s)


def test_infer_cli_flags_clips_without_speech(tiny, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(tiny["wav"], folder / "good.wav")
    sf.write(folder / "silence.wav", no_speech_clips()["silence"], 16000)
    out = tmp_path / "answers.jsonl"
    args = [str(folder), "--run", str(tiny["run"]), "--llm", str(tiny["models"] / LLM_NAME), "--encoder",
            str(tiny["models"] / ENCODER_NAME), "--out", str(out), "--max-new-tokens", "3", "--threads", "1"]
    done = run_infer(args)
    assert done.returncode == 0, done.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["silence"]["no_speech"] is True and rows["silence"]["answer"] == "" and rows["silence"]["speech_s"] == 0
    assert rows["good"]["no_speech"] is False and rows["good"]["speech_s"] > 0 and rows["good"]["speech_regions"]
    assert "1 without speech" in done.stderr
    done = run_infer([*args, "--no-vad", "--no-speech", "answer"])  # the detector off: the whole clip is speech
    assert done.returncode == 0, done.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(r["speech_s"] == r["duration_s"] for r in rows.values())
