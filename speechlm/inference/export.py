"""A trained run exported as one Hub-ready folder (``tools/export.py``); loaded back by
``SpeechLMPipeline.from_pretrained`` (:mod:`speechlm.inference.pretrained` describes the folder).

    from speechlm.inference.export import export_run, push_to_hub

    export_run("runs/tiny", "my-ssr")              # the run's stage2 (else stage1) connector, aligner, ...
    push_to_hub("my-ssr", "me/my-ssr")              # huggingface_hub's upload_folder (needs network + a token)

The parts are found the way ``from_run`` finds them (:func:`speechlm.inference.pipeline.resolve_run`), so the
exported folder answers as ``from_run(run)`` does. Only safetensors weights and JSON/text files are written; a
source folder holding a pickle-capable file (``.bin``, ``.pt`` ...) is refused. The model card takes its metrics
from the run's ``summary.json`` (``tools/summarize_run.py``) and its data from the stages' ``config.yaml``.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

from speechlm.atomic import atomic_path
from speechlm.errors import CheckpointError, ModelError
from speechlm.inference.pipeline import resolve_run
from speechlm.inference.pretrained import CONFIG_FILE, DEFAULT_HUB_IDS, FORMAT, VERSION, pickle_files

#: Files of a run's model folders that are never exported (training state, not the model).
SKIP_NAMES = ("speechlm_converted.json",)


def _copy_folder(src: Path, dst: Path) -> list[str]:
    """Copy a model folder (recursively), refusing pickle-capable files; returns the copied names."""
    bad = pickle_files(src)
    if bad:
        raise CheckpointError(f"{src}: holds pickle-capable files ({', '.join(bad)}); an export holds safetensors "
                              "only")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*SKIP_NAMES, ".*"))
    return sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())


def _model_entry(path: Path, name: str, hub_id: str | None, extra: dict) -> dict:
    short = Path(name or path.name).name
    return {"name": short, "path": str(path.resolve()), "hub_id": hub_id or DEFAULT_HUB_IDS.get(short), **extra}


def _stage_data(run: Path) -> list[str]:
    """``stage: train manifest (split)`` of each stage config the run kept."""
    import yaml

    out = []
    for stage in ("stage1", "mid", "stage2"):
        path = run / stage / "config.yaml"
        if path.is_file():
            try:
                data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data", {})
            except (OSError, yaml.YAMLError):
                continue
            where = data.get("train_manifest") or data.get("train_shards") or "?"
            out.append(f"{stage}: `{where}` (split `{data.get('train_split') or 'all'}`)")
    return out


CARD_USE = """## Use

```python
from speechlm.inference import SpeechLMPipeline

pipe = SpeechLMPipeline.from_pretrained("{name}")   # this folder (or its Hub repo id)
print(pipe.generate("clip.wav").answer)             # default prompt: repeat what was said
```
"""

CARD_MODELS = """Weights are safetensors only. The encoder and the LLM are looked up by the path recorded in `speechlm.json`,
by name in the speechlm models folder (`SPEECHLM_MODELS`), or downloaded by Hub id;
`from_pretrained(folder, llm=..., encoder=...)` points at local copies. speechlm's offline defaults are converted
from other formats (Whisper base from CTranslate2 files, SmolLM2-135M-Instruct from a 4-bit GGUF file): the Hub
checkpoints of the same names hold slightly different weights, so answers with them can differ.
"""

CARD_END = """## Intended use

Research on speech-language models: feeding speech to a frozen text LLM as token-aligned vectors, comparing
connectors, probing what the LLM understands from speech. Input: speech like the training data's, any sample
rate (resampled to the encoder's), long clips cut into windows of at most 25 s.

## Limits

- The quality is bounded by the training data and the metrics above: a small synthetic-speech run shows the
  method working, not a usable assistant; check the metrics before relying on an answer.
- The aligner decodes its own transcript (free mode); its errors become the LLM's input.
- Only the languages, voices and acoustic conditions of the training data are covered; accents, noise,
  overlapping speakers and far-field audio are untested.
- The frozen LLM's biases and failure modes (made-up facts, unsafe text) are inherited unchanged.
- Not for decisions about people, transcripts of record, or identifying speakers.
"""


def model_card(meta: dict, summary: dict | None, run: Path, data_note: str = "") -> str:
    """The README.md of an export: YAML front matter for the Hub, then use, parts, data, metrics, limits."""
    from speechlm.eval.summary import headline, table

    enc, llm, conn = meta["encoder"], meta["llm"], meta["connector"]
    bases = [m["hub_id"] for m in (enc, llm) if m.get("hub_id")]
    front = ["---", "library_name: speechlm", "tags:", "- speech", "- audio", "- speech-language-model",
             "- ssr-connector"] + (["base_model:"] + [f"- {b}" for b in bases] if bases else []) + ["---", ""]
    intro = (f"An alignment-aware **{conn['type'].upper()} connector** (SSR: Tan et al., "
             "[arXiv 2410.00168](https://arxiv.org/abs/2410.00168)) that turns speech encoded by "
             f"`{enc['name']}` (layers {enc.get('layers')}) into one vector per token in the embedding space of "
             f"the frozen LLM `{llm['name']}`, trained by speechlm in two stages (stage 1: distillation onto the "
             "LLM's text embeddings; stage 2: next-token fine-tuning). The LLM and the encoder stay frozen and are "
             "not part of this folder.")
    rows = [f"| connector ({conn['type']}) | `{conn['folder']}/` | `{meta['source']['connector']}` |"]
    if meta.get("aligner"):
        rows.append(f"| aligner (free-mode token boundaries) | `{meta['aligner']}/` | `{meta['source']['aligner']}` |")
    if meta.get("encoder_adapt"):
        rows.append(f"| encoder adaptation | `{meta['encoder_adapt']}/` | beside the connector |")
    rows += [f"| tokenizer of the LLM | `{meta['tokenizer']}/` | `{llm['path']}` |",
             f"| speech encoder (not included) | name `{enc['name']}` | Hub: `{enc.get('hub_id') or 'unknown'}` |",
             f"| LLM (not included) | name `{llm['name']}` | Hub: `{llm.get('hub_id') or 'unknown'}` |"]
    data = [f"- {d}" for d in _stage_data(run)] or ["- (the run kept no stage config)"]
    corpus = (summary or {}).get("corpus") or {}
    keep = {k: corpus[k] for k in ("hours", "by_engine", "augmented_share", "whisper_wer_test") if k in corpus}
    if keep:
        data += ["", "Corpus: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in keep.items())]
    if data_note:
        data += ["", data_note.strip()]
    if summary:
        shown = {k: v for k, v in summary.items() if k != "wall_time_s"}
        source = f"From the run's `summary.json` (`{meta['source']['run']}`; the numbers: speechlm's docs/PERFORMANCE.md)."
        top = headline(summary)
        metrics = [source, ""] + ([top, "", "Speech and text score the same items; intervals are 95%."] if top else [])
        metrics += ["", "<details><summary>Every figure of the run's summary</summary>", "", table(shown), "",
                    "</details>"]
    else:
        metrics = ["The run had no `summary.json` (`tools/summarize_run.py --run RUN` writes it): no metrics."]
    end = CARD_END
    if meta.get("lora_not_exported"):
        end += "- The run also trained a LoRA adapter of the LLM; like `from_run`, this export does not use it.\n"
    lines = [f"# {meta['name']}: a speech connector for {llm['name']}", "", intro, "",
             CARD_USE.format(name=meta["name"]), "## What is in this folder", "", "| part | where | source |",
             "|---|---|---|", *rows, "", CARD_MODELS, "## Training data", "", *data, "", "## Metrics", "", *metrics,
             "", end, f"Exported {meta['exported']} from `{meta['source']['run']}` (format {FORMAT} v{VERSION})."]
    return "\n".join(front + lines) + "\n"


def export_run(run: str | Path, out: str | Path, *, connector: str | Path | None = None,
               aligner: str | Path | None = None, llm: str | Path | None = None, encoder: str | Path | None = None,
               llm_hub_id: str | None = None, encoder_hub_id: str | None = None, name: str | None = None,
               data_note: str = "", overwrite: bool = False) -> Path:
    """Write ``out``: the run's connector, aligner, encoder adaptation and LLM tokenizer, ``speechlm.json`` and
    the model card, atomically (a failed export leaves no half folder). Returns ``out``."""
    from transformers import AutoTokenizer

    from speechlm.models.connectors.base import CONFIG_FILE as CONNECTOR_CONFIG

    run, out = Path(run).expanduser(), Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ModelError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    folders = resolve_run(run, connector, aligner, llm, encoder)
    conn_meta = json.loads((folders.connector / CONNECTOR_CONFIG).read_text(encoding="utf-8"))
    run_dir = run if run.is_dir() and not (run / CONNECTOR_CONFIG).is_file() else folders.connector.parent.parent
    adapt = folders.connector.parent / "encoder_adapt"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": name or out.name,
        "connector": {"type": conn_meta["connector"], "folder": "connector"},
        "aligner": "aligner" if folders.aligner else None,
        "encoder_adapt": "encoder_adapt" if adapt.is_dir() else None,
        "tokenizer": "tokenizer",
        "encoder": _model_entry(folders.encoder, conn_meta.get("encoder", {}).get("name") or "", encoder_hub_id,
                                {"layers": conn_meta.get("encoder", {}).get("layers"),
                                 "frame_rate_hz": conn_meta.get("encoder", {}).get("frame_rate_hz")}),
        "llm": _model_entry(folders.llm, conn_meta.get("llm", {}).get("name") or "", llm_hub_id,
                            {"hidden_size": conn_meta.get("llm", {}).get("hidden_size"),
                             "vocab_size": conn_meta.get("llm", {}).get("vocab_size")}),
        "source": {"run": str(run_dir.resolve()), "connector": str(folders.connector.resolve()),
                   "aligner": str(folders.aligner.resolve()) if folders.aligner else None},
        "metrics": summary,
        "exported": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "lora_not_exported": (folders.connector.parent / "lora").is_dir(),
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        files = {"connector": _copy_folder(folders.connector, tmp / "connector")}
        if folders.aligner:
            files["aligner"] = _copy_folder(folders.aligner, tmp / "aligner")
        if adapt.is_dir():
            files["encoder_adapt"] = _copy_folder(adapt, tmp / "encoder_adapt")
        try:
            AutoTokenizer.from_pretrained(str(folders.llm)).save_pretrained(str(tmp / "tokenizer"))
        except (OSError, ValueError) as e:
            raise ModelError(f"{folders.llm}: cannot read the LLM's tokenizer ({e})") from None
        meta["files"] = files
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(meta, summary, run_dir, data_note), encoding="utf-8")
        bad = pickle_files(tmp)
        if bad:  # e.g. a tokenizer that saved a pickled file
            raise CheckpointError(f"{out}: the export would hold pickle-capable files ({', '.join(bad)})")
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "speechlm export") -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created if missing) with huggingface_hub's
    ``upload_folder``; returns the commit URL. Needs the network and a write token (``HF_TOKEN`` or
    ``huggingface-cli login``); any failure is one :class:`ModelError` saying so."""
    from speechlm.inference.pretrained import read_config

    read_config(folder)  # only what export_run wrote
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ModelError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    except Exception as e:  # noqa: BLE001 -- offline, no token, no rights: one clear message
        raise ModelError(f"pushing {folder} to the Hub repo {repo_id!r} failed ({type(e).__name__}: {e}); it needs "
                         "the network and a write token (HF_TOKEN or huggingface-cli login); the exported folder "
                         "is complete and can be uploaded later") from None
    return str(getattr(info, "commit_url", info))
