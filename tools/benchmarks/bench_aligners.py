"""charCTC, subCTC and CIF aligners side by side (plus PocketSphinx) on a corpus's held-out test split.

    python tools/benchmarks/bench_aligners.py --corpus ~/.cache/speechlm/corpus/tiny-2.0h \
        --features ~/.cache/speechlm/features/tiny-2.0h --aligner charCTC=runs/tiny/aligner \
        --work-dir runs/bench_aligners --train-steps 2000 --threads 1 --out runs/bench_aligners/report.json

Aligners: ``--aligner KIND=FOLDER`` uses a trained folder; a kind without one is taken from
``--work-dir/KIND`` when that folder holds a trained aligner, else trained there first with
``recipes/train_aligner.py`` (``--train-config`` + ``model.kind=KIND steps=--train-steps``, the corpus's
train/valid split and feature caches; ``--train-override key=value ...`` is passed on). ``--no-train``
makes a missing aligner an error instead.

Each aligner is measured by ``tools/eval_alignment.py``'s ``evaluate`` on ``--corpus/test.jsonl``
against the rows' reference word timings (the TTS engines' own): word-boundary MAE (starts and ends,
ms), share within 20 / 50 ms, CER of the aligner's greedy free-mode transcript, real-time factor from
cached frames (aligner network + decoder) and, separately, with the frozen encoder added (the encoder's
RTF is timed once on the first ``--encoder-clips`` test clips; every aligner reads the same frames). The
CTC kinds are decoded with both decoders (ctc-segmentation, ``torchaudio`` forced_align); CIF places
boundaries where its integrate-and-fire weights fire and takes no CTC decoder, so those combinations
are rows marked "n/a" with the reason, as are the CTC kinds under CIF firing. Every figure is also split
by the synthesis engine of the rows' speakers (``speechlm.data.tts.engine_of``).

Outside reference: PocketSphinx 5's own forced alignment (``Decoder.set_align_text``, default US
English acoustic model and CMU dictionary; the optional extra ``pip install -e .[bench]``), on the same
clips (16 kHz mono int16) against the same timings. Words missing from its dictionary get a crude
letter-to-phone pronunciation (counted in ``oov_words``). Without the package the row says why.

Writes ``--out`` (JSON, atomically), a PNG next to it (``--plot``), and prints a markdown table with the
machine's load average, because the timings are taken on a shared machine.
"""

from __future__ import annotations

import sys

from speechlm.errors import SpeechLMError
from speechlm.paths import SMOLLM2_135M, default_model
from speechlm.perf import ROOT
from speechlm.perf.bench import bench_parser
from speechlm.perf.benchmarks.aligners import ALL_DECODERS, KINDS, run, write_outputs


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--corpus", required=True, help="folder with train/valid/test.jsonl (reference word timings)")
    ap.add_argument("--features", default="", help="feature caches <features>/{train,valid,test} (else the encoder runs)")
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--plot", default="", help="PNG path (default: --out with .png)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--decoders", nargs="+", choices=ALL_DECODERS, default=list(ALL_DECODERS))
    ap.add_argument("--modes", nargs="+", choices=("forced", "free"), default=["forced", "free"])
    ap.add_argument("--aligner", action="append", default=[], metavar="KIND=FOLDER",
                    help="use this trained aligner for KIND (repeatable)")
    ap.add_argument("--work-dir", default="", help="trained aligners <work-dir>/KIND: reused, or trained there")
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--train-max-minutes", type=float, default=0.0,
                    help="stop training early after this long (0: always --train-steps)")
    ap.add_argument("--train-config", default=str(ROOT / "recipes/configs/aligner_tiny.yaml"))
    ap.add_argument("--train-override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more recipes/train_aligner.py overrides")
    ap.add_argument("--no-train", action="store_true", help="a missing aligner is an error")
    ap.add_argument("--tokenizer", default=str(default_model(SMOLLM2_135M)), help="the LLM tokenizer")
    ap.add_argument("--encoder", default="", help="encoder folder (default: the one the aligner names)")
    ap.add_argument("--encoder-clips", type=int, default=32, help="test clips timed through the encoder (0: skip)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="first N test rows only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (training and evaluation)")
    ap.add_argument("--no-pocketsphinx", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = run(args)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_outputs(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
