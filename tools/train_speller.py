"""Train the speller (the spelling path of the token read-out) from the LLM's vocabulary alone: no audio.

    python tools/train_speller.py --llm MODELS/smollm2-135m --aligner runs/tiny/aligner \
        --out ~/.cache/speechlm/spellers/smollm2-135m [--steps 2000] [--threads 1] [--tensorboard DIR]

Every vocabulary token's spelling, normalised like the aligner's transcripts, -> its input-embedding row;
a seeded share of the tokens is held out and its accuracy reported. How it works:
speechlm/training/speller.py (model: speechlm/models/speller.py). Writes the speller folder atomically
(config.json, model.safetensors, training.json) and prints the accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

import torch

from speechlm.errors import SpeechLMError
from speechlm.training.speller import SpellerTrainConfig, train_speller_for_llm


def main(argv: Iterable[str] | None = None) -> int:
    d = SpellerTrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="", help="LLM folder ('' = the embedded SmolLM2-135M)")
    ap.add_argument("--aligner", default="", help="charCTC aligner folder whose alphabet the speller reads "
                    "('' = the default alphabet: space, apostrophe, a-z)")
    ap.add_argument("--out", required=True, help="speller folder to write (outside the repository)")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the cosines")
    ap.add_argument("--noise", type=float, default=d.noise, help="per-character edit probability")
    ap.add_argument("--holdout", type=float, default=d.holdout, help="share of the vocabulary held out")
    ap.add_argument("--frequency-prior", type=float, default=d.frequency_prior,
                    help="draw the k-th token with weight (k+1)^-p (0 = uniform)")
    ap.add_argument("--d-model", type=int, default=d.d_model)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between accuracy checks")
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds (0 = none)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--tensorboard", default="", help="TensorBoard folder ('' = none)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = SpellerTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 temperature=args.temperature, noise=args.noise, holdout=args.holdout,
                                 frequency_prior=args.frequency_prior,
                                 d_model=args.d_model, layers=args.layers, heads=args.heads,
                                 eval_every=args.eval_every, time_limit_s=args.time_limit, seed=args.seed)
        report = train_speller_for_llm(cfg, args.llm, args.out, args.aligner or None, args.tensorboard or None,
                                       args.progress)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: report[k] for k in ("steps_done", "time_s", "spellable_tokens", "distinct_spellings",
                                      "train_tokens", "held_out_tokens", "train", "held_out", "held_out_common")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
