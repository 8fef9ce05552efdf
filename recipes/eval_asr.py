"""Zero-shot ASR: greedy read-out of connector vectors through the frozen LLM, WER on a manifest (+ Whisper).

    python recipes/eval_asr.py manifest=runs/tiny/corpus/test.jsonl connectors=[runs/tiny/stage1/connector] \\
        aligner=runs/tiny/aligner [limit=50] [whisper_baseline=true] [text_oracle=true] [summary=runs/tiny/summary.json]
    python recipes/eval_asr.py librivox=true connectors=[...] aligner=...     # real read speech (also: manifest=librivox)

The read-out generates at most N + ``slack`` tokens for a transcript of N tokens (SSR: one vector per
token; ``slack`` 0 by default), stops at a line end, is never empty and repeats no ``no_repeat_ngram``-gram
(3; 0 = off); ``max_new_tokens`` caps it (see speechlm/eval/asr.py).
``text_oracle`` (on by default) reads the reference transcripts out through the same prompt and decoding:
the WER a connector whose vectors equalled the LLM's own embeddings would get (the frozen LLM's copying).

``librivox=true`` adds the five LibriVox utterances of Debian's ``pocketsphinx-testdata``
(``librivox_dir``, default /usr/share/pocketsphinx/test/data/librivox): human read speech, never synthesized.

Writes ``<out_dir>/<name>.json`` (WER/CER per system, boundary mode, the first hypotheses, and ``by_engine``:
the same per TTS engine of the manifest's ``speaker``, with item counts) and ``.md``; the LibriVox set
goes to ``<name>_librivox.json``/``.md``. ``summary`` gets ``asr`` (manifest) and ``asr_librivox``:
``wer``, ``cer``, ``n``, ``system``, ``boundaries`` of the first system and ``by_engine``
(``{engine: {n, wer, cer, <system>_wer, <system>_cer}}``; other systems as ``whisper_*``, ``text_oracle_*``).
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
from speechlm.errors import ConfigError
from speechlm.eval.asr import (
    DEFAULT_PROMPT,
    LIBRIVOX_DIR,
    WhisperCascade,
    read_asr_inputs,
    read_librivox_inputs,
    transcribe_speechlm,
    transcribe_text_oracle,
    word_error_rate,
)
from speechlm.eval.report import engine_of, group_by_engine, merge_summary
from speechlm.eval.scoring import connector_label, load_front_end
from speechlm.training.build import eval_dtype, load_llm

log = logging.getLogger("eval_asr")


@dataclass
class ASREvalConfig:
    manifest: str = ""  # a JSONL manifest; "librivox" = the LibriVox set only (as librivox=true)
    split: str = ""  # keep only rows of this split ("" = all)
    llm: str = ""
    connectors: list[str] = field(default_factory=list)
    aligner: str = ""
    encoder: str = ""
    boundaries: str = "free"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 256  # cap on a read-out's length (the limit itself is N + slack for N transcript tokens)
    slack: int = 0  # tokens a read-out may have beyond the N of its transcript (SSR: one vector per token)
    no_repeat_ngram: int = 3  # no n-gram of the read-out repeats (0 = off)
    librivox: bool = False  # also evaluate the LibriVox read speech of pocketsphinx-testdata (summary key asr_librivox)
    librivox_dir: str = str(LIBRIVOX_DIR)
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
    summary: str = ""  # JSON file to merge {"asr": {"wer": ..., "by_engine": ...}} (first system) into


def _row(system: str, boundaries: str, inputs: list, hyps: list[str]) -> dict:
    """One result row: WER, and CER in the aligner's alphabet (comparable with tools/eval_alignment.py's CER),
    overall and per TTS engine of each utterance's speaker (``by_engine``: ``{engine: {wer, cer, n}}``)."""
    refs = [x.text or "" for x in inputs]
    engines = [engine_of(x.speaker) for x in inputs]
    pairs = group_by_engine(engines, list(zip(refs, hyps)))
    by_engine = {e: {"wer": word_error_rate([r for r, _ in p], [h for _, h in p]),
                     "cer": character_error_rate([r for r, _ in p], [h for _, h in p]), "n": len(p)}
                 for e, p in pairs.items()}
    return {"system": system, "boundaries": boundaries, "wer": word_error_rate(refs, hyps),
            "cer": character_error_rate(refs, hyps), "n": len(refs),
            "examples": [[r, h] for r, h in zip(refs[:5], hyps[:5])], "by_engine": by_engine}


def _system_key(system: str) -> str:
    """A system's prefix in the summary's by_engine entries: ``llm/text-oracle`` -> ``text_oracle``."""
    return system.rsplit("/", 1)[-1].replace("-", "_")


def summary_entry(results: list[dict]) -> dict:
    """The summary entry of one evaluation set: the first system's WER/CER, and per engine its figures
    (``wer``, ``cer``, ``n``) plus the other systems' as ``<system>_wer`` / ``<system>_cer``."""
    head = results[0]
    by_engine: dict[str, dict] = {e: dict(v) for e, v in head["by_engine"].items()}
    for r in results[1:]:
        if r["system"] in ("whisper", "llm/text-oracle"):
            for e, v in r["by_engine"].items():
                by_engine.setdefault(e, {"n": v["n"]}).update({f"{_system_key(r['system'])}_wer": v["wer"],
                                                              f"{_system_key(r['system'])}_cer": v["cer"]})
    return {"wer": head["wer"], "cer": head["cer"], "n": head["n"], "system": head["system"],
            "boundaries": head["boundaries"], "by_engine": by_engine}


def _report(results: list[dict]) -> dict:
    """``{engine: [rows]}`` of the JSON report (each row: system, boundaries, wer, cer, n)."""
    out: dict[str, list[dict]] = {}
    for r in results:
        for e, v in r["by_engine"].items():
            out.setdefault(e, []).append({"system": r["system"], "boundaries": r["boundaries"], **v})
    return dict(sorted(out.items()))


def write_outputs(out: Path, name: str, source: str, results: list[dict]) -> str:
    """``<name>.json`` and ``<name>.md`` of one evaluation set; returns the markdown tables."""
    rows = [{k: v for k, v in r.items() if k != "by_engine"} for r in results]
    by_engine = _report(results)
    atomic_write_text(out / f"{name}.json", json.dumps({"manifest": source, "results": rows, "by_engine": by_engine},
                                                       indent=2) + "\n")
    table = "| system | boundaries | n | WER % | CER % |\n|---|---|---|---|---|\n" + "".join(
        f"| {r['system']} | {r['boundaries']} | {r['n']} | {100 * r['wer']:.1f} | {100 * r['cer']:.1f} |\n"
        for r in results)
    table += "\n## By TTS engine\n\n| engine | system | boundaries | n | WER % | CER % |\n|---|---|---|---|---|---|\n" + "".join(
        f"| {e} | {r['system']} | {r['boundaries']} | {r['n']} | {100 * r['wer']:.1f} | {100 * r['cer']:.1f} |\n"
        for e, rs in by_engine.items() for r in rs)
    atomic_write_text(out / f"{name}.md", f"# {name}\n\n- manifest: {source}\n\n" + table)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(ASREvalConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # evaluation sets: summary key -> (report name, source, inputs)
    sets: dict[str, tuple[str, str, list]] = {}
    if cfg.manifest and cfg.manifest != "librivox":
        sets["asr"] = (cfg.name, cfg.manifest, read_asr_inputs(cfg.manifest, split=cfg.split or None,
                                                               limit=cfg.limit or None))
    if cfg.librivox or cfg.manifest == "librivox":
        sets["asr_librivox"] = (f"{cfg.name}_librivox", cfg.librivox_dir,
                                read_librivox_inputs(cfg.librivox_dir, limit=cfg.limit or None))
    if not sets:
        raise ConfigError("nothing to evaluate: give manifest=<jsonl> and/or librivox=true")
    results: dict[str, list[dict]] = {key: [] for key in sets}
    read = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "slack": cfg.slack,
            "no_repeat_ngram": cfg.no_repeat_ngram}
    if cfg.connectors:
        llm, tok = load_llm(cfg.llm, eval_dtype(cfg.dtype, cfg.device))
        llm.to(cfg.device)
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            for key, (_, _, inputs) in sets.items():
                hyps = transcribe_speechlm(model, front, inputs, cfg.prompt, **read)
                results[key].append(_row(connector_label(folder), front.label, inputs, hyps))
                log.info("%s %s: WER %.3f", key, folder, results[key][-1]["wer"])
        if cfg.text_oracle:  # the same prompt and decoding on the transcripts: what perfect vectors would get
            for key, (_, _, inputs) in sets.items():
                hyps = transcribe_text_oracle(model, [x.text or "" for x in inputs], cfg.prompt, **read)
                results[key].append(_row("llm/text-oracle", "none", inputs, hyps))
    if cfg.whisper_baseline:
        from speechlm.paths import WHISPER_BASE, default_model

        whisper = WhisperCascade(cfg.whisper or default_model(WHISPER_BASE), cfg.device)
        for key, (_, _, inputs) in sets.items():
            hyps = whisper.transcribe([x.wave for x in inputs], cfg.batch_size)
            results[key].append(_row("whisper", "none", inputs, hyps))
    out = Path(cfg.out_dir)
    for key, (name, source, _) in sets.items():
        print(write_outputs(out, name, source, results[key]))
        if cfg.summary and results[key]:
            merge_summary(cfg.summary, key, summary_entry(results[key]))
    first = next(iter(sets))
    return {"results": results[first], "sets": results}


if __name__ == "__main__":
    main()
