"""Speech-MMLU: text MMLU of the LLM alone and spoken-question accuracy per connector, 0/5-shot, letter and cloze.

    python recipes/eval_speech_mmlu.py [--config file.yaml] [key=value ...]
    python recipes/eval_speech_mmlu.py text_only=true                       # the LLM alone, embedded set
    python recipes/eval_speech_mmlu.py connectors=[runs/tiny/stage2/connector] aligner=runs/tiny/aligner
    python recipes/eval_speech_mmlu.py build_only=true out_dir=runs/speech_mmlu   # render the CSVs to audio

``data`` is an MMLU-format folder (``test/<subject>_test.csv``, ``dev/<subject>_dev.csv``; default: the
embedded mini set). Questions are spoken with eSpeak in the held-out ``voices`` at run time, or read
from ``speech`` (a folder written by ``build_only=true``). The text accuracy of the same LLM on the same
items is the forgetting check: with a frozen LLM it is identical to the LLM alone.
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
from speechlm.eval import speech_mmlu as mm
from speechlm.eval.report import Accuracy, ResultRow, merge_summary, write_report
from speechlm.eval.scoring import connector_label, load_front_end
from speechlm.eval.storycloze import default_eval_voices
from speechlm.training.build import eval_dtype, load_llm

log = logging.getLogger("eval_speech_mmlu")


@dataclass
class SpeechMMLUEvalConfig:
    llm: str = ""  # LLM folder ("" = embedded SmolLM2-135M)
    connectors: list[str] = field(default_factory=list)
    aligner: str = ""
    encoder: str = ""
    boundaries: str = "free"  # "free" | "forced"
    text_only: bool = False
    build_only: bool = False  # render data/<split> to out_dir/speech and stop
    data: str = ""  # MMLU-format folder ("" = embedded mini set)
    speech: str = ""  # a built speech folder (its <split>/ subfolder is read); "" = render at run time
    split: str = "test"
    subjects: list[str] = field(default_factory=list)  # [] = all
    methods: list[str] = field(default_factory=lambda: ["cloze", "letter"])
    shots: list[int] = field(default_factory=lambda: [0, 5])
    voices: list[str] = field(default_factory=list)
    rate_wpm: int = 175
    limit: int = 0  # first N questions per subject (0 = all)
    cascade: bool = False  # Whisper transcribes question and options, the LLM reads them
    whisper: str = ""
    headline_method: str = "cloze"  # which method goes into the summary
    batch_size: int = 8
    threads: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # LLM precision: auto (bf16 on a CUDA device that has it, else fp32), fp32, bf16, fp16
    out_dir: str = "runs/eval"
    name: str = "speech_mmlu"
    summary: str = ""  # JSON file to merge {"speech_mmlu": {text_acc, speech_acc_0shot, speech_acc_5shot}} into


def per_subject_rows(task: str, cond: str, connector: str, bnd: str, method: str, res: dict[str, list[bool]],
                     text: dict[str, list[bool]] | None) -> tuple[list[ResultRow], Accuracy]:
    rows, total, text_total = [], Accuracy(0, 0), Accuracy(0, 0)
    for subject, outcomes in res.items():
        acc = Accuracy.of(outcomes)
        ref = Accuracy.of(text[subject]) if text is not None else None
        rows.append(ResultRow(f"{task}/{subject}", cond, connector, bnd, method, acc, ref))
        total += acc
        text_total = text_total + ref if ref is not None else text_total
    rows.insert(0, ResultRow(f"{task}/all", cond, connector, bnd, method, total, text_total if text is not None else None))
    return rows, total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(SpeechMMLUEvalConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = cfg.data or str(mm.embedded_set_path())
    voices = cfg.voices or default_eval_voices()
    if cfg.build_only:
        out = mm.build_speech_mmlu(data, Path(cfg.out_dir) / "speech", voices, cfg.split, cfg.rate_wpm)
        print(f"wrote {out}")
        return {"speech": str(out)}
    save_config(cfg, Path(cfg.out_dir) / f"{cfg.name}.config.yaml")

    subjects = cfg.subjects or None
    test = mm.read_mmlu_folder(data, cfg.split, subjects)
    if cfg.limit:
        test = {k: v[:cfg.limit] for k, v in test.items()}
    dev = mm.read_mmlu_folder(data, "dev", subjects) if any(cfg.shots) else None
    llm, tok = load_llm(cfg.llm, eval_dtype(cfg.dtype, cfg.device))
    llm.to(cfg.device)

    rows: list[ResultRow] = []
    summary: dict[str, float | None] = {}
    text_res: dict[tuple[str, int], dict[str, list[bool]]] = {}
    for method in cfg.methods:
        for k in cfg.shots:
            res = mm.eval_text(llm, tok, test, dev, method, k, cfg.batch_size)
            text_res[(method, k)] = res
            r, total = per_subject_rows("speech_mmlu", f"text_{k}shot", "llm", "none", method, res, None)
            rows += r
            log.info("text %s %d-shot: %d/%d", method, k, total.correct, total.total)
            if method == cfg.headline_method and k == cfg.shots[0]:
                summary["text_acc"] = total.value

    if not cfg.text_only and (cfg.connectors or cfg.cascade):
        if cfg.speech:
            spoken = mm.read_speech_mmlu(Path(cfg.speech) / cfg.split)
            spoken = {s: v[:cfg.limit] if cfg.limit else v for s, v in spoken.items() if s in test}
        else:
            spoken = {s: mm.speak_items(v, voices, cfg.rate_wpm) for s, v in test.items()}
        if cfg.cascade:
            rows += cascade_rows(cfg, llm, tok, spoken, dev, text_res)
        for folder in cfg.connectors:
            model, front = load_front_end(folder, llm, tok, cfg.aligner, cfg.boundaries, cfg.encoder, cfg.device)
            for method in cfg.methods:
                for k in cfg.shots:
                    res = mm.eval_speech(model, front, spoken, dev, method, k, cfg.batch_size)
                    r, total = per_subject_rows("speech_mmlu", f"speech_{k}shot", connector_label(folder), front.label,
                                                method, res, text_res[(method, k)])
                    rows += r
                    log.info("%s %s %d-shot: %d/%d", connector_label(folder), method, k, total.correct, total.total)
                    if method == cfg.headline_method and folder == cfg.connectors[0]:
                        summary[f"speech_acc_{k}shot"] = total.value

    meta = {"data": data, "voices": ",".join(voices), "boundaries": cfg.boundaries, "llm": cfg.llm or "smollm2-135m",
            "split": cfg.split, "headline_method": cfg.headline_method}
    js, md = write_report(rows, cfg.out_dir, cfg.name, meta)
    print(md.read_text())
    if cfg.summary:
        merge_summary(cfg.summary, "speech_mmlu", summary)
    return {"rows": [r.to_json() for r in rows], "summary": summary, "json": str(js), "markdown": str(md)}


def cascade_rows(cfg: SpeechMMLUEvalConfig, llm, tok, spoken: dict[str, list[mm.SpokenMCItem]],
                 dev: dict[str, list[mm.MCItem]] | None, text_res: dict) -> list[ResultRow]:
    """Whisper transcribes the spoken question and options; the LLM answers the transcripts as text."""
    from speechlm.eval.asr import WhisperCascade
    from speechlm.paths import WHISPER_BASE, default_model

    whisper = WhisperCascade(cfg.whisper or default_model(WHISPER_BASE), cfg.device)
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
            rows += per_subject_rows("speech_mmlu", f"speech_{k}shot", "cascade-whisper", "none", method, res,
                                     text_res[(method, k)])[0]
    return rows


if __name__ == "__main__":
    main()
