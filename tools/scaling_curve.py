"""The scaling curve of issue 26: the method's figures against hours of training speech.

    python tools/scaling_curve.py --runs runs/scale-2h runs/scale-5h runs/scale-12.5h runs/large \
        --png docs/scaling.png --out runs/scaling.json

Reads each run's summary.json (and, with --recorded, the points of an earlier report: amounts measured before,
their run folders gone), fits every figure (stage-1 token accuracy and cosine, StoryCloze S->T and
Speech-MMLU parity with text, zero-shot ASR WER) as a line in log10(hours), prints a markdown table with the hours
each fit predicts for its target (parity 1.0 by default; --target storycloze_parity=0.9 to change one), writes the
PNG and the JSON report atomically. The figures and the fit: speechlm/eval/scaling.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from speechlm.atomic import atomic_write_text
from speechlm.errors import SpeechLMError
from speechlm.eval.scaling import FIGURES, fits, load_points, markdown, plot, report


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="run folders, each with a summary.json")
    ap.add_argument("--recorded", default="", help="an earlier curve's report (the JSON of --out): its points join "
                    "the runs' (a run given in --runs replaces its recorded point); it may be the --out file itself")
    ap.add_argument("--floors", default="", help="a text-only evaluation folder (storycloze.json, speech_mmlu.json "
                    "with the endings / no-question conditions) for the share figures of runs whose summaries lack them")
    ap.add_argument("--png", default="", help="write the curves here (PNG)")
    ap.add_argument("--out", default="", help="write the points and fits here (JSON)")
    ap.add_argument("--target", action="append", default=[], metavar="FIGURE=VALUE",
                    help=f"the target of a figure (figures: {', '.join(FIGURES)})")
    args = ap.parse_args(None if argv is None else list(argv))
    targets = {}
    for t in args.target:
        name, _, value = t.partition("=")
        if name not in FIGURES or not value:
            ap.error(f"--target {t!r}: expected FIGURE=VALUE with FIGURE one of {', '.join(FIGURES)}")
        targets[name] = float(value)
    if not args.runs and not args.recorded:
        ap.error("give --runs, --recorded or both")
    try:
        points = load_points(args.runs, args.floors or None, args.recorded or None)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    fitted = fits(points, targets)
    print(markdown(points, fitted))
    if args.out:
        atomic_write_text(args.out, json.dumps(report(points, fitted), indent=2) + "\n")
        print(f"\nwrote {args.out}")
    if args.png:
        print(f"wrote {plot(points, fitted, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
