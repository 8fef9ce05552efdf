"""Measure an aligner against reference word timings: word-boundary error, CER, speed; writes a JSON report.

    python tools/eval_alignment.py --manifest corpus/test.jsonl --aligner ~/.cache/speechlm/aligners/charctc \
        --out runs/align_eval.json [--feature-cache DIR] [--decoders ctc_segmentation forced_align] \
        [--modes forced free] [--limit 200]

Reference timings are the manifest rows' ``words`` (the synthesis engine's own segment timings for the
synthesized corpus, see speechlm/data/tts). ``by_engine`` repeats CER and the boundary errors per engine
of the rows' speakers (the held-out eSpeak voices as ``espeak-hard``). For each decoder and mode: mean absolute word-boundary error in ms over word starts and
ends (``mae_ms``; also start/end separately), the share of boundaries within 20 and 50 ms, the
aligner's greedy CER, and real-time factors (``rtf_aligner``: aligner network + decoder;
``rtf_total``: also the encoder, 0 extra when frames come from a cache). Free mode scores only the
words it decoded correctly (``words_matched`` of ``words_ref``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from alignment.aligner import Aligner
from alignment.decoders import DECODERS
from alignment.features import iter_feature_batches, open_frame_source
from alignment.metrics import BoundaryErrors, SpeedMeter, character_error_rate, word_boundary_errors
from speechlm.atomic import atomic_write_text
from speechlm.data.manifest import read_manifest
from speechlm.errors import AlignmentError, SpeechLMError
from speechlm.eval.report import engine_of
from speechlm.paths import SMOLLM2_135M, default_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="rows with reference 'words' timings")
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--tokenizer", default=str(default_model(SMOLLM2_135M)))
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--encoder", default="")
    ap.add_argument("--feature-cache", default="")
    ap.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    ap.add_argument("--modes", nargs="+", choices=("forced", "free"), default=["forced", "free"])
    ap.add_argument("--beam-size", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="first N rows only")
    ap.add_argument("--offset-ms", type=float, default=0.0,
                    help="constant shift added to predicted times (calibration; report it when used)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate(args)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=2))
    return 0


def evaluate(args) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    aligner = Aligner.from_pretrained(args.aligner, tokenizer, beam_size=args.beam_size)
    encoder, cache = open_frame_source(aligner, args.encoder, args.feature_cache)
    utts = [u for u in read_manifest(args.manifest) if u.words]
    if args.limit:
        utts = utts[: args.limit]
    runs = [(d, m) for m in args.modes for d in args.decoders]
    errors = {r: BoundaryErrors() for r in runs}
    # The same per synthesis engine of each row's speaker (held-out eSpeak voices: "espeak-hard").
    by_engine: dict[str, dict] = {}
    speed = {r: SpeedMeter() for r in runs}
    failures: dict[str, list[str]] = {f"{d}/{m}": [] for d, m in runs}
    refs, hyps, audio_s, encode_s, net_s = [], [], 0.0, 0.0, 0.0
    shift = args.offset_ms / 1000
    for fb in tqdm(iter_feature_batches(utts, args.batch_size, encoder=encoder, cache=cache),
                   total=(len(utts) + args.batch_size - 1) // args.batch_size, desc="eval", unit="batch"):
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
        "manifest": str(args.manifest), "aligner": str(args.aligner), "utterances": len(refs),
        "audio_s": audio_s, "encoder_s": encode_s, "aligner_net_s": net_s, "offset_ms": args.offset_ms,
        "beam_size": args.beam_size, "threads": torch.get_num_threads(), "results": results,
        "failures": {k: v[:20] for k, v in failures.items() if v},
        "by_engine": {e: {"utterances": len(v["refs"]), "cer": character_error_rate(v["refs"], v["hyps"]),
                          **{f"{d}/{m}": v["errors"][(d, m)].summary() for d, m in runs}}
                      for e, v in sorted(by_engine.items())},
    }


if __name__ == "__main__":
    sys.exit(main())
