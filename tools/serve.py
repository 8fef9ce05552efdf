"""The OpenAI-compatible server of a trained SpeechLM, with the page at / (docs/SERVING.md).

    .venv/bin/python tools/serve.py --run runs/tiny                 # then open http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/models

Listens on 127.0.0.1 unless --host says otherwise; --api-key makes every /v1 request need
"Authorization: Bearer <key>". Requests are batched (--max-batch, --max-wait-ms); a full queue (--queue-size)
answers 429. The Whisper cascade's answer is shown beside SSR's when --cascade finds a Whisper (auto: the
embedded whisper-base).
"""

from __future__ import annotations

import argparse
import os
import sys

from speechlm.errors import SpeechLMError
from speechlm.serving.config import ServerConfig
from speechlm.serving.launch import run_server


def main(argv: list[str] | None = None) -> int:
    d = ServerConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny", help="a run folder or a connector folder (default runs/tiny)")
    ap.add_argument("--connector", default=None)
    ap.add_argument("--aligner", default=None)
    ap.add_argument("--llm", default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--cascade", default="auto", help="Whisper folder of the cascade, 'auto' or 'off'")
    ap.add_argument("--host", default=d.host)
    ap.add_argument("--port", type=int, default=d.port, help="0 = any free port")
    ap.add_argument("--api-key", default=os.environ.get("SPEECHLM_API_KEY", ""),
                    help="require this Bearer key (default: $SPEECHLM_API_KEY; empty: none)")
    ap.add_argument("--model-name", default=d.model_name)
    ap.add_argument("--max-batch", type=int, default=d.max_batch)
    ap.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    ap.add_argument("--queue-size", type=int, default=d.queue_size)
    ap.add_argument("--max-mb", type=float, default=d.max_upload_bytes / 1048576)
    ap.add_argument("--max-seconds", type=float, default=d.max_audio_s)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--timeout-s", type=float, default=d.request_timeout_s)
    ap.add_argument("--stream-hop-s", type=float, default=d.stream_hop_s, help="speech in: re-encode every ... s")
    ap.add_argument("--stream-margin-s", type=float, default=d.stream_margin_s,
                    help="speech in: audio after a token's boundary before it is closed")
    ap.add_argument("--stream-context-s", type=float, default=d.stream_context_s,
                    help="speech in: re-encode only from this long before the last closed token (0: the buffer)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                           max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                           max_upload_bytes=int(args.max_mb * 1048576), max_audio_s=args.max_seconds,
                           max_tokens=args.max_tokens, default_max_tokens=min(64, args.max_tokens),
                           request_timeout_s=args.timeout_s, stream_hop_s=args.stream_hop_s,
                           stream_margin_s=args.stream_margin_s, stream_context_s=args.stream_context_s)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_server(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
