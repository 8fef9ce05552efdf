"""Zero-shot ASR: greedy read-out of connector vectors through the frozen LLM, WER on a manifest (+ Whisper).

    python recipes/eval_asr.py manifest=runs/tiny/corpus/test.jsonl connectors=[runs/tiny/stage1/connector] \\
        aligner=runs/tiny/aligner [limit=50] [whisper_baseline=true] [text_oracle=true] [summary=runs/tiny/summary.json]

``text_oracle`` (on by default) reads the reference transcripts out through the same prompt and decoding:
the WER a connector whose vectors equalled the LLM's own embeddings would get (the frozen LLM's copying).

Writes ``<out_dir>/<name>.json`` (WER per system, boundary mode, the first hypotheses) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from alignment.metrics import character_error_rate
from speechlm.atomic import atomic_write_text
from speechlm.config import load_config
from speechlm.eval.asr import (
    DEFAULT_PROMPT,
    WhisperCascade,
    read_asr_inputs,
    transcribe_speechlm,
    transcribe_text_oracle,
    word_error_rate,
)
from speechlm.eval.report import merge_summary
from speechlm.eval.scoring import connector_label, load_front_end
from speechlm.training.build import eval_dtype, load_llm

log = logging.getLogger("eval_asr")


@dataclass
class ASREvalConfig:
    manifest: str = ""
    split: str = ""  # keep only rows of this split ("" = all)
    llm: str = ""
    connectors: list[str] = field(default_factory=list)
    aligner: str = ""
    encoder: str = ""
    boundaries: str = "free"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 64
    limit: int = 0
    whisper_baseline: bool = False
    text_oracle: bool = True  # also read out the reference transcripts themselves: the read-out's ceiling
    whisper: str = ""
    batch_size: int = 8
    threads: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # LLM precision: auto (bf16 on a CUDA device that has it, else fp32), fp32, bf16, fp16
    out_dir: str = "runs/eval"
    name: str = "asr"
    summary: str = ""  # JSON file to merge {"asr": {"wer": ...}} (first connector) into


def _row(system: str, boundaries: str, refs: list[str], hyps: list[str]) -> dict:
    """One result row: WER, and CER in the aligner's alphabet (comparable with tools/eval_alignment.py's CER)."""
    return {"system": system, "boundaries": boundaries, "wer": word_error_rate(refs, hyps),
            "cer": character_error_rate(refs, hyps), "n": len(refs),
            "examples": [[r, h] for r, h in zip(refs[:5], hyps[:5])]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(ASREvalConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inputs = read_asr_inputs(cfg.manifest, split=cfg.split or None, limit=cfg.limit or None)
    refs = [x.text or "" for x in inputs]
    results = []
    if cfg.connectors:
        llm, tok = load_llm(cfg.llm, eval_dtype(cfg.dtype, cfg.device))
        llm.to(cfg.device)
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            hyps = transcribe_speechlm(model, front, inputs, cfg.prompt, cfg.max_new_tokens, cfg.batch_size)
            results.append(_row(connector_label(folder), front.label, refs, hyps))
            log.info("%s: WER %.3f", folder, results[-1]["wer"])
        if cfg.text_oracle:  # the same prompt and decoding on the transcripts: what perfect vectors would get
            hyps = transcribe_text_oracle(model, refs, cfg.prompt, cfg.max_new_tokens, cfg.batch_size)
            results.append(_row("llm/text-oracle", "none", refs, hyps))
    if cfg.whisper_baseline:
        from speechlm.paths import WHISPER_BASE, default_model

        hyps = WhisperCascade(cfg.whisper or default_model(WHISPER_BASE), cfg.device).transcribe(
            [x.wave for x in inputs], cfg.batch_size)
        results.append(_row("whisper", "none", refs, hyps))
    out = Path(cfg.out_dir)
    atomic_write_text(out / f"{cfg.name}.json", json.dumps({"manifest": cfg.manifest, "results": results}, indent=2) + "\n")
    table = "| system | boundaries | n | WER % | CER % |\n|---|---|---|---|---|\n" + "".join(
        f"| {r['system']} | {r['boundaries']} | {r['n']} | {100 * r['wer']:.1f} | {100 * r['cer']:.1f} |\n"
        for r in results)
    atomic_write_text(out / f"{cfg.name}.md", f"# {cfg.name}\n\n- manifest: {cfg.manifest}\n\n" + table)
    print(table)
    if cfg.summary and results:
        merge_summary(cfg.summary, "asr", {"wer": results[0]["wer"], "system": results[0]["system"],
                                           "boundaries": results[0]["boundaries"]})
    return {"results": results}


if __name__ == "__main__":
    main()
