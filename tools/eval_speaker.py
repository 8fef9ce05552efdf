"""Score a trained speaker probe on trial pairs of HELD-OUT speakers: cosine scores, EER and minDCF.

    python tools/eval_speaker.py --probe runs/speaker_probe/tiny/probe \
        --manifest ~/.cache/speechlm/corpus/tiny-2.0h/valid.jsonl ~/.cache/speechlm/corpus/tiny-2.0h/test.jsonl \
        --features ~/.cache/speechlm/features/tiny-2.0h/valid ~/.cache/speechlm/features/tiny-2.0h/test \
        [--out runs/speaker_probe/tiny/eval.json] [--p-target 0.01 --c-miss 1 --c-fa 1]

Trials are all pairs of the manifests' utterances whose speaker the probe never trained on (rows of training
speakers are dropped and counted). A probe trained on connector vectors (data.input=connector) reads its
connector from the probe's config and needs aligned manifests (token_boundaries), e.g. runs/tiny/aligned/valid.jsonl.
minDCF is normalised (1.0 = reject everything); the defaults are p_target 0.01, C_miss = C_fa = 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speechlm.atomic import atomic_write_text
from speechlm.errors import SpeechLMError
from speechlm.eval.speaker import evaluate_probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", required=True, help="the probe folder (out_dir/probe of train_speaker_probe.py)")
    ap.add_argument("--manifest", nargs="+", required=True)
    ap.add_argument("--features", nargs="+", required=True, help="one feature cache per manifest")
    ap.add_argument("--out", default="", help="JSON result (written atomically)")
    ap.add_argument("--p-target", type=float, default=0.01)
    ap.add_argument("--c-miss", type=float, default=1.0)
    ap.add_argument("--c-fa", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = evaluate_probe(args.probe, args.manifest, args.features, args.p_target, args.c_miss, args.c_fa,
                                progress=not args.no_progress)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"{result['utterances']} utterances of {result['speakers']} held-out speakers, {result['trials']} trials "
          f"({result['target_trials']} target): EER {100 * result['eer']:.2f}%, minDCF {result['min_dcf']:.3f} "
          f"(p_target {args.p_target}, C_miss {args.c_miss}, C_fa {args.c_fa})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
