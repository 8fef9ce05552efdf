"""Spoken StoryCloze: text / S->T / S accuracy of the LLM alone and of each connector, JSON + markdown report.

    python recipes/eval_storycloze.py [--config file.yaml] [key=value ...]
    python recipes/eval_storycloze.py connectors=[runs/tiny/stage2/connector] aligner=runs/tiny/aligner
    python recipes/eval_storycloze.py text_only=true            # the LLM alone on the embedded set

Data: ``data`` (a StoryCloze JSONL: ours, or a spoken manifest with audio paths; default the embedded
210-story set, rendered with eSpeak in the held-out ``voices``), evaluated with adversarial and/or
random wrong endings (``wrong_styles``); ``release`` (a TWIST sStoryCloze/tStoryCloze folder) adds the
whole-story S condition. Boundaries come from the aligner in ``boundaries=free`` mode (default) or
``forced`` (labelled in every row). ``cascade=true`` adds Whisper -> transcript -> LLM.

Every spoken figure (S->T, S, speech and cascade, and the text condition on the same stories) is also
reported per TTS engine of the story's voice (``voices[i % n]``, or a spoken manifest's ``speaker``;
see :func:`speechlm.eval.report.engine_of`): ``by_engine`` in the JSON report, a second markdown table,
and ``storycloze.by_engine`` in the summary (``{engine: {n, text_acc, s2t_acc, s_acc, cascade_s2t_acc,
cascade_s_acc}}``, first wrong-ending style, headline scoring, first connector).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from speechlm.config import load_config, save_config
from speechlm.errors import ConfigError
from speechlm.eval import storycloze as sc
from speechlm.eval.report import (
    Accuracy,
    ResultRow,
    add_engine_rows,
    engine_of,
    engine_rows,
    merge_summary,
    write_report,
)
from speechlm.eval.scoring import SCORINGS, connector_label, load_front_end
from speechlm.training.build import eval_dtype, load_llm

log = logging.getLogger("eval_storycloze")


@dataclass
class StoryClozeEvalConfig:
    llm: str = ""  # LLM folder ("" = embedded SmolLM2-135M)
    connectors: list[str] = field(default_factory=list)  # saved connector folders; empty = text only
    aligner: str = ""  # aligner folder (needed for SSR)
    encoder: str = ""  # encoder folder ("" = the one each connector names, in the models cache)
    boundaries: str = "free"  # "free" (honest test-time) | "forced" (reference transcript aligned)
    text_only: bool = False
    data: str = ""  # StoryCloze JSONL ("" = embedded mini set)
    wrong_styles: list[str] = field(default_factory=lambda: ["adversarial", "random"])
    release: str = ""  # optional TWIST sStoryCloze/tStoryCloze folder (whole-story S condition)
    voices: list[str] = field(default_factory=list)  # TTS voices ("engine:name"), or [natural] / [hard] ([] = natural)
    rate_wpm: int = 175
    limit: int = 0  # first N stories only (0 = all)
    conditions: list[str] = field(default_factory=lambda: ["text", "s2t", "s"])
    cascade: bool = False  # Whisper transcribes the spoken context/endings, the LLM reads them
    whisper: str = ""  # Whisper folder for the cascade ("" = embedded whisper-base)
    headline_scoring: str = "summed"  # which scoring goes into the summary
    batch_size: int = 8
    threads: int = 0  # torch threads (0 = leave as is)
    device: str = "cpu"
    dtype: str = "auto"  # LLM precision: auto (bf16 on a CUDA device that has it, else fp32), fp32, bf16, fp16
    out_dir: str = "runs/eval"
    name: str = "storycloze"  # report file stem and summary key (e.g. storycloze_hard for voices=[hard])
    summary: str = ""  # JSON file to merge {<name>: {text_acc, s2t_acc, s_acc, by_engine}} into


def rows_for(task: str, cond: str, connector: str, bnd: str, scores: list[sc.PairScores],
             text: list[sc.PairScores] | None) -> list[ResultRow]:
    out = []
    for s in SCORINGS:
        acc = Accuracy.of([p.correct(s) for p in scores])
        ref = Accuracy.of([p.correct(s) for p in text]) if text is not None else None
        out.append(ResultRow(task, cond, connector, bnd, s, acc, ref))
    return out


def engine_rows_for(task: str, cond: str, connector: str, bnd: str, scores: list[sc.PairScores],
                    text: list[sc.PairScores] | None, engines: list[str], by_engine: dict[str, list[ResultRow]]) -> None:
    """:func:`rows_for` per engine (``engines[i]`` is story i's), appended to ``by_engine``."""
    for s in SCORINGS:
        template = ResultRow(task, cond, connector, bnd, s, Accuracy(0, 0))
        add_engine_rows(by_engine, engine_rows(template, [p.correct(s) for p in scores], engines,
                                               [p.correct(s) for p in text] if text is not None else None))


def engine_summary(by_engine: dict[str, list[ResultRow]], task: str, scoring: str, connector: str | None) -> dict:
    """``{engine: {n, text_acc, s2t_acc, s_acc, cascade_s2t_acc, cascade_s_acc}}`` for one task and scoring."""
    out: dict[str, dict] = {}
    for e, rows in sorted(by_engine.items()):
        entry: dict[str, float | int | None] = {}
        for r in rows:
            if r.task != task or r.scoring != scoring:
                continue
            if r.connector == "llm" and r.condition == "text":
                entry["n"], entry["text_acc"] = r.accuracy.total, r.accuracy.value
            elif r.connector == connector:
                entry[f"{r.condition}_acc"] = r.accuracy.value
            elif r.connector == "cascade-whisper":
                entry[f"cascade_{r.condition}_acc"] = r.accuracy.value
        if entry:
            out[e] = entry
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(StoryClozeEvalConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    save_config(cfg, Path(cfg.out_dir) / f"{cfg.name}.config.yaml")

    llm, tok = load_llm(cfg.llm, eval_dtype(cfg.dtype, cfg.device))
    llm.to(cfg.device)
    data = cfg.data or str(sc.embedded_set_path())
    voices = sc.resolve_eval_voices(cfg.voices)
    rows: list[ResultRow] = []
    by_engine: dict[str, list[ResultRow]] = {}
    summary: dict = {}
    base = sc.read_story_items(data)
    base = base[:cfg.limit] if cfg.limit else base  # random wrong endings are drawn inside this subset
    if any(style not in sc.WRONG_STYLES for style in cfg.wrong_styles):
        raise ConfigError(f"wrong_styles must be among {sc.WRONG_STYLES}, got {cfg.wrong_styles}")
    spoken_cache: list[sc.SpokenStory] = []  # audio of the first style, reused by the others
    transcripts: dict[int, str] = {}  # the cascade's Whisper output per waveform, reused likewise
    for style in cfg.wrong_styles:
        items = base if style == "adversarial" else sc.random_wrong_endings(base, seed=0)
        task = f"storycloze/{style}"
        text = sc.score_text_condition(llm, tok, items, cfg.batch_size)
        rows += rows_for(task, "text", "llm", "none", text, None)
        log.info("%s text: %s", task, sc.accuracy_counts(text))
        if style == cfg.wrong_styles[0]:
            summary["text_acc"] = Accuracy.of([p.correct(cfg.headline_scoring) for p in text]).value
        if cfg.text_only:
            continue
        stories = reuse_audio(items, spoken_cache) if spoken_cache else sc.speak_items(items, voices, cfg.rate_wpm)
        spoken_cache = spoken_cache or stories
        engines = [engine_of(s.voice) for s in stories]
        engine_rows_for(task, "text", "llm", "none", text, None, engines, by_engine)
        if cfg.cascade:
            rows += cascade_rows(cfg, llm, tok, task, stories, text, transcripts, by_engine)
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            conds = [c for c in cfg.conditions if c in ("s2t", "s") and (c != "s" or front.uses_boundaries)]
            res = sc.score_speech_conditions(model, front, stories, conds, cfg.batch_size)
            for cond, scores in res.items():
                rows += rows_for(task, cond, connector_label(folder), front.label, scores, text)
                engine_rows_for(task, cond, connector_label(folder), front.label, scores, text, engines, by_engine)
                log.info("%s %s %s: %s", task, connector_label(folder), cond, sc.accuracy_counts(scores))
                if style == cfg.wrong_styles[0] and folder == cfg.connectors[0]:
                    summary[f"{cond}_acc"] = Accuracy.of([p.correct(cfg.headline_scoring) for p in scores]).value
            if cfg.release and style == cfg.wrong_styles[0]:
                pairs = sc.read_spoken_release(cfg.release)[: cfg.limit or None]
                rel = sc.score_release(model, front, pairs)
                rows += rows_for(f"release/{Path(cfg.release).name}", "s", connector_label(folder), front.label, rel, None)

    meta = {"data": data, "voices": ",".join(voices), "boundaries": cfg.boundaries, "llm": cfg.llm or "smollm2-135m",
            "headline_scoring": cfg.headline_scoring}
    js, md = write_report(rows, cfg.out_dir, cfg.name, meta, by_engine)
    print(md.read_text())
    if by_engine:
        summary["by_engine"] = engine_summary(by_engine, f"storycloze/{cfg.wrong_styles[0]}", cfg.headline_scoring,
                                              connector_label(cfg.connectors[0]) if cfg.connectors else None)
    if cfg.summary:
        merge_summary(cfg.summary, cfg.name, summary)
    return {"rows": [r.to_json() for r in rows], "summary": summary, "json": str(js), "markdown": str(md),
            "by_engine": {e: [r.to_json() for r in v] for e, v in sorted(by_engine.items())}}


def reuse_audio(items: list[sc.StoryItem], spoken: list[sc.SpokenStory]) -> list[sc.SpokenStory]:
    """Spoken stories for another wrong-ending style of the same stories: contexts and right endings are
    the same audio; a random-style wrong ending is another story's right ending, so its audio exists too."""
    by_id = {s.item.id: s for s in spoken}
    by_text = {s.item.right_ending: s.right for s in spoken} | {s.item.wrong_ending: s.wrong for s in spoken}
    out = []
    for it in items:
        base = by_id[it.id]
        out.append(sc.SpokenStory(it, base.context, base.right, by_text[it.wrong_ending], base.voice))
    return out


def cascade_rows(cfg: StoryClozeEvalConfig, llm, tok, task: str, stories: list[sc.SpokenStory],
                 text: list[sc.PairScores], transcripts: dict[int, str],
                 by_engine: dict[str, list[ResultRow]] | None = None) -> list[ResultRow]:
    """Whisper transcripts read by the LLM: S->T (transcribed context) and S (transcribed endings too).

    ``transcripts`` maps id(waveform) -> Whisper's text; styles that reuse the same audio tensors
    (see reuse_audio) are transcribed once. ``by_engine`` (if given) gets the same rows per engine."""
    from speechlm.eval.asr import WhisperCascade
    from speechlm.paths import WHISPER_BASE, default_model

    waves = [w for s in stories for w in (s.context.wave, s.right.wave, s.wrong.wave)]
    todo = list({id(w): w for w in waves if id(w) not in transcripts}.values())
    if todo:
        whisper = WhisperCascade(cfg.whisper or default_model(WHISPER_BASE), cfg.device)
        transcripts.update(zip(map(id, todo), whisper.transcribe(todo, cfg.batch_size)))
    hyp = [transcripts[id(w)] for w in waves]
    s2t, s_all = [], []
    for k, s in enumerate(stories):
        ctx, right, wrong = (h or "." for h in hyp[3 * k:3 * k + 3])
        s2t.append(sc.StoryItem(s.item.id, [ctx], s.item.right_ending, s.item.wrong_ending))
        s_all.append(sc.StoryItem(s.item.id, [ctx], right, wrong))
    engines = [engine_of(s.voice) for s in stories]
    rows = []
    for cond, items in (("s2t", s2t), ("s", s_all)):
        scores = sc.score_text_condition(llm, tok, items, cfg.batch_size)
        rows += rows_for(task, cond, "cascade-whisper", "none", scores, text)
        if by_engine is not None:
            engine_rows_for(task, cond, "cascade-whisper", "none", scores, text, engines, by_engine)
    return rows


if __name__ == "__main__":
    main()
