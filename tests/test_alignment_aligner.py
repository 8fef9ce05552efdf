"""The forced/free alignment API end to end: known posteriors, a tiny random model, save/load."""

from __future__ import annotations

import pytest
import torch
from alignment_helpers import byte_level_bpe, peaky_posteriors, sentencepiece_llama

from alignment.aligner import Aligner, check_encoder
from alignment.ctc_model import CTCAligner, char_ctc_config, sub_ctc_config
from speechlm.errors import AlignmentError, ModelError


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


def _tiny_char_model(**kw) -> CTCAligner:
    torch.manual_seed(0)
    cfg = char_ctc_config(input_dim=16, d_model=32, layers=2, heads=2, dropout=0.0,
                          encoder_name="tiny-encoder", frame_rate_hz=50.0, **kw)
    return CTCAligner(cfg).eval()


def _char_path(model: CTCAligner, text: str, gap: int = 2) -> tuple[list[int], list[int]]:
    """A CTC path speaking ``text`` one label per frame, ``gap`` blanks between labels; label start frames."""
    path, starts = [0, 0], []
    for lab in model.text_to_labels(text):
        starts.append(len(path))
        path += [lab] + [0] * gap
    return path, starts


@pytest.mark.parametrize("decoder", ["ctc_segmentation", "forced_align"])
def test_forced_alignment_of_known_posteriors(bpe, decoder):
    model = _tiny_char_model()
    text = "The cat, sat."
    path, starts = _char_path(model, "the cat sat")     # what is spoken: 11 labels
    lp = torch.from_numpy(peaky_posteriors(path, model.config.vocab_size))
    res = Aligner(model, bpe, decoder=decoder).align_posteriors(lp, text, "utt-a")
    assert res.mode == "forced" and res.text == text and res.frame_rate_hz == 50.0
    assert res.token_ids == bpe(text, add_special_tokens=False)["input_ids"]
    assert len(res.token_boundaries) == len(res.token_ids)
    # word ends: the frame before the next label (the separator space) starts
    norm_index = {"e": 2, "t1": 6, "t2": 10}
    assert [w.word for w in res.words] == ["The", "cat,", "sat."]
    assert res.words[0].start_s == pytest.approx(starts[0] / 50)
    assert res.words[0].end_s == pytest.approx(starts[norm_index["e"] + 1] / 50)
    assert res.words[1].end_s == pytest.approx(starts[norm_index["t1"] + 1] / 50)
    assert res.words[2].end_s == pytest.approx((starts[norm_index["t2"]] + 1) / 50)
    # the last LLM token "." has no audio: it gets its predecessor's boundary, the end of "t"
    assert res.token_boundaries[-1] == res.token_boundaries[-2] == starts[norm_index["t2"]]
    # the token holding "," has no audio either: it ends where "t" of "cat" ends (before the space)
    spans = [bpe.decode([t]) for t in res.token_ids]
    comma = next(k for k, piece in enumerate(spans) if "," in piece)
    assert res.token_boundaries[comma] == starts[norm_index["t1"] + 1] - 1


def test_boundaries_at_another_frame_rate(bpe):
    model = _tiny_char_model()
    path, _ = _char_path(model, "the cat sat")
    lp = torch.from_numpy(peaky_posteriors(path, model.config.vocab_size))
    aligner = Aligner(model, bpe)
    r50 = aligner.align_posteriors(lp, "the cat sat", "u")
    r25 = aligner.align_posteriors(lp, "the cat sat", "u", target_frame_rate_hz=25.0)
    assert r25.frame_rate_hz == 25.0 and r25.num_frames == (len(path) + 1) // 2
    # a 50 Hz frame b ends at (b + 1) * 20 ms, inside 25 Hz frame b // 2
    assert r25.token_boundaries == [b // 2 for b in r50.token_boundaries]


def test_audio_shorter_than_text_is_an_alignment_error(bpe):
    model = _tiny_char_model()
    feats = torch.randn(1, 1, 5, 16)
    with pytest.raises(AlignmentError, match="short-utt"):
        Aligner(model, bpe).align(feats, torch.tensor([5]), ["a much longer transcript"], ["short-utt"])


@pytest.mark.parametrize("beam_size", [0, 3])
def test_free_mode_on_a_tiny_random_model_runs_end_to_end(bpe, beam_size):
    model = _tiny_char_model()
    # bias the head so the random model emits speech-like output instead of only blanks
    with torch.no_grad():
        model.ctc_head.bias[0] = -3.0
    feats = torch.randn(2, 1, 40, 16)
    lengths = torch.tensor([40, 31])
    results = Aligner(model, bpe, beam_size=beam_size).align(feats, lengths, [None, "known text"], ["f0", "f1"])
    free, forced = results
    assert free.mode == "free" and forced.mode == "forced"
    assert free.text and set(free.text) <= set(model.config.vocab)
    for res, n in ((free, 40), (forced, 31)):
        assert len(res.token_boundaries) == len(res.token_ids) == len(bpe(res.text, add_special_tokens=False)
                                                                       ["input_ids"])
        assert all(0 <= b < n for b in res.token_boundaries)
        assert all(b2 >= b1 for b1, b2 in zip(res.token_boundaries, res.token_boundaries[1:]))


def test_char_model_save_load_round_trip(tmp_path):
    model = _tiny_char_model(num_input_layers=2)
    with torch.no_grad():
        model.body.layer_weights.copy_(torch.tensor([0.3, -0.2]))
    model.save_pretrained(tmp_path / "aligner")
    loaded = CTCAligner.from_pretrained(tmp_path / "aligner")
    assert loaded.config == model.config
    feats, lengths = torch.randn(2, 2, 12, 16), torch.tensor([12, 7])
    torch.testing.assert_close(loaded(feats, lengths), model(feats, lengths))
    with pytest.raises(ModelError):
        CTCAligner.from_pretrained(tmp_path / "missing")


def test_sub_ctc_save_load_and_free_mode(tmp_path):
    tok = sentencepiece_llama(tmp_path)
    torch.manual_seed(0)
    cfg = sub_ctc_config(tok, input_dim=16, d_model=32, layers=2, heads=2, dropout=0.0, encoder_name="tiny")
    model = CTCAligner(cfg).eval()
    assert cfg.vocab_size == len(tok) + 1
    model.save_pretrained(tmp_path / "sub", tokenizer=tok)
    aligner = Aligner.from_pretrained(tmp_path / "sub", llm_tokenizer=byte_level_bpe())
    text = "the cat sat"
    sub_ids = tok(text, add_special_tokens=False)["input_ids"]
    path = [0]
    for i in sub_ids:
        path += [i + 1, 0]
    lp = torch.from_numpy(peaky_posteriors(path, cfg.vocab_size))
    free = aligner.align_posteriors(lp, None, "s0")
    assert free.mode == "free" and free.text == text
    forced = aligner.align_posteriors(lp, text, "s0")
    assert forced.token_boundaries == free.token_boundaries
    assert forced.words[-1].end_s == pytest.approx((len(path) - 2 + 1) / 50)


def test_encoder_mismatch_is_a_model_error():
    model = _tiny_char_model()

    class FakeEncoder:
        name, frame_rate_hz, hidden_size, layers = "other", 50.0, 32, (6,)

    with pytest.raises(ModelError, match="tiny-encoder"):
        check_encoder(model, FakeEncoder())


def test_calibration_offsets_shift_words_and_boundaries(bpe):
    model = _tiny_char_model()
    path, _ = _char_path(model, "the cat sat")
    lp = torch.from_numpy(peaky_posteriors(path + [0, 0, 0], model.config.vocab_size))
    plain = Aligner(model, bpe).align_posteriors(lp, "the cat sat", "u")
    model.config.start_offset_frames, model.config.end_offset_frames = -1, 2
    shifted = Aligner(model, bpe).align_posteriors(lp, "the cat sat", "u")
    for w0, w1 in zip(plain.words, shifted.words, strict=True):
        assert w1.start_s == pytest.approx(w0.start_s - 1 / 50) and w1.end_s == pytest.approx(w0.end_s + 2 / 50)
    assert shifted.token_boundaries == [b + 2 for b in plain.token_boundaries]


def test_alignment_package_does_not_import_the_trainer():
    import subprocess
    import sys

    code = ("import sys, alignment.aligner, alignment.cif, alignment.features, alignment.metrics, alignment.plot, "
            "alignment.kinds, alignment.training, alignment.evaluation, alignment.annotate; "
            "print([m for m in sys.modules if m.startswith(('speechlm.training', 'speechlm.eval', "
            "'speechlm.inference', 'speechlm.perf'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "[]"
