"""``tools/serve.py``: load a run and serve it (:mod:`speechlm.serving.server`) until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from speechlm.errors import SpeechLMError
from speechlm.serving.config import ServerConfig


def cascade_folder(option: str) -> Path | None:
    """The Whisper folder of the cascade: ``off`` -> none; ``auto`` -> the embedded whisper-base when it is there;
    else the folder given."""
    from speechlm.paths import WHISPER_BASE, default_model

    if option == "off":
        return None
    folder = default_model(WHISPER_BASE) if option == "auto" else Path(option).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if option == "auto":
        return None
    raise SpeechLMError(f"{folder}: no Whisper model folder for the cascade (config.json expected)")


def run_server(args: argparse.Namespace, cfg: ServerConfig) -> int:
    """Load ``args.run`` (+ the cascade's Whisper) and serve it with ``cfg``; 1 on a load error."""
    import torch

    from speechlm.inference import SpeechLMPipeline
    from speechlm.serving.server import create_app, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipe = SpeechLMPipeline.from_run(args.run, connector=args.connector, aligner=args.aligner, llm=args.llm,
                                         encoder=args.encoder, device=args.device, dtype=args.dtype)
        folder = cascade_folder(args.cascade)
        cascade = None
        if folder is not None:
            from speechlm.eval.asr import WhisperCascade

            cascade = WhisperCascade(folder, args.device)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = create_app(pipe, cfg, cascade=cascade, run=str(args.run))
    print(f"SpeechLM server on http://{cfg.host}:{cfg.port} (page at /, OpenAI API at /v1; Ctrl-C to stop)"
          + ("" if cascade else "; no Whisper cascade"), flush=True)
    serve(app, cfg)
    return 0
