"""An exported SpeechLM folder (``tools/export.py``, :func:`speechlm.inference.export.export_run`) loaded back.

The folder, one self-contained unit a model hub can hold (safetensors weights only, no pickles)::

    speechlm.json        format, the files below, the encoder and LLM: name, the path they were trained from,
                         a Hub id when known; the run it came from
    README.md            the model card: metrics from the run's summary.json, data, intended use, limits
    connector/           config.json + model.safetensors (the trained connector)
    aligner/             config.json + model.safetensors (+ its encoder_adapt/), SSR connectors only
    encoder_adapt/       the encoder adaptation trained with the connector, when there is one
    tokenizer/           the LLM's tokenizer files (tokenizer.json, tokenizer_config.json, chat template ...)

The encoder and the LLM are frozen and not copied: :func:`load_pretrained` finds each at the path or the name
in speechlm.json (``llm=`` / ``encoder=`` override), in the models folder (:mod:`speechlm.paths`), or, with a
network, from its Hub id. ``SpeechLMPipeline.from_pretrained(folder)`` is the one-line way in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechlm.errors import CheckpointError, ModelError

CONFIG_FILE = "speechlm.json"
FORMAT = "speechlm-export"
VERSION = 1
#: File endings that may hold pickled Python objects: an export refuses them, a load never reads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
#: Hub ids of the embedded offline defaults (converted from other formats, see speechlm/models/convert.py).
DEFAULT_HUB_IDS = {"whisper-base": "openai/whisper-base", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def pickle_files(root: Path) -> list[str]:
    """Files under ``root`` (relative paths, sorted) whose ending says they may hold pickled Python objects."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


@dataclass
class Pretrained:
    """What an exported folder loads into: the model, its aligner, and where each part came from."""

    model: Any  # SpeechLM with its encoder and tokenizer
    aligner: Any  # alignment.aligner.Aligner, or None for connectors without boundaries
    connector: Path
    aligner_folder: Path | None
    llm: Path
    encoder: Path
    config: dict


def read_config(folder: str | Path) -> dict:
    """``speechlm.json`` of an exported folder, checked; :class:`ModelError` naming what is wrong."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: not an exported speechlm folder (no {CONFIG_FILE}; tools/export.py writes one)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path}: not a {FORMAT} config")
    if int(meta.get("version", 0)) > VERSION:
        raise ModelError(f"{path}: format version {meta.get('version')} is newer than this speechlm reads ({VERSION})")
    for key in ("connector", "tokenizer", "llm", "encoder"):
        if not meta.get(key):
            raise ModelError(f"{path}: no {key!r} entry")
    return meta


def _local_folder(folder: str | Path) -> Path:
    """``folder`` itself, or the local copy of a Hub repo id (``owner/name``) downloaded with huggingface_hub."""
    path = Path(folder).expanduser()
    if path.is_dir():
        return path
    text = str(folder)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ModelError(f"{folder}: exported folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text))
    except Exception as e:  # noqa: BLE001 -- offline, no such repo, no access: one clear message
        raise ModelError(f"{folder}: no such folder, and fetching it as a Hub repo failed ({type(e).__name__}: {e})"
                         ) from None


def _model_folder(entry: dict, override: str | Path | None, what: str, option: str) -> Path:
    """The encoder/LLM folder: ``override``, else the recorded path, the models folder's copy of its name, or
    a download of its Hub id (into ``<cache_dir>/hub/<name>``, so its folder name is the one trained on)."""
    from speechlm.paths import cache_dir, models_dir

    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise ModelError(f"{path}: {what} folder not found")
        return path
    name = str(entry.get("name") or "")
    tried = []
    for candidate in (entry.get("path"), models_dir() / Path(name).name if name else None,
                      cache_dir() / "hub" / Path(name).name if name else None):
        if candidate:
            tried.append(str(candidate))
            if Path(candidate).expanduser().is_dir():
                return Path(candidate).expanduser()
    hub_id = entry.get("hub_id")
    if hub_id and name:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=hub_id, local_dir=str(cache_dir() / "hub" / Path(name).name)))
        except Exception as e:  # noqa: BLE001 -- offline, gated, missing: one clear message
            tried.append(f"Hub {hub_id} ({type(e).__name__}: {e})")
    raise ModelError(f"{what} {name!r} of this export not found (tried {'; '.join(tried)}); give its folder with "
                     f"{option}")


def load_pretrained(folder: str | Path, *, llm: str | Path | None = None, encoder: str | Path | None = None,
                    device: str = "cpu", dtype: str = "auto") -> Pretrained:
    """Load an exported folder (or a Hub repo id of one): the SpeechLM with its encoder (adaptation installed),
    the exported tokenizer and, for SSR, the aligner, exactly as ``from_run`` loads the run it came from."""
    from transformers import AutoTokenizer

    from speechlm.eval.scoring import load_front_end
    from speechlm.training.build import eval_dtype, load_llm

    root = _local_folder(folder)
    meta = read_config(root)
    bad = pickle_files(root)
    if bad:
        raise CheckpointError(f"{root}: holds files that may be pickles ({', '.join(bad)}); refusing to load it")
    connector = root / meta["connector"]["folder"]
    aligner = root / meta["aligner"] if meta.get("aligner") else None
    llm_path = _model_folder(meta["llm"], llm, "LLM", "llm=")
    enc_path = _model_folder(meta["encoder"], encoder, "encoder", "encoder=")
    llm_model, _ = load_llm(str(llm_path), eval_dtype(dtype, device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root / meta["tokenizer"]))
    except (OSError, ValueError) as e:
        raise ModelError(f"{root / meta['tokenizer']}: cannot load the tokenizer ({e})") from None
    # the encoder adaptation, if any, is <root>/encoder_adapt: beside the connector folder, where load_front_end looks
    model, front = load_front_end(str(connector), llm_model.to(device), tokenizer, str(aligner or ""), "free",
                                  str(enc_path), device)
    return Pretrained(model, front.aligner, connector, aligner, llm_path, enc_path, meta)
