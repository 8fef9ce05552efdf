"""Stage-1 error analysis by token class: where does the connector miss the LLM's input embeddings?

    python tools/analyze_tokens.py --connector runs/tiny/stage1/connector --llm MODELS/smollm2-135m \
        --manifest runs/tiny/aligned/valid.jsonl --feature-cache FEATURES/valid \
        --train-manifest runs/tiny/aligned/train.jsonl [--limit 0] --out runs/tiny/token_analysis.json

Token accuracy and cosine of the SSR connector's vectors per token class (word-initial, continuation,
punctuation, frame sharing, seen/unseen in training) and per synthesis engine of the rows' speakers; the
classes are defined in speechlm/eval/token_analysis.py. Prints a markdown table and writes the JSON report
atomically.

The spelling path (speechlm/eval/spelling.py): with a speller (tools/train_speller.py) and its charCTC aligner,
the speller's accuracy and that of the mix unit(v_ssr)*(1-w) + unit(v_spell)*w are reported beside SSR's, with
per-token items for tools/compare_evals.py (--a-items items_mix --b-items items). w is --mix, or chosen on
training rows (never the analysed ones):

    python tools/analyze_tokens.py ... --speller SPELLERS/smollm2-135m --aligner runs/tiny/aligner \
        --choose-mix-on runs/tiny/aligned/train.jsonl --choose-mix-cache FEATURES/train [--choose-mix-rows 300]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

import torch

from speechlm.atomic import atomic_write_text
from speechlm.errors import SpeechLMError
from speechlm.eval.token_analysis import analyze, markdown_table


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connector", required=True, help="connector folder exported by stage 1")
    ap.add_argument("--llm", default="", help="LLM folder ('' = the embedded SmolLM2-135M)")
    ap.add_argument("--manifest", required=True, help="aligned manifest (rows with token_boundaries)")
    ap.add_argument("--feature-cache", required=True, help="cached encoder features of the manifest's rows")
    ap.add_argument("--train-manifest", default="", help="training transcripts, for the seen/unseen classes")
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--split", default="", help="only rows of this split ('' = all rows)")
    ap.add_argument("--limit", type=int, default=0, help="first N rows only (0 = all)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per connector batch")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-check-fresh", dest="check_fresh", action="store_false",
                    help="do not check that the rows' audio is unchanged since caching")
    ap.add_argument("--speller", default="", help="speller folder: adds the spelling path (needs --aligner)")
    ap.add_argument("--aligner", default="", help="the charCTC aligner folder whose characters the speller reads")
    ap.add_argument("--mix", type=float, default=None, help="weight w of the speller in the mix (default 0.5)")
    ap.add_argument("--choose-mix-on", default="", help="aligned manifest of TRAINING rows to choose w on")
    ap.add_argument("--choose-mix-cache", default="", help="feature cache of --choose-mix-on's rows")
    ap.add_argument("--choose-mix-rows", type=int, default=300, help="its first N rows")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = analyze(args.connector, args.manifest, args.feature_cache, llm=args.llm,
                         train_manifest=args.train_manifest or None, split=args.split, limit=args.limit,
                         batch_size=args.batch_size, device=args.device, check_fresh=args.check_fresh,
                         progress=args.progress, speller=args.speller or None, aligner=args.aligner or None,
                         mix=args.mix, choose_mix_on=args.choose_mix_on or None,
                         choose_mix_cache=args.choose_mix_cache or None, choose_mix_rows=args.choose_mix_rows)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    if report.get("mix"):
        print(f"\nmix weight w = {report['mix']['weight']}" + (f" (chosen on {report['mix']['rows']} rows of "
                                                                f"{report['mix']['chosen_on']})"
                                                                if report["mix"]["chosen_on"] else ""))
        for name, pair in report["paired"].items():
            print(f"{name}: {pair['mix_vs_ssr']['line']}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
