"""charCTC, subCTC and CIF aligners side by side (plus PocketSphinx's forced alignment) on a corpus's test split:
boundary errors, CER and speed per decoder and mode (tools/benchmarks/bench_aligners.py)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from alignment.aligner import ENCODER_ADAPT_DIR
from alignment.decoders import DECODERS
from alignment.evaluation import EvalOptions, evaluate
from alignment.metrics import BoundaryErrors, SpeedMeter, word_boundary_errors
from alignment.tokens import normalize_for_alignment
from alignment.training import load_train_config, train
from speechlm.data.manifest import read_manifest
from speechlm.data.tts import engine_of
from speechlm.errors import ConfigError, ModelError, SpeechLMError
from speechlm.models.encoder_adapt import read_adaptation_config
from speechlm.perf.bench import pyplot, save_figure, write_json

KINDS = ("charCTC", "subCTC", "CIF")
CIF_FIRING = "cif_firing"
ALL_DECODERS = (*DECODERS, CIF_FIRING)
POCKETSPHINX = "PocketSphinx"
NOT_CTC = "CIF segments by its own integrate-and-fire weights; the CTC decoders need CTC posteriors"
NOT_CIF = "CIF firing needs a CIF aligner's firing weights; a CTC aligner has none"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- aligners
def _train_state(folder: Path) -> dict:
    path = folder.parent / f"{folder.name}.train_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def describe_aligner(kind: str, folder: Path) -> dict:
    """Kind-checked facts about a trained aligner folder: size, training steps (from its train_state)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() or not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder}: not a trained aligner folder (config.json and model.safetensors needed)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != kind:
        raise ModelError(f"{folder}: holds a {cfg.get('kind')!r} aligner, not {kind!r}")
    state = _train_state(folder)
    adapt_cfg = None
    if (folder / ENCODER_ADAPT_DIR).is_dir():                # an encoder adaptation trained with it (encoder_adapt.*)
        _, meta = read_adaptation_config(folder / ENCODER_ADAPT_DIR)
        adapt_cfg = {**meta["config"], "trainable_parameters": meta.get("trainable_parameters")}
    # The recipe rewrites train_state.json each time it saves a new best model, so its last history
    # entry is the step of the weights in the folder (a run may have gone on without improving).
    hist = state.get("history") or []
    return {
        "folder": str(folder), "d_model": cfg.get("d_model"), "layers": cfg.get("layers"),
        "encoder": cfg.get("encoder_name"), "encoder_layers": cfg.get("encoder_layers"), "encoder_adapt": adapt_cfg,
        "start_offset_frames": cfg.get("start_offset_frames"), "end_offset_frames": cfg.get("end_offset_frames"),
        "saved_at_step": hist[-1]["step"] if hist else None,
        "steps_configured": (state.get("config") or {}).get("steps"),
        "max_minutes": (state.get("config") or {}).get("max_minutes"),
        "batch_size": (state.get("config") or {}).get("batch_size"),
        "best_valid_cer": state.get("best_valid_cer"), "valid_history": hist,
        "minutes_to_saved_step": hist[-1]["minutes"] if hist else None,
    }


def train_aligner(kind: str, folder: Path, args) -> None:
    corpus = Path(args.corpus).expanduser()
    overrides = [f"train_manifest={corpus / 'train.jsonl'}", f"valid_manifest={corpus / 'valid.jsonl'}",
                 f"out_dir={folder}", f"model.kind={kind}", f"steps={args.train_steps}",
                 f"max_minutes={args.train_max_minutes}", f"tokenizer={args.tokenizer}"]
    if args.features:
        feats = Path(args.features).expanduser()
        overrides += [f"feature_cache_train={feats / 'train'}", f"feature_cache_valid={feats / 'valid'}"]
    if args.threads:
        overrides.append(f"threads={args.threads}")
    overrides += list(args.train_override)
    print(f"training {kind} into {folder}: recipes/train_aligner.py --config {args.train_config} "
          f"{' '.join(overrides)}", flush=True)
    try:  # what recipes/train_aligner.py runs with these overrides
        cfg = load_train_config(args.train_config, overrides)
        if cfg.missing_required():
            raise ConfigError(f"{', '.join(cfg.missing_required())} must be set")
        train(cfg)
    except SpeechLMError as e:
        raise ModelError(f"training the {kind} aligner into {folder} failed: {e}") from e


def resolve_aligners(args) -> dict[str, dict]:
    """``{kind: description}`` for every kind of ``args.kinds``: given, found in the work dir, or trained now."""
    given: dict[str, Path] = {}
    for spec in args.aligner:
        kind, sep, folder = spec.partition("=")
        if not sep or kind not in KINDS:
            raise SpeechLMError(f"--aligner {spec!r}: expected KIND=FOLDER with KIND one of {KINDS}")
        given[kind] = Path(folder).expanduser()
    out = {}
    for kind in args.kinds:
        trained_now, train_s = False, None
        if kind in given:
            folder = given[kind]
            if not folder.exists():
                raise ModelError(f"--aligner {kind}={folder}: folder not found")
        else:
            if not args.work_dir:
                raise SpeechLMError(f"no aligner for {kind}: pass --aligner {kind}=FOLDER or --work-dir")
            folder = Path(args.work_dir).expanduser() / kind
            if not (folder / "config.json").is_file():
                if args.no_train:
                    raise ModelError(f"{folder}: no trained {kind} aligner there (and --no-train)")
                t0 = time.perf_counter()
                train_aligner(kind, folder, args)
                trained_now, train_s = True, time.perf_counter() - t0
            else:
                print(f"reusing the {kind} aligner in {folder}", flush=True)
        out[kind] = {**describe_aligner(kind, folder), "trained_now": trained_now, "train_s": train_s}
    return out


# ---------------------------------------------------------------------------------------------- measuring
def encoder_rtf(folder: str, utts, args) -> dict:
    """Seconds of the aligner's encoder (with the adaptation it was trained with, if any) per second of audio,
    on the first ``--encoder-clips`` clips."""
    from alignment.aligner import Aligner
    from speechlm.data.audio import load_audio

    encoder = Aligner.from_pretrained(folder, None).load_encoder(args.encoder)
    clips = utts[: args.encoder_clips]
    waves = [load_audio(u.audio_path, target_sr=encoder.sample_rate, expected_sr=u.sample_rate) for u in clips]
    audio_s = sum(w.numel() for w in waves) / encoder.sample_rate
    la0 = load_avg()
    with torch.no_grad():
        encoder(waves[:1])                                           # warm-up, not timed
        t0 = time.perf_counter()
        for i in range(0, len(waves), args.batch_size):
            encoder(waves[i:i + args.batch_size])
        spent = time.perf_counter() - t0
    return {"encoder": encoder.name, "layers": list(encoder.layers), "clips": len(waves), "audio_s": audio_s,
            "compute_s": spent, "rtf": spent / audio_s, "load_avg_before": la0, "load_avg_after": load_avg()}


def _summary_fields(s: dict) -> dict:
    keys = ("mae_ms", "start_mae_ms", "end_mae_ms", "start_bias_ms", "end_bias_ms", "median_ms", "within_20ms", "within_50ms",
            "words_ref", "words_matched", "boundaries")
    return {k: s.get(k) for k in keys}


def evaluate_aligner(kind: str, info: dict, args, rtf_enc: float | None) -> list[dict]:
    """Rows of one aligner: every decoder x mode, measured (alignment.evaluation) or marked n/a."""
    corpus = Path(args.corpus).expanduser()
    is_cif = kind == "CIF"
    decoders = [DECODERS[0]] if is_cif else [d for d in args.decoders if d in DECODERS]
    ev = EvalOptions(manifest=str(corpus / "test.jsonl"), aligner=info["folder"], tokenizer=args.tokenizer,
                     encoder=args.encoder,
                     feature_cache=str(Path(args.features).expanduser() / "test") if args.features else "",
                     decoders=decoders, modes=list(args.modes), beam_size=0, batch_size=args.batch_size,
                     limit=args.limit, offset_ms=0.0)
    la0 = load_avg()
    t0 = time.perf_counter()
    report = evaluate(ev)
    wall = time.perf_counter() - t0
    la1 = load_avg()
    rows = []
    for decoder in args.decoders:
        applies = (decoder == CIF_FIRING) == is_cif
        if not applies:
            rows.append({"aligner": kind, "decoder": decoder, "mode": "-", "applies": False,
                         "reason": NOT_CTC if is_cif else NOT_CIF})
            continue
        for mode in args.modes:
            key = f"{decoders[0] if is_cif else decoder}/{mode}"      # CIF: evaluated once, decoder unused
            r = report["results"][key]
            rtf = r["rtf_aligner"]
            rows.append({
                "aligner": kind, "decoder": decoder, "mode": mode, "applies": True,
                **_summary_fields(r), "cer": r["cer"], "failed": r["failed"], "utterances": report["utterances"],
                "rtf_aligner": rtf,
                "rtf_with_encoder": (rtf + rtf_enc) if (rtf is not None and rtf_enc is not None) else None,
                "by_engine": {e: {"utterances": v["utterances"], "cer": v["cer"], **_summary_fields(v[key])}
                              for e, v in report["by_engine"].items()},
                "failures": report["failures"].get(key, [])[:5], "eval_wall_s": wall,
                "load_avg_before": la0, "load_avg_after": la1,
            })
    return rows


# ---------------------------------------------------------------------------------------------- PocketSphinx
_DIGRAPHS = {"th": ["TH"], "sh": ["SH"], "ch": ["CH"], "ph": ["F"], "ng": ["NG"], "ck": ["K"], "ee": ["IY"],
             "oo": ["UW"], "qu": ["K", "W"], "wh": ["W"], "ea": ["IY"], "ou": ["AW"], "ai": ["EY"]}
_LETTERS = {"a": ["AE"], "b": ["B"], "c": ["K"], "d": ["D"], "e": ["EH"], "f": ["F"], "g": ["G"], "h": ["HH"],
            "i": ["IH"], "j": ["JH"], "k": ["K"], "l": ["L"], "m": ["M"], "n": ["N"], "o": ["AA"], "p": ["P"],
            "q": ["K"], "r": ["R"], "s": ["S"], "t": ["T"], "u": ["AH"], "v": ["V"], "w": ["W"], "x": ["K", "S"],
            "y": ["IY"], "z": ["Z"]}


def crude_pronunciation(word: str) -> str:
    """A rough CMU-phone spelling of a word missing from the dictionary (digraphs, then letters)."""
    letters = re.sub(r"[^a-z]", "", word.lower())
    phones: list[str] = []
    i = 0
    while i < len(letters):
        pair = letters[i:i + 2]
        if pair in _DIGRAPHS:
            new, i = _DIGRAPHS[pair], i + 2
        else:
            new, i = _LETTERS[letters[i]], i + 1
        for p in new:
            if not phones or phones[-1] != p:          # a doubled letter is one sound
                phones.append(p)
    return " ".join(phones or ["AH"])


#: PocketSphinx search settings. Its defaults (bestpath on, beams 1e-48) lose the only path on many
#: synthetic clips (``seg()`` is None, or stops after a few words); PocketSphinx's own alignment test
#: turns bestpath off, and wider beams keep the forced path alive (the search space is one sentence).
#: A clip that still fails is tried once more with the second, wider setting (its time counts too).
PS_SEARCH = ({"bestpath": False, "beam": 1e-80, "wbeam": 1e-60, "pbeam": 1e-80},
             {"bestpath": False, "beam": 1e-120, "wbeam": 1e-100, "pbeam": 1e-120})
_PS_SKIP = ("<", "[", "+")                           # <s>, </s>, <sil>, [NOISE], +FILLER+


def _ps_align(dec, words: list[str], pcm: bytes) -> list[tuple[str, int, int]] | None:
    """Word segments ``(word, first frame, last frame)`` of a forced alignment, None when it failed."""
    dec.set_align_text(" ".join(words))
    dec.start_utt()
    dec.process_raw(pcm, full_utt=True)
    dec.end_utt()
    found = dec.seg()
    if found is None:
        return None
    segs = [(re.sub(r"\(\d+\)$", "", x.word), x.start_frame, x.end_frame) for x in found]
    segs = [x for x in segs if x[0] and not x[0].startswith(_PS_SKIP) and x[0] != "(NULL)"]
    return segs if [x[0] for x in segs] == words else None


def pocketsphinx_row(utts, args) -> dict:
    """PocketSphinx's forced alignment of the reference transcripts: boundary errors and RTF."""
    row = {"aligner": POCKETSPHINX, "decoder": "set_align_text", "mode": "forced"}
    if args.no_pocketsphinx:
        return {**row, "applies": False, "reason": "skipped (--no-pocketsphinx)"}
    try:
        import pocketsphinx
        from pocketsphinx import Decoder
    except ImportError:
        return {**row, "applies": False,
                "reason": "pocketsphinx is not installed (pip install -e .[bench], or pocketsphinx==5.1.*)"}
    from importlib.metadata import version

    import numpy as np

    from speechlm.data.audio import load_audio

    t0 = time.perf_counter()
    # default en-us acoustic model + CMU dictionary; no language model (alignment only)
    decs = [Decoder(lm=None, loglevel="FATAL", **kw) for kw in PS_SEARCH]
    load_s = time.perf_counter() - t0
    frate = float(decs[0].config["frate"])
    errors = BoundaryErrors()
    by_engine: dict[str, BoundaryErrors] = {}
    speed = SpeedMeter()
    oov: set[str] = set()
    oov_tokens, retried, failures = 0, 0, []
    la0 = load_avg()
    for utt in utts:
        ref = [(w.word, w.start_s, w.end_s) for w in utt.words]
        pieces = [normalize_for_alignment(w).text.split() for w, _, _ in ref]   # "eighty-three" -> 2 words
        flat = [p for ps in pieces for p in ps]
        eng = by_engine.setdefault(engine_of(utt.speaker), BoundaryErrors())
        if not flat:
            continue
        for p in flat:
            if decs[0].lookup_word(p) is None:
                for dec in decs:
                    dec.add_word(p, crude_pronunciation(p), True)
                oov.add(p)
            oov_tokens += p in oov
        wave = load_audio(utt.audio_path, target_sr=16000, expected_sr=utt.sample_rate).numpy()
        pcm = (np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        t1 = time.perf_counter()
        segs = None
        for k, dec in enumerate(decs):
            try:
                segs = _ps_align(dec, flat, pcm)
            except RuntimeError as e:
                failures.append(f"{utt.id}: {e}")
                break
            if segs is not None:
                retried += k > 0
                break
        speed.add(wave.size / 16000, time.perf_counter() - t1)
        if segs is None:
            if not failures or not failures[-1].startswith(f"{utt.id}:"):
                failures.append(f"{utt.id}: no complete alignment path, also with the wider beams")
            errors.words_ref += len(ref)
            eng.words_ref += len(ref)
            continue
        hyp, k = [], 0
        for (word, _, _), ps in zip(ref, pieces, strict=True):
            if ps:
                hyp.append((word, segs[k][1] / frate, (segs[k + len(ps) - 1][2] + 1) / frate))
                k += len(ps)
        e = word_boundary_errors(ref, hyp)
        errors.extend(e)
        eng.extend(e)
    s = errors.summary()
    return {**row, "applies": True, **_summary_fields(s), "cer": None,
            "cer_note": "forced alignment only (no free-mode transcript)",
            "failed": len(failures), "utterances": len(utts), "rtf_aligner": speed.rtf,
            "rtf_with_encoder": speed.rtf,            # its own front end: the whole path from the waveform
            "by_engine": {k: {"utterances": sum(1 for u in utts if engine_of(u.speaker) == k), "cer": None,
                              **_summary_fields(v.summary())} for k, v in sorted(by_engine.items())},
            "failures": failures[:5], "retried_wider_beams": retried, "search": list(PS_SEARCH),
            "oov_words": sorted(oov), "oov_word_tokens": oov_tokens,
            "model_load_s": load_s, "version": version("pocketsphinx"), "package": str(pocketsphinx.__file__),
            "load_avg_before": la0, "load_avg_after": load_avg()}


# ---------------------------------------------------------------------------------------------- output
def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def markdown_table(report: dict) -> str:
    engines = report["corpus"]["engines"]
    head = ["aligner (saved model's step)", "decoder", "mode", "word-boundary MAE ms (start / end)", "within 20 / 50 ms",
            "words scored", "CER (free transcript)", "RTF cached frames; with encoder",
            *[f"MAE / CER {e}" for e in engines], "load avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        info = report["aligners"].get(r["aligner"], {})
        name = r["aligner"]
        done, planned = info.get("saved_at_step"), info.get("steps_configured")
        if info.get("encoder_adapt"):
            name += f" + encoder {info['encoder_adapt']['method']}"
        if done:
            name += f" (step {done} of {planned})" if planned and planned != done else f" ({done} steps)"
        if not r["applies"]:
            cells = [name, r["decoder"], r["mode"], f"n/a: {r['reason']}", *[""] * (len(head) - 4)]
        else:
            by = r.get("by_engine", {})
            cells = [
                name, r["decoder"], r["mode"],
                f"**{_f(r['mae_ms'], '.1f')}** ({_f(r['start_mae_ms'], '.1f')} / {_f(r['end_mae_ms'], '.1f')})",
                f"{_f(r['within_20ms'], '.3f')} / {_f(r['within_50ms'], '.3f')}",
                f"{r['words_matched']} / {r['words_ref']}" + (f" ({r['failed']} failed)" if r.get("failed") else ""),
                _f(r["cer"], ".3f", "n/a"),
                f"{_f(r['rtf_aligner'], '.4f')}; {_f(r['rtf_with_encoder'], '.4f')}",
                *[f"{_f(by.get(e, {}).get('mae_ms'), '.1f')} / {_f(by.get(e, {}).get('cer'), '.3f')}" for e in engines],
                f"{r['load_avg_before'][0]}-{r['load_avg_after'][0]}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(report: dict, path: Path) -> None:
    plt = pyplot()
    rows = [r for r in report["rows"] if r["applies"] and r.get("mae_ms") is not None]
    labels = [f"{r['aligner']}\n{r['decoder']}/{r['mode']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 2), sharey=True)
    y = list(range(len(rows)))
    colors = [{"charCTC": "C0", "subCTC": "C1", "CIF": "C2"}.get(r["aligner"], "C3") for r in rows]
    for ax, key, title in ((axes[0], "mae_ms", "word-boundary MAE (ms)"), (axes[1], "cer", "CER (free transcript)"),
                           (axes[2], "rtf_aligner", "RTF, cached frames (s per s of audio)")):
        vals = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        ax.barh(y, vals, color=colors)
        for yi, v, r in zip(y, vals, rows, strict=True):
            ax.text(v, yi, " n/a" if r.get(key) is None else f" {v:.3g}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    m = report["machine"]
    fig.suptitle(f"Aligners on {report['corpus']['test_manifest']} ({report['corpus']['utterances']} clips, "
                 f"{report['corpus']['audio_s']:.0f} s); {m['cpus']} CPUs, load {m['load_avg_start'][0]}, "
                 f"{report['date'][:10]}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main
def check_inputs(args) -> None:
    corpus = Path(args.corpus).expanduser()
    need = ["test.jsonl"] + ([] if args.no_train else ["train.jsonl", "valid.jsonl"])
    for name in need:
        if not (corpus / name).is_file():
            raise SpeechLMError(f"{corpus / name}: manifest not found (--corpus must hold {', '.join(need)})")
    if args.features:
        feats = Path(args.features).expanduser()
        for split in ("test",) if args.no_train else ("train", "valid", "test"):
            if not (feats / split).is_dir():
                raise SpeechLMError(f"{feats / split}: feature cache not found (--features must hold "
                                    f"train/, valid/ and test/ from tools/cache_features.py)")
    if not Path(args.train_config).is_file():
        raise SpeechLMError(f"{args.train_config}: training config not found")


def run(args) -> dict:
    """Resolve (or train) the aligners, measure each and PocketSphinx; the report."""
    check_inputs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    la_start = load_avg()
    aligners = resolve_aligners(args)
    if args.threads:                                   # training may have changed it
        torch.set_num_threads(args.threads)
    test = Path(args.corpus).expanduser() / "test.jsonl"
    utts = [u for u in read_manifest(test) if u.words]
    if args.limit:
        utts = utts[: args.limit]
    if not utts:
        raise SpeechLMError(f"{test}: no rows with reference word timings")
    enc = None
    if args.encoder_clips > 0 and aligners:
        enc = encoder_rtf(next(iter(aligners.values()))["folder"], utts, args)
        same = {(a["encoder"], json.dumps(a["encoder_layers"])) for a in aligners.values()}
        if len(same) > 1:
            print(f"note: the aligners read different encoders {sorted(same)}; the encoder RTF is the first's")
    rows = []
    for kind, info in aligners.items():
        print(f"evaluating {kind} ({info['folder']})", flush=True)
        rows += evaluate_aligner(kind, info, args, enc["rtf"] if enc else None)
    ps = pocketsphinx_row(utts, args)
    if not ps["applies"]:
        print(f"PocketSphinx row skipped: {ps['reason']}")
    rows.append(ps)
    engines = sorted({engine_of(u.speaker) for u in utts})
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_start": la_start,
                    "load_avg_end": load_avg(), "platform": platform.platform(), "torch": torch.__version__},
        "corpus": {"test_manifest": str(test), "utterances": len(utts),
                   "audio_s": sum(u.duration_s for u in utts), "words": sum(len(u.words) for u in utts),
                   "engines": engines,
                   "utterances_by_engine": {e: sum(1 for u in utts if engine_of(u.speaker) == e) for e in engines},
                   "features": args.features or None},
        "aligners": aligners, "encoder": enc, "rows": rows,
    }


def write_outputs(report: dict, args) -> Path:
    """The JSON report (``args.out``), its plot (``args.plot``, default next to it) and the printed table."""
    write_json(args.out, report)
    plot = Path(args.plot or Path(args.out).with_suffix(".png"))
    save_plot(report, plot)
    m = report["machine"]
    print(f"\n{report['corpus']['utterances']} test clips, {report['corpus']['audio_s']:.0f} s of audio, "
          f"{report['corpus']['words']} words; {m['cpus']} CPUs, {m['torch_threads']} torch thread(s), load average "
          f"{m['load_avg_start']} -> {m['load_avg_end']}, {report['date']}")
    if report["encoder"]:
        e = report["encoder"]
        print(f"encoder RTF {e['rtf']:.4f} ({e['clips']} clips, {e['audio_s']:.0f} s, batch {args.batch_size})")
    print(markdown_table(report))
    print(f"\nwrote {args.out}\nplot: {plot}")
    return plot
