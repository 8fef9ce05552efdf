"""Local web demo of a trained SpeechLM: upload or record a clip, give an instruction, read the answer.

    .venv/bin/python tools/demo_server.py --run runs/tiny            # then open http://127.0.0.1:7860

The page shows the answer, the transcript the aligner decoded, and a picture of the LLM-token boundaries over
the clip's spectrogram; uploads are checked (audio, at most ``--max-mb`` MB and ``--max-seconds`` s). It listens
on 127.0.0.1 unless ``--host`` says otherwise. The page and its API: speechlm/serving/demo.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from speechlm.errors import SpeechLMError
from speechlm.inference import SpeechLMPipeline
from speechlm.serving.demo import MAX_MB, MAX_SECONDS, Demo, make_server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny", help="a run folder or a connector folder (default runs/tiny)")
    ap.add_argument("--connector", default=None)
    ap.add_argument("--aligner", default=None)
    ap.add_argument("--llm", default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860, help="0 = any free port")
    ap.add_argument("--max-mb", type=float, default=MAX_MB)
    ap.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipe = SpeechLMPipeline.from_run(args.run, connector=args.connector, aligner=args.aligner, llm=args.llm,
                                         encoder=args.encoder, device=args.device, dtype=args.dtype)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server = make_server(Demo(pipe, args.max_mb, args.max_seconds, run=args.run), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"SpeechLM demo on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
