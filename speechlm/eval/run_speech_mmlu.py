"""The Speech-MMLU evaluation run (recipes/eval_speech_mmlu.py): text MMLU of the LLM alone and spoken-question
accuracy per connector and of the Whisper cascade, 0/k-shot, letter and cloze, per subject and per engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from speechlm.config import save_config
from speechlm.data.tts import engine_of
from speechlm.errors import ManifestError
from speechlm.eval import speech_mmlu as mm
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
from speechlm.eval.scoring import connector_label, load_front_end
from speechlm.eval.storycloze import resolve_eval_voices

log = logging.getLogger("eval_speech_mmlu")
TASK = "speech_mmlu"


@dataclass
class SpeechMMLUEvalConfig(SpokenEvalConfig):
    build_only: bool = False  # render data/<split> to out_dir/speech and stop
    speech: str = ""  # a built speech folder (its <split>/ subfolder is read, with its own texts); "" = render at run time
    split: str = "test"
    subjects: list[str] = field(default_factory=list)  # [] = all
    methods: list[str] = field(default_factory=lambda: ["cloze", "letter"])
    shots: list[int] = field(default_factory=lambda: [0, 5])
    headline_method: str = "cloze"  # which method goes into the summary
    # also each method with the question left out ("Question:" then "Answer:"): the options' own likelihood, the
    # floor a spoken question is measured from (the LLM alone, cheap)
    no_question: bool = True
    # also each connector with another question's speech (speech_other_<k>shot; not by default): the control for
    # what the question's content adds (speechlm.eval.speech_mmlu.other_questions); and its written twin, the LLM
    # alone with another question's text (text_other_<k>shot): what any question, not this one, adds
    other_question: bool = False
    name: str = "speech_mmlu"  # report file stem and summary key


def per_subject_rows(task: str, cond: str, connector: str, bnd: str, method: str, res: dict[str, list[bool]],
                     text: dict[str, list[bool]] | None) -> tuple[list[ResultRow], Accuracy]:
    rows, total, text_total = [], Accuracy(0, 0), Accuracy(0, 0)
    all_items: dict[str, bool] = {}
    all_text: dict[str, bool] | None = {} if text is not None else None
    for subject, outcomes in res.items():
        acc = Accuracy.of(outcomes)
        ref = Accuracy.of(text[subject]) if text is not None else None
        items = {f"{subject}/{i}": bool(x) for i, x in enumerate(outcomes)}  # item i of the subject's test list
        text_items = {f"{subject}/{i}": bool(x) for i, x in enumerate(text[subject])} if text is not None else None
        rows.append(ResultRow(f"{task}/{subject}", cond, connector, bnd, method, acc, ref, items, text_items))
        all_items |= items
        if all_text is not None and text_items is not None:
            all_text |= text_items
        total += acc
        text_total = text_total + ref if ref is not None else text_total
    rows.insert(0, ResultRow(f"{task}/all", cond, connector, bnd, method, total,
                             text_total if text is not None else None, all_items, all_text))
    return rows, total


def _csv_subjects(root: str, split: str, subjects: list[str] | None = None) -> dict[str, list[mm.MCItem]]:
    """``{subject: items}`` of ``root/<split>/*_<split>.csv``; ``{}`` when that folder holds none."""
    if not any((Path(root) / split).glob(f"*_{split}.csv")):
        return {}
    found = mm.read_mmlu_folder(root, split)
    return {k: v for k, v in found.items() if subjects is None or k in subjects}


def load_sets(cfg: SpeechMMLUEvalConfig, data: str, voices: list[str], want_speech: bool
              ) -> tuple[dict[str, list[mm.MCItem]], dict[str, list[mm.MCItem]] | None, dict[str, list[mm.SpokenMCItem]]]:
    """(test texts, dev exemplars or None, spoken items) per subject; spoken is ``{}`` unless ``want_speech``.

    Without ``speech``: the CSVs of ``data``, spoken with TTS. With it: the spoken set's subjects and
    its own texts (see recipes/eval_speech_mmlu.py); item order is the same in the texts and the speech.
    """
    subjects = cfg.subjects or None
    lim = (lambda v: v[:cfg.limit]) if cfg.limit else (lambda v: v)
    if not cfg.speech:
        test = {k: lim(v) for k, v in mm.read_mmlu_folder(data, cfg.split, subjects).items()}
        dev = mm.read_mmlu_folder(data, "dev", subjects) if any(cfg.shots) else None
        spoken = {s: mm.speak_items(v, voices, cfg.rate_wpm) for s, v in test.items()} if want_speech else {}
        return test, dev, spoken
    split_dir = Path(cfg.speech) / cfg.split
    own = mm.read_speech_mmlu_items(split_dir)
    csv = _csv_subjects(data, cfg.split)
    wanted = list(subjects) if subjects else sorted(own)
    missing = [s for s in wanted if s not in own and s not in csv]
    if missing:
        raise ManifestError(f"subject(s) {', '.join(missing)}: in neither the spoken set {split_dir} "
                            f"nor the MMLU CSVs of {Path(data) / cfg.split}")
    rendered = [s for s in wanted if s not in own]
    if rendered:
        log.info("subject(s) %s are not in %s: texts from %s, spoken with TTS now", ", ".join(rendered), split_dir, data)
    test = {s: lim(own[s] if s in own else csv[s]) for s in wanted}
    dev = None
    if any(cfg.shots):
        dev = _csv_subjects(data, "dev", wanted)
        if (Path(cfg.speech) / "dev").is_dir() and set(wanted) - set(dev):
            dev |= mm.read_speech_mmlu_items(Path(cfg.speech) / "dev", sorted(set(wanted) - set(dev)))
        need = max(cfg.shots)
        short = [s for s in wanted if len(dev.get(s, [])) < need]
        if short:
            raise ManifestError(f"{need}-shot needs {need} exemplars per subject; subject(s) {', '.join(short)} have "
                                f"fewer in {Path(data) / 'dev'} (<subject>_dev.csv) and {Path(cfg.speech) / 'dev'} "
                                "(<subject>.jsonl): add them, or use shots=[0]")
    spoken: dict[str, list[mm.SpokenMCItem]] = {}
    if want_speech:
        from_set = mm.read_speech_mmlu(split_dir, subjects=[s for s in wanted if s in own])
        spoken = {s: lim(from_set[s]) if s in own else mm.speak_items(test[s], voices, cfg.rate_wpm) for s in wanted}
    return test, dev, spoken


def engine_split(task: str, cond: str, connector: str, bnd: str, method: str, res: dict[str, list[bool]],
                 text: dict[str, list[bool]] | None, engines: dict[str, list[str]],
                 by_engine: dict[str, list[ResultRow]]) -> None:
    """Accuracy over all subjects per engine (``engines[subject][i]`` is item i's), added to ``by_engine``."""
    order = [s for s in engines if s in res]
    outcomes = [x for s in order for x in res[s]]
    ref = [x for s in order for x in text[s]] if text is not None else None
    template = ResultRow(f"{task}/all", cond, connector, bnd, method, Accuracy(0, 0))
    add_engine_rows(by_engine, engine_rows(template, outcomes, [e for s in order for e in engines[s]], ref))


def _shots_key(row: ResultRow, cascade: bool) -> str:
    cond, shots = row.condition.rsplit("_", 1)  # "speech" / "speech_other", "0shot"
    return f"cascade_acc_{shots}" if cascade else f"{cond}_acc_{shots}"


def mmlu_engine_summary(by_engine: dict[str, list[ResultRow]], method: str, text_cond: str,
                        connector: str | None) -> dict:
    """``{engine: {n, text_acc, speech_acc_<k>shot, cascade_acc_<k>shot}}`` for the headline method."""
    return engine_summary(by_engine, text_cond, connector, key=_shots_key, keep=lambda r: r.scoring == method)


def mmlu_speech_summary(alls: dict[str, ResultRow], rows: list[ResultRow], floor: ResultRow | None, method: str,
                        k: int) -> dict:
    """The summary figures of the first connector's ``k``-shot rows (``alls``: condition -> all-subjects row):
    accuracy and paired gains over the cascade and the floor; with the control, its own and the right question's
    gain over it."""
    speech, other = alls["speech"], alls.get("speech_other")
    out = headline_entry(speech, f"speech_{k}shot", acc_key=f"speech_acc_{k}shot")
    casc = [x for x in rows if (x.task, x.condition, x.connector, x.scoring)
            == (f"{TASK}/all", f"speech_{k}shot", CASCADE, method)]
    if casc:  # the connector against the Whisper cascade on the same questions
        out[f"speech_{k}shot_vs_cascade"] = compare(speech.items, casc[0].items).to_json()
    if floor is not None:  # what the spoken question adds over no question
        out[f"speech_{k}shot_vs_noquestion"] = compare(speech.items, floor.items).to_json()
    if other is not None:  # the control, and what the right question adds over another
        out |= headline_entry(other, f"speech_other_{k}shot", acc_key=f"speech_other_acc_{k}shot")
        out[f"speech_{k}shot_vs_speech_other"] = compare(speech.items, other.items).to_json()
        if floor is not None:
            out[f"speech_other_{k}shot_vs_noquestion"] = compare(other.items, floor.items).to_json()
    return out


def run(cfg: SpeechMMLUEvalConfig) -> dict:
    """The whole evaluation (or, ``build_only``, the rendering of the spoken set); see the recipe's docstring."""
    prepare_run(cfg)
    data = cfg.data or str(mm.embedded_set_path())
    voices = resolve_eval_voices(cfg.voices)
    if cfg.build_only:
        out = mm.build_speech_mmlu(data, Path(cfg.out_dir) / "speech", voices, cfg.split, cfg.rate_wpm)
        print(f"wrote {out}")
        return {"speech": str(out)}
    save_config(cfg, config_path(cfg))

    want_speech = not cfg.text_only and bool(cfg.connectors or cfg.cascade)
    test, dev, spoken = load_sets(cfg, data, voices, want_speech)
    llm, tok = load_eval_llm(cfg)

    rows: list[ResultRow] = []
    by_engine: dict[str, list[ResultRow]] = {}
    engines = {s: [engine_of(x.voice) for x in v] for s, v in spoken.items()}
    summary: dict = {}
    text_res: dict[tuple[str, int], dict[str, list[bool]]] = {}
    floors: dict[tuple[str, int], ResultRow] = {}  # (method, shots) -> the all-subjects row without the question
    blank = {subject: [replace(it, question="") for it in items] for subject, items in test.items()}
    others_text = mm.other_question_texts(test) if cfg.other_question else {}
    for method in cfg.methods:
        for k in cfg.shots:
            res = mm.eval_text(llm, tok, test, dev, method, k, cfg.batch_size)
            text_res[(method, k)] = res
            r, total = per_subject_rows(TASK, f"text_{k}shot", LLM_ALONE, "none", method, res, None)
            rows += r
            if spoken:
                engine_split(TASK, f"text_{k}shot", LLM_ALONE, "none", method, res, None, engines, by_engine)
            log.info("text %s %d-shot: %d/%d", method, k, total.correct, total.total)
            if method == cfg.headline_method and k == cfg.shots[0]:
                summary |= headline_entry(r[0], "text")
            if cfg.no_question:
                floor, floor_total = per_subject_rows(TASK, f"noquestion_{k}shot", LLM_ALONE, "none", method,
                                                      mm.eval_text(llm, tok, blank, dev, method, k, cfg.batch_size), res)
                rows += floor
                floors[(method, k)] = floor[0]
                log.info("no question %s %d-shot: %d/%d", method, k, floor_total.correct, floor_total.total)
                if method == cfg.headline_method and k == cfg.shots[0]:
                    summary |= headline_entry(floor[0], "noquestion")
            if cfg.other_question:  # the LLM alone, each item's options after another item's question text
                other, other_total = per_subject_rows(TASK, f"text_other_{k}shot", LLM_ALONE, "none", method,
                                                      mm.eval_text(llm, tok, others_text, dev, method, k,
                                                                   cfg.batch_size), res)
                rows += other
                log.info("another question's text %s %d-shot: %d/%d", method, k, other_total.correct,
                         other_total.total)
                if method == cfg.headline_method and k == cfg.shots[0]:
                    summary |= headline_entry(other[0], "text_other")
                    if (method, k) in floors:
                        summary["text_other_vs_noquestion"] = compare(other[0].items, floors[(method, k)].items).to_json()

    if spoken:
        if cfg.cascade:
            rows += cascade_rows(cfg, llm, tok, spoken, dev, text_res, engines, by_engine)
        # the spoken questions and, with other_question, the control: the same items, another question's speech
        sets = {"speech": spoken} | ({"speech_other": mm.other_questions(spoken)} if cfg.other_question else {})
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            front.memo = {}  # each question and option embedded once for all methods, shots and the control
            label = connector_label(folder, cfg.connectors)
            for method in cfg.methods:
                for k in cfg.shots:
                    alls: dict[str, ResultRow] = {}  # condition -> its all-subjects row
                    for cond, items in sets.items():
                        res = mm.eval_speech(model, front, items, dev, method, k, cfg.batch_size)
                        r, total = per_subject_rows(TASK, f"{cond}_{k}shot", label, front.label, method, res,
                                                    text_res[(method, k)])
                        rows += r
                        alls[cond] = r[0]
                        engine_split(TASK, f"{cond}_{k}shot", label, front.label, method, res, text_res[(method, k)],
                                     engines, by_engine)
                        log.info("%s %s %s %d-shot: %d/%d", label, cond, method, k, total.correct, total.total)
                    if method == cfg.headline_method and folder == cfg.connectors[0]:
                        summary |= mmlu_speech_summary(alls, rows, floors.get((method, k)), method, k)

    meta = {"data": data, "voices": ",".join(voices), "boundaries": cfg.boundaries, "llm": cfg.llm or "smollm2-135m",
            "split": cfg.split, "headline_method": cfg.headline_method}
    if cfg.speech:
        meta["speech"] = cfg.speech
    if by_engine:
        summary["by_engine"] = mmlu_engine_summary(by_engine, cfg.headline_method, f"text_{cfg.shots[0]}shot",
                                                   connector_label(cfg.connectors[0], cfg.connectors) if cfg.connectors else None)
    return publish(rows, by_engine, meta, summary, cfg.out_dir, cfg.name, cfg.summary)


def cascade_rows(cfg: SpeechMMLUEvalConfig, llm, tok, spoken: dict[str, list[mm.SpokenMCItem]],
                 dev: dict[str, list[mm.MCItem]] | None, text_res: dict, engines: dict[str, list[str]] | None = None,
                 by_engine: dict[str, list[ResultRow]] | None = None) -> list[ResultRow]:
    """Whisper transcribes the spoken question and options; the LLM answers the transcripts as text
    (``by_engine``, if given, gets the accuracy per engine of ``engines``)."""
    whisper = load_whisper(cfg)
    transcribed: dict[str, list[mm.MCItem]] = {}
    for subject, items in spoken.items():
        waves = [w.wave for s in items for w in [s.question] + s.options]
        hyp = whisper.transcribe(waves, cfg.batch_size)
        transcribed[subject] = [mm.MCItem(s.item.id, subject, hyp[5 * j] or ".", [h or "." for h in hyp[5 * j + 1:5 * j + 5]],
                                          s.item.answer) for j, s in enumerate(items)]
    rows = []
    for method in cfg.methods:
        for k in cfg.shots:
            res = mm.eval_text(llm, tok, transcribed, dev, method, k, cfg.batch_size)
            rows += per_subject_rows(TASK, f"speech_{k}shot", CASCADE, "none", method, res,
                                     text_res[(method, k)])[0]
            if by_engine is not None and engines is not None:
                engine_split(TASK, f"speech_{k}shot", CASCADE, "none", method, res,
                             text_res[(method, k)], engines, by_engine)
    return rows
