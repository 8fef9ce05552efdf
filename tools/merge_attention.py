"""Multimodal attention merging (MAM): write a speech encoder folder whose self-attention is blended with a source's.

    python tools/merge_attention.py --encoder ~/.cache/speechlm/models/whisper-base --factor 0.1 \\
        --out ~/.cache/speechlm/models/whisper-base-mam0.1
    python tools/merge_attention.py --encoder ENC --source SRC --source-part encoder \\
        --factors 0.1,0.1,0.2,0.2,0.3,0.3 --projections q,k,v,o --rule spread --out FOLDER

Per attention layer l: W = (1 - a_l) W_encoder + a_l W_source for the chosen projections (see
speechlm/models/merging.py). ``--source`` defaults to the encoder's own folder: for Whisper that merges
the decoder's self-attention into the encoder (``--source-part auto`` = the decoder of an encoder-decoder
source). The output folder holds the *whole* model (``save_pretrained``), the encoder folder's other
files (feature extractor, tokenizer, generation config), and ``merge.json`` (factors, source,
projections, layer map); it is written into a temporary folder and renamed, so it is complete or absent.
Any recipe takes it as ``model.encoder=FOLDER``.

Learnable MAM (Whisper only): ``--learn-manifest M --learn-steps N`` trains the per-layer factors,
starting from ``--factor(s)``, on Whisper's own teacher-forced ASR loss over M's rows (``--learn-split``),
everything else frozen, and writes the learned factors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from speechlm.atomic import atomic_path
from speechlm.errors import ConfigError, ModelError, SpeechLMError
from speechlm.models.merging import PROJECTION_NAMES, RULES, learn_whisper_merge, merge_attention

#: Files of the encoder folder not copied to the output: weights (save_pretrained writes its own) and
#: the offline converter's completeness marker (it lists the original files' sizes).
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
SKIP_NAMES = ("speechlm_converted.json", "merge.json")


def load_full_model(path: str | Path) -> torch.nn.Module:
    """The whole HF model of a folder (its config's architecture, e.g. WhisperForConditionalGeneration), fp32."""
    import transformers
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a Hugging Face model folder ({e})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or AutoModel
    try:
        model = cls.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load {cls.__name__} ({e})") from None
    return model.eval()


def write_merged(model: torch.nn.Module, encoder_folder: str | Path, out: str | Path, record: dict) -> Path:
    """save_pretrained(model) + the encoder folder's other files + merge.json, atomically into ``out``."""
    out = Path(out).expanduser()
    encoder_folder = Path(encoder_folder).expanduser()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        if encoder_folder.is_dir():
            for f in sorted(encoder_folder.iterdir()):
                if (f.is_file() and not (tmp / f.name).exists() and f.name not in SKIP_NAMES
                        and not f.name.endswith(SKIP_SUFFIXES)):
                    shutil.copy2(f, tmp / f.name)
        (tmp / "merge.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--factors: comma-separated numbers expected, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="HF speech model folder or hub name (the target)")
    ap.add_argument("--source", default=None, help="HF model folder of the same width (default: --encoder)")
    ap.add_argument("--source-part", choices=("auto", "decoder", "encoder"), default="auto",
                    help="the source's attention stack (auto: the decoder of an encoder-decoder model)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--factor", type=float, help="one factor for every layer, in [0, 1]")
    g.add_argument("--factors", type=_floats, help="one factor per encoder layer, comma-separated")
    ap.add_argument("--projections", default="q,k,v", help=f"comma-separated among {','.join(PROJECTION_NAMES)}")
    ap.add_argument("--rule", choices=RULES, default="same", help="layer pairing (see layer_map)")
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    ap.add_argument("--learn-manifest", default=None, help="learnable MAM: train the factors on these rows")
    ap.add_argument("--learn-split", default="train", help="rows of --learn-manifest to use ('' = all)")
    ap.add_argument("--learn-steps", type=int, default=100)
    ap.add_argument("--learn-batch-size", type=int, default=4)
    ap.add_argument("--learn-max-utts", type=int, default=0, help="use the first N rows (0 = all)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    factors = args.factor if args.factor is not None else args.factors
    projections = tuple(p.strip() for p in args.projections.split(",") if p.strip())
    source_path = args.source or args.encoder
    try:
        model = load_full_model(args.encoder)
        same = Path(source_path).expanduser().resolve() == Path(args.encoder).expanduser().resolve()
        source = model if same else load_full_model(source_path)
        record = {"encoder": str(args.encoder), "source": str(source_path), "source_part": args.source_part}
        if args.learn_manifest:
            if getattr(model.config, "model_type", "") != "whisper" or not hasattr(model, "get_encoder"):
                raise ConfigError("--learn-manifest: learnable MAM from the CLI needs a Whisper model "
                                  "(WhisperForConditionalGeneration); use speechlm.models.merging from Python")
            from transformers import WhisperProcessor

            from speechlm.data.manifest import read_manifest

            processor = WhisperProcessor.from_pretrained(str(args.encoder))
            utts = [u for u in read_manifest(args.learn_manifest) if not args.learn_split or u.split == args.learn_split]
            if args.learn_max_utts:
                utts = utts[: args.learn_max_utts]
            if not utts:
                raise ConfigError(f"{args.learn_manifest}: no rows of split {args.learn_split!r}")
            report = learn_whisper_merge(model, processor, utts, args.learn_steps, factors, source, projections,
                                         args.rule, args.source_part, args.learn_batch_size, args.lr, args.seed,
                                         log=print)
            report["losses"] = [round(x, 5) for x in report["losses"]]
            record.update(report, learn_manifest=str(args.learn_manifest), learn_split=args.learn_split,
                          learn_utterances=len(utts))
        else:
            record.update(merge_attention(model, source, factors, projections, args.rule,
                                          source_part=args.source_part), learned=False)
        out = write_merged(model, args.encoder, args.out, record)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(record['factors'])} attention layers ({','.join(record['projections'])}; factors "
          + " ".join(f"{a:.4g}" for a in record["factors"]) + f") from {source_path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
