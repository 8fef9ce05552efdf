"""The spoken StoryCloze evaluation run (recipes/eval_storycloze.py): text / S->T / S accuracy of the LLM alone,
each connector and the Whisper cascade, per wrong-ending style, with per-engine breakdowns and a summary entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.config import save_config
from speechlm.data.tts import engine_of
from speechlm.errors import ConfigError
from speechlm.eval import storycloze as sc
from speechlm.eval.config import SpokenEvalConfig, config_path, load_eval_llm, load_whisper, prepare_run
from speechlm.eval.paired import compare
from speechlm.eval.report import (
    CASCADE,
    LLM_ALONE,
    Accuracy,
    ResultRow,
    add_engine_rows,
    engine_rows,
    engine_summary,
    headline_entry,
    publish,
)
from speechlm.eval.scoring import SCORINGS, connector_label, load_front_end

log = logging.getLogger("eval_storycloze")


@dataclass
class StoryClozeEvalConfig(SpokenEvalConfig):
    wrong_styles: list[str] = field(default_factory=lambda: ["adversarial", "random"])
    release: str = ""  # optional TWIST sStoryCloze/tStoryCloze folder (whole-story S condition)
    # endings: the endings alone, no context (the floor every context is measured from; the LLM alone, cheap);
    # s2t_other (not by default): s2t with another story's spoken context, the control for what the story adds
    conditions: list[str] = field(default_factory=lambda: ["text", "endings", "s2t", "s"])
    headline_scoring: str = "summed"  # which scoring goes into the summary
    name: str = "storycloze"  # report file stem and summary key (e.g. storycloze_hard for voices=[hard])

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(style not in sc.WRONG_STYLES for style in self.wrong_styles):
            raise ConfigError(f"wrong_styles must be among {sc.WRONG_STYLES}, got {self.wrong_styles}")
        if any(cond not in sc.CONDITIONS for cond in self.conditions):
            raise ConfigError(f"conditions must be among {sc.CONDITIONS}, got {self.conditions}")


def rows_for(task: str, cond: str, connector: str, bnd: str, scores: list[sc.PairScores],
             text: list[sc.PairScores] | None) -> list[ResultRow]:
    out = []
    for s in SCORINGS:
        items = {p.id: p.correct(s) for p in scores}
        text_items = {p.id: p.correct(s) for p in text} if text is not None else None
        acc = Accuracy.of(list(items.values()))
        ref = Accuracy.of(list(text_items.values())) if text_items is not None else None
        out.append(ResultRow(task, cond, connector, bnd, s, acc, ref, items, text_items))
    return out


def _row_of(rows: list[ResultRow], task: str, cond: str, scoring: str) -> ResultRow:
    """The last row added for ``task``/``cond``/``scoring`` (the one a summary entry describes)."""
    return next(r for r in reversed(rows) if (r.task, r.condition, r.scoring) == (task, cond, scoring))


def engine_rows_for(task: str, cond: str, connector: str, bnd: str, scores: list[sc.PairScores],
                    text: list[sc.PairScores] | None, engines: list[str], by_engine: dict[str, list[ResultRow]]) -> None:
    """:func:`rows_for` per engine (``engines[i]`` is story i's), appended to ``by_engine``."""
    for s in SCORINGS:
        template = ResultRow(task, cond, connector, bnd, s, Accuracy(0, 0))
        add_engine_rows(by_engine, engine_rows(template, [p.correct(s) for p in scores], engines,
                                               [p.correct(s) for p in text] if text is not None else None))


def storycloze_engine_summary(by_engine: dict[str, list[ResultRow]], task: str, scoring: str,
                              connector: str | None) -> dict:
    """``{engine: {n, text_acc, s2t_acc, s_acc, cascade_s2t_acc, cascade_s_acc}}`` for one task and scoring."""
    return engine_summary(by_engine, "text", connector,
                          key=lambda r, cascade: f"cascade_{r.condition}_acc" if cascade else f"{r.condition}_acc",
                          keep=lambda r: r.task == task and r.scoring == scoring)


def run(cfg: StoryClozeEvalConfig) -> dict:
    """The whole evaluation: report files, summary entry; returns rows, summary, paths and per-engine rows."""
    prepare_run(cfg)
    save_config(cfg, config_path(cfg))
    llm, tok = load_eval_llm(cfg)
    data = cfg.data or str(sc.embedded_set_path())
    voices = sc.resolve_eval_voices(cfg.voices)
    rows: list[ResultRow] = []
    by_engine: dict[str, list[ResultRow]] = {}
    summary: dict = {}
    base = sc.read_story_items(data)
    base = base[:cfg.limit] if cfg.limit else base  # random wrong endings are drawn inside this subset
    spoken_cache: list[sc.SpokenStory] = []  # audio of the first style, reused by the others
    # per connector, its vectors of every clip: the styles share their audio and the control reuses the contexts,
    # so each clip goes through the encoder, aligner and connector once (a few tens of MB for the whole set)
    memos: dict[str, dict] = {}
    transcripts: dict[int, str] = {}  # the cascade's Whisper output per waveform, reused likewise
    for style in cfg.wrong_styles:
        items = base if style == "adversarial" else sc.random_wrong_endings(base, seed=0)
        task = f"storycloze/{style}"
        text = sc.score_text_condition(llm, tok, items, cfg.batch_size)
        rows += rows_for(task, "text", LLM_ALONE, "none", text, None)
        log.info("%s text: %s", task, sc.accuracy_counts(text))
        endings = None
        if "endings" in cfg.conditions:
            endings = sc.score_text_condition(llm, tok, items, cfg.batch_size, context=False)
            rows += rows_for(task, "endings", LLM_ALONE, "none", endings, text)
            log.info("%s endings alone: %s", task, sc.accuracy_counts(endings))
        if style == cfg.wrong_styles[0]:
            summary |= headline_entry(_row_of(rows, task, "text", cfg.headline_scoring), "text")
            if endings is not None:
                summary |= headline_entry(_row_of(rows, task, "endings", cfg.headline_scoring), "endings")
        if cfg.text_only:
            continue
        stories = reuse_audio(items, spoken_cache) if spoken_cache else sc.speak_items(items, voices, cfg.rate_wpm)
        spoken_cache = spoken_cache or stories
        engines = [engine_of(s.voice) for s in stories]
        engine_rows_for(task, "text", LLM_ALONE, "none", text, None, engines, by_engine)
        if cfg.cascade:
            rows += cascade_rows(cfg, llm, tok, task, stories, text, transcripts, by_engine)
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            front.memo = memos.setdefault(folder, {})
            conds = [c for c in cfg.conditions if c in ("s2t", "s") and (c != "s" or front.uses_boundaries)]
            res = sc.score_speech_conditions(model, front, stories, conds, cfg.batch_size) if conds else {}
            if "s2t_other" in cfg.conditions:
                others = sc.other_story_contexts(stories)
                res["s2t_other"] = sc.score_speech_conditions(model, front, others, ["s2t"], cfg.batch_size)["s2t"]
            for cond, scores in res.items():
                rows += rows_for(task, cond, connector_label(folder, cfg.connectors), front.label, scores, text)
                engine_rows_for(task, cond, connector_label(folder, cfg.connectors), front.label, scores, text, engines, by_engine)
                log.info("%s %s %s: %s", task, connector_label(folder, cfg.connectors), cond, sc.accuracy_counts(scores))
                if style == cfg.wrong_styles[0] and folder == cfg.connectors[0]:
                    row = _row_of(rows, task, cond, cfg.headline_scoring)
                    summary |= headline_entry(row, cond)
                    if endings is not None and cond in ("s2t", "s2t_other"):  # what a spoken context adds over none
                        alone = _row_of(rows, task, "endings", cfg.headline_scoring)
                        summary[f"{cond}_vs_endings"] = compare(row.items, alone.items).to_json()
                    if cond == "s2t_other" and "s2t" in res:  # what the right story adds over another's
                        summary["s2t_vs_s2t_other"] = compare(_row_of(rows, task, "s2t", cfg.headline_scoring).items,
                                                              row.items).to_json()
                    if cfg.cascade and cond != "s2t_other":  # the connector against the Whisper cascade
                        casc = next(r for r in rows if (r.task, r.condition, r.connector, r.scoring)
                                    == (task, cond, CASCADE, cfg.headline_scoring))
                        summary[f"{cond}_vs_cascade"] = compare(row.items, casc.items).to_json()
            if cfg.release and style == cfg.wrong_styles[0]:
                pairs = sc.read_spoken_release(cfg.release)[: cfg.limit or None]
                rel = sc.score_release(model, front, pairs)
                rows += rows_for(f"release/{Path(cfg.release).name}", "s", connector_label(folder, cfg.connectors), front.label, rel, None)

    meta = {"data": data, "voices": ",".join(voices), "boundaries": cfg.boundaries, "llm": cfg.llm or "smollm2-135m",
            "headline_scoring": cfg.headline_scoring}
    if by_engine:
        summary["by_engine"] = storycloze_engine_summary(
            by_engine, f"storycloze/{cfg.wrong_styles[0]}", cfg.headline_scoring,
            connector_label(cfg.connectors[0], cfg.connectors) if cfg.connectors else None)
    return publish(rows, by_engine, meta, summary, cfg.out_dir, cfg.name, cfg.summary)


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
    waves = [w for s in stories for w in (s.context.wave, s.right.wave, s.wrong.wave)]
    todo = list({id(w): w for w in waves if id(w) not in transcripts}.values())
    if todo:
        transcripts.update(zip(map(id, todo), load_whisper(cfg).transcribe(todo, cfg.batch_size)))
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
        rows += rows_for(task, cond, CASCADE, "none", scores, text)
        if by_engine is not None:
            engine_rows_for(task, cond, CASCADE, "none", scores, text, engines, by_engine)
    return rows
