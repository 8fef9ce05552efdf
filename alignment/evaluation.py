"""Measure an aligner against reference word timings (word-boundary error, CER, speed): the report behind
``tools/eval_alignment.py``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from alignment.aligner import MODES, Aligner
from alignment.decoders import DECODERS
from alignment.features import by_length, iter_feature_batches, open_frame_source
from alignment.metrics import BoundaryErrors, SpeedMeter, character_error_rate, word_boundary_errors
from speechlm.data.manifest import read_manifest
from speechlm.data.tts import engine_of
from speechlm.errors import AlignmentError
from speechlm.paths import SMOLLM2_135M, default_model


@dataclass
class EvalOptions:
    """What :func:`evaluate` measures (the options of ``tools/eval_alignment.py``; any object with these
    attributes, such as its argparse namespace, will do)."""

    manifest: str
    aligner: str
    tokenizer: str = field(default_factory=lambda: str(default_model(SMOLLM2_135M)))
    encoder: str = ""
    feature_cache: str = ""
    decoders: Sequence[str] = DECODERS
    modes: Sequence[str] = MODES
    beam_size: int = 0
    batch_size: int = 8
    limit: int = 0                # first N rows with reference words only (0: all)
    offset_ms: float = 0.0        # constant shift added to predicted times (calibration; report it when used)


def evaluate(opts: EvalOptions) -> dict:
    """The JSON report of one aligner on the manifest rows that have reference ``words``.

    Reference timings are the rows' ``words`` (the synthesis engine's own segment timings for the synthesized
    corpus, see speechlm/data/tts). For each decoder and mode (``results["<decoder>/<mode>"]``): mean absolute
    word-boundary error in ms over word starts and ends (``mae_ms``; also start/end separately), the share of
    boundaries within 20 and 50 ms, the aligner's greedy CER, and real-time factors (``rtf_aligner``: aligner
    network + decoder; ``rtf_total``: also the encoder, 0 extra when frames come from a cache). Free mode scores
    only the words it decoded correctly (``words_matched`` of ``words_ref``). ``by_engine`` repeats CER and the
    boundary errors per TTS engine of the rows' speakers (the held-out eSpeak voices as ``espeak-hard``).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    aligner = Aligner.from_pretrained(opts.aligner, tokenizer, beam_size=opts.beam_size)
    encoder, cache = open_frame_source(aligner, opts.encoder, opts.feature_cache)
    utts = [u for u in read_manifest(opts.manifest) if u.words]
    if opts.limit:
        utts = utts[: opts.limit]
    utts = [utts[i] for i in by_length(utts)]  # batches of similar lengths: little padding
    runs = [(d, m) for m in opts.modes for d in opts.decoders]
    errors = {r: BoundaryErrors() for r in runs}
    # The same per synthesis engine of each row's speaker (held-out eSpeak voices: "espeak-hard").
    by_engine: dict[str, dict] = {}
    speed = {r: SpeedMeter() for r in runs}
    failures: dict[str, list[str]] = {f"{d}/{m}": [] for d, m in runs}
    refs, hyps, audio_s, encode_s, net_s = [], [], 0.0, 0.0, 0.0
    shift = opts.offset_ms / 1000
    for fb in tqdm(iter_feature_batches(utts, opts.batch_size, encoder=encoder, cache=cache),
                   total=(len(utts) + opts.batch_size - 1) // opts.batch_size, desc="eval", unit="batch"):
        t0 = time.perf_counter()
        lp = aligner.frame_outputs(fb.features, fb.lengths)
        net = time.perf_counter() - t0
        encode_s += fb.encode_s
        net_s += net
        for k, utt in enumerate(fb.utts):
            post = lp[k, : int(fb.lengths[k])]
            audio_s += utt.duration_s
            ref_words = [(w.word, w.start_s, w.end_s) for w in utt.words]
            refs.append(utt.text)
            hyps.append(aligner.decode(post))
            eng = by_engine.setdefault(engine_of(utt.speaker), {
                "refs": [], "hyps": [], "errors": {r: BoundaryErrors() for r in runs}})
            eng["refs"].append(refs[-1])
            eng["hyps"].append(hyps[-1])
            for decoder, mode in runs:
                aligner.decoder = decoder
                t1 = time.perf_counter()
                try:
                    res = aligner.align_posteriors(post, utt.text if mode == "forced" else None, utt.id)
                except AlignmentError as e:
                    failures[f"{decoder}/{mode}"].append(str(e))
                    continue
                share = net * utt.duration_s / max(1e-9, sum(u.duration_s for u in fb.utts))
                speed[(decoder, mode)].add(utt.duration_s, time.perf_counter() - t1 + share)
                hyp_words = [(w.word, w.start_s + shift, w.end_s + shift) for w in res.words]
                errors[(decoder, mode)].extend(word_boundary_errors(ref_words, hyp_words))
                eng["errors"][(decoder, mode)].extend(word_boundary_errors(ref_words, hyp_words))
    cer = character_error_rate(refs, hyps)
    results = {}
    for decoder, mode in runs:
        s = speed[(decoder, mode)]
        results[f"{decoder}/{mode}"] = {
            **errors[(decoder, mode)].summary(), "cer": cer, "failed": len(failures[f"{decoder}/{mode}"]),
            "rtf_aligner": s.rtf, "rtf_total": (s.compute_s + encode_s) / s.audio_s if s.audio_s else None,
        }
    return {
        "manifest": str(opts.manifest), "aligner": str(opts.aligner), "utterances": len(refs),
        "audio_s": audio_s, "encoder_s": encode_s, "aligner_net_s": net_s, "offset_ms": opts.offset_ms,
        "beam_size": opts.beam_size, "threads": torch.get_num_threads(), "results": results,
        "failures": {k: v[:20] for k, v in failures.items() if v},
        "by_engine": {e: {"utterances": len(v["refs"]), "cer": character_error_rate(v["refs"], v["hyps"]),
                          **{f"{d}/{m}": v["errors"][(d, m)].summary() for d, m in runs}}
                      for e, v in sorted(by_engine.items())},
    }
