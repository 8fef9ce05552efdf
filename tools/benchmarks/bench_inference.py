"""Latency of one answer from a trained run on the CPU: a 5 s spoken clip, the default prompt, greedy decoding.

    python tools/benchmarks/bench_inference.py --run runs/tiny --threads 1 [--clip-s 5] [--repeats 5] [--json out.json]

One warm-up answer, then ``--repeats`` answers of the same clip through ``SpeechLMPipeline.generate`` (audio
array -> encoder -> aligner (free mode) -> connector -> LLM with a KV cache, stop at a newline or after
``--max-new-tokens``). Prints a table of the median and the fastest of each stage (encoder, aligner, connector,
first token = from the audio to the first answer token, whole answer) and the same as JSON. The clip is eSpeak
NG reading a fixed English text, cut (or padded with silence) to ``--clip-s`` seconds. Loading the models is
timed once and not part of the figures.
"""

from __future__ import annotations

from speechlm.perf.bench import add_timing_args, bench_parser
from speechlm.perf.benchmarks.inference import run


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    ap.add_argument("--run", default="runs/tiny")
    add_timing_args(ap, threads=1, repeats=5)
    ap.add_argument("--clip-s", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
