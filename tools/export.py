"""Export a trained run as one Hub-ready folder: connector, aligner, encoder adaptation, tokenizer, model card.

    python tools/export.py --run runs/tiny --out my-ssr [--push-to-hub me/my-ssr] [--overwrite]

Load it with ``SpeechLMPipeline.from_pretrained("my-ssr")``. Weights are safetensors only; the frozen encoder and
LLM are named (path, name, Hub id), not copied. --push-to-hub uploads the folder with huggingface_hub's
upload_folder (needs the network and a write token: HF_TOKEN or huggingface-cli login). What the folder holds:
speechlm/inference/pretrained.py; how it is made: speechlm/inference/export.py; docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import sys

from speechlm.errors import SpeechLMError
from speechlm.inference.export import export_run, push_to_hub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny", help="run folder (or a connector folder)")
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--connector", help="another connector folder than the run's stage2 (else stage1) one")
    ap.add_argument("--aligner", help="another aligner folder than the run's")
    ap.add_argument("--llm", help="the LLM folder (default: the one the connector names, in the models folder)")
    ap.add_argument("--encoder", help="the encoder folder (default: the one the connector names)")
    ap.add_argument("--llm-hub-id", help="the LLM's Hub id for the card and for loading elsewhere")
    ap.add_argument("--encoder-hub-id", help="the encoder's Hub id")
    ap.add_argument("--name", help="the model's name in the card (default: the --out folder's name)")
    ap.add_argument("--data-note", default="", help="a sentence about the training data for the model card")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hub model repo")
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run, args.out, connector=args.connector, aligner=args.aligner, llm=args.llm,
                         encoder=args.encoder, llm_hub_id=args.llm_hub_id, encoder_hub_id=args.encoder_hub_id,
                         name=args.name, data_note=args.data_note, overwrite=args.overwrite)
        print(f"exported {args.run} to {out}")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
