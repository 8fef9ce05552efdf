"""Writing an attention-merged (MAM) speech encoder folder (tools/merge_attention.py): load the whole HF model,
blend its attention with a source's (fixed or learned factors), save it with the encoder folder's other files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from speechlm.atomic import atomic_path
from speechlm.errors import ConfigError, ModelError
from speechlm.models.merging import merge_attention

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


def merge_encoder_folder(encoder: str | Path, out: str | Path, factors: float | Sequence[float], *,
                         source: str | Path | None = None, source_part: str = "auto",
                         projections: Sequence[str] = ("q", "k", "v"), rule: str = "same",
                         learn_manifest: str | Path | None = None, learn_split: str = "train", learn_steps: int = 100,
                         learn_batch_size: int = 4, learn_max_utts: int = 0, lr: float = 0.05, seed: int = 0,
                         log: Callable[[str], None] | None = print) -> tuple[Path, dict]:
    """Merge ``source``'s attention (default: the encoder's own folder, i.e. Whisper's decoder) into
    ``encoder`` and write the folder ``out``; returns (out, the merge.json record).

    ``learn_manifest``: learnable MAM (Whisper only): the per-layer factors, starting from ``factors``, are
    trained on Whisper's teacher-forced ASR loss over that manifest's rows of ``learn_split`` ('' = all; the
    first ``learn_max_utts``, 0 = all), everything else frozen."""
    source_path = source or encoder
    model = load_full_model(encoder)
    same = Path(source_path).expanduser().resolve() == Path(encoder).expanduser().resolve()
    src = model if same else load_full_model(source_path)
    record = {"encoder": str(encoder), "source": str(source_path), "source_part": source_part}
    if learn_manifest:
        if getattr(model.config, "model_type", "") != "whisper" or not hasattr(model, "get_encoder"):
            raise ConfigError("--learn-manifest: learnable MAM from the CLI needs a Whisper model "
                              "(WhisperForConditionalGeneration); use speechlm.models.merging from Python")
        from transformers import WhisperProcessor

        from speechlm.training.build import read_split
        from speechlm.training.whisper_merge import learn_whisper_merge

        processor = WhisperProcessor.from_pretrained(str(encoder))
        utts = read_split(str(learn_manifest), learn_split, learn_max_utts)
        report = learn_whisper_merge(model, processor, utts, learn_steps, factors, src, projections, rule,
                                     source_part, learn_batch_size, lr, seed, log=log)
        report["losses"] = [round(x, 5) for x in report["losses"]]
        record.update(report, learn_manifest=str(learn_manifest), learn_split=learn_split,
                      learn_utterances=len(utts))
    else:
        record.update(merge_attention(model, src, factors, projections, rule, source_part=source_part), learned=False)
    return write_merged(model, encoder, out, record), record
