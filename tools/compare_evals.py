"""Compare two evaluation reports item by item: paired differences with 95% intervals and McNemar's test.

    python tools/compare_evals.py runs/a/eval/storycloze.json runs/b/eval/storycloze.json \
        --task storycloze/adversarial --condition s2t --scoring summed

Both reports must have scored the same items (same sets, same `limit`); rows are matched on task, condition,
boundaries and scoring. Two token analyses (tools/analyze_tokens.py) are compared token by token; with the
spelling path one analysis holds several read-outs, compared with itself:

    python tools/compare_evals.py runs/tiny/token_analysis.json runs/tiny/token_analysis.json \
        --a-items items_mix --b-items items

A connector against another condition, e.g. StoryCloze S->T against the LLM on the endings alone (no context):

    python tools/compare_evals.py runs/large/eval/storycloze.json runs/large/eval/storycloze.json \
        --task storycloze/adversarial --condition s2t --b-condition endings --scoring summed

A difference whose interval contains 0 is printed as inside the noise.
How it works: speechlm/eval/paired.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from speechlm.errors import SpeechLMError
from speechlm.eval.paired import compare_reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="report JSON of system A (e.g. runs/a/eval/storycloze.json)")
    ap.add_argument("b", help="report JSON of system B")
    ap.add_argument("--task", default="", help="task prefix, e.g. storycloze/adversarial or speech_mmlu/all")
    ap.add_argument("--condition", default="", help="e.g. s2t, s, speech_0shot")
    ap.add_argument("--b-condition", default="", help="B's rows of another condition, matched on task and scoring "
                    "(e.g. --condition s2t --b-condition endings: a connector against the endings alone)")
    ap.add_argument("--scoring", default="", help="e.g. summed, length_norm, cloze")
    ap.add_argument("--same-connector", action="store_true", help="match rows on the connector name too")
    ap.add_argument("--a-items", default="items", help="token analyses: A's item map (items, items_mix, "
                    "items_speller)")
    ap.add_argument("--b-items", default="items", help="token analyses: B's item map")
    ap.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = ap.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        reports = json.load(fa), json.load(fb)
    try:
        found = compare_reports(*reports, args.task, args.condition, args.scoring, args.same_connector,
                                items_a=args.a_items, items_b=args.b_items, condition_b=args.b_condition)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not found:
        print("no matching rows with per-item outcomes in both reports", file=sys.stderr)
        return 1
    for label, pair in found:
        print(json.dumps({"rows": label, **pair.to_json()}) if args.json else f"{label}\n  {pair.fmt('A', 'B')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
