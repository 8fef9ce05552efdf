"""Where a trained run keeps what inference needs: its connector (stage 2, else stage 1), its aligner, and the
LLM and encoder the connector's config names (:func:`resolve_run`). :mod:`speechlm.inference.pipeline` loads
them; its names are re-exported there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechlm.errors import CheckpointError, ModelError

RUN_CONNECTORS = ("stage2/connector", "stage1/connector")  # where a run keeps its connector, best first


@dataclass
class RunFolders:
    connector: Path
    aligner: Path | None  # None: a connector without boundaries needs none
    llm: Path
    encoder: Path


def _connector_meta(folder: Path) -> dict[str, Any]:
    import json

    path = folder / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a connector config ({e})") from None
    if not isinstance(meta, dict) or "connector" not in meta or "config" not in meta:
        raise CheckpointError(f"{path}: not a connector config (no 'connector' / 'config' keys)")
    return meta


def _is_connector(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _model_folder(name: str, what: str, option: str) -> Path:
    """A model the connector names: the name itself when it is a folder, else that folder in speechlm.paths' models dir."""
    from speechlm.paths import models_dir

    if name and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    folder = models_dir() / Path(name).name
    if not name or not folder.is_dir():
        raise ModelError(f"{what} {name!r} of the connector not found in {models_dir()} (run tools/prepare_models.py, "
                         f"or give its folder with {option})")
    return folder


def resolve_run(run: str | Path = "runs/tiny", connector: str | Path | None = None, aligner: str | Path | None = None,
                llm: str | Path | None = None, encoder: str | Path | None = None) -> RunFolders:
    """The folders a run's inference needs. ``run`` is a run folder (its ``stage2/connector``, else
    ``stage1/connector``, and ``aligner``) or a connector folder; ``connector``/``aligner``/``llm``/``encoder``
    override each; the LLM and encoder default to the ones the connector's config names, in the models dir."""
    run = Path(run).expanduser()
    if connector:
        conn = Path(connector).expanduser()
    elif _is_connector(run):
        conn = run
    elif not run.is_dir():
        raise ModelError(f"{run}: run folder not found")
    else:
        found = [run / c for c in RUN_CONNECTORS if _is_connector(run / c)]
        if not found:
            raise ModelError(f"{run}: no trained connector in this run folder (looked for "
                             f"{' and '.join(c + '/' for c in RUN_CONNECTORS)}); train one first or pass the "
                             "connector folder")
        conn = found[0]
    if not _is_connector(conn):
        raise ModelError(f"{conn}: not a connector folder (config.json and model.safetensors expected)")
    meta = _connector_meta(conn)
    align = None
    if aligner:
        align = Path(aligner).expanduser()
    elif meta["connector"] == "ssr":
        candidates = [run / "aligner", conn.parent.parent / "aligner"]
        align = next((c for c in candidates if (c / "config.json").is_file()), None)
        if align is None:
            raise ModelError(f"{conn}: an SSR connector needs an aligner for its token boundaries; none found at "
                             f"{candidates[0]} (pass the aligner folder)")
    if align is not None and not (align / "config.json").is_file():
        raise ModelError(f"{align}: aligner folder not found (config.json expected)")
    llm_path = Path(llm).expanduser() if llm else _model_folder(meta.get("llm", {}).get("name", ""), "LLM", "--llm")
    enc_path = (Path(encoder).expanduser() if encoder
                else _model_folder(meta.get("encoder", {}).get("name", "") or "whisper-base", "encoder", "--encoder"))
    for path, what in ((llm_path, "LLM"), (enc_path, "encoder")):
        if not path.is_dir():
            raise ModelError(f"{path}: {what} folder not found")
    return RunFolders(conn, align, llm_path, enc_path)
