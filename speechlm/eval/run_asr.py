"""The zero-shot ASR evaluation run (recipes/eval_asr.py): WER/CER of each connector's greedy read-out, the text
oracle and Whisper, on a manifest and/or the LibriVox set, per TTS engine, with report files and summary entries.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from alignment.metrics import character_error_rate
from speechlm.atomic import atomic_write_text
from speechlm.data.tts import engine_of
from speechlm.errors import ConfigError
from speechlm.eval.asr import (
    DEFAULT_PROMPT,
    LIBRIVOX_DIR,
    read_asr_inputs,
    read_librivox_inputs,
    transcribe_speechlm,
    transcribe_text_oracle,
    word_error_rate,
)
from speechlm.eval.config import EvalConfig, load_eval_llm, load_whisper, prepare_run
from speechlm.eval.report import group_by_engine, merge_summary
from speechlm.eval.scoring import connector_label, load_front_end

log = logging.getLogger("eval_asr")


@dataclass
class ASREvalConfig(EvalConfig):
    manifest: str = ""  # a JSONL manifest; "librivox" = the LibriVox set only (as librivox=true)
    split: str = ""  # keep only rows of this split ("" = all)
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 256  # cap on a read-out's length (the limit itself is N + slack for N transcript tokens)
    slack: int = 0  # tokens a read-out may have beyond the N of its transcript (SSR: one vector per token)
    no_repeat_ngram: int = 3  # no n-gram of the read-out repeats (0 = off)
    librivox: bool = False  # also evaluate the LibriVox read speech of pocketsphinx-testdata (summary key asr_librivox)
    librivox_dir: str = str(LIBRIVOX_DIR)
    whisper_baseline: bool = False
    text_oracle: bool = True  # also read out the reference transcripts themselves: the read-out's ceiling
    name: str = "asr"  # report file stem; the summary keys are asr and asr_librivox


def result_row(system: str, boundaries: str, inputs: list, hyps: list[str]) -> dict:
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


def run(cfg: ASREvalConfig) -> dict:
    """Every system on every set; returns ``{"results": <first set's rows>, "sets": {summary key: rows}}``."""
    prepare_run(cfg)
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
        llm, tok = load_eval_llm(cfg)
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            for key, (_, _, inputs) in sets.items():
                hyps = transcribe_speechlm(model, front, inputs, cfg.prompt, **read)
                results[key].append(result_row(connector_label(folder, cfg.connectors), front.label, inputs, hyps))
                log.info("%s %s: WER %.3f", key, folder, results[key][-1]["wer"])
        if cfg.text_oracle:  # the same prompt and decoding on the transcripts: what perfect vectors would get
            for key, (_, _, inputs) in sets.items():
                hyps = transcribe_text_oracle(model, [x.text or "" for x in inputs], cfg.prompt, **read)
                results[key].append(result_row("llm/text-oracle", "none", inputs, hyps))
    if cfg.whisper_baseline:
        whisper = load_whisper(cfg)
        for key, (_, _, inputs) in sets.items():
            hyps = whisper.transcribe([x.wave for x in inputs], cfg.batch_size)
            results[key].append(result_row("whisper", "none", inputs, hyps))
    out = Path(cfg.out_dir)
    for key, (name, source, _) in sets.items():
        print(write_outputs(out, name, source, results[key]))
        if cfg.summary and results[key]:
            merge_summary(cfg.summary, key, summary_entry(results[key]))
    first = next(iter(sets))
    return {"results": results[first], "sets": results}
