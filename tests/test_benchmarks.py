"""The issue-15 benchmarks' own logic: compression counts, peak-memory reading, the quality table's parsing."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import ROOT, make_world, run_recipe, stage1_overrides

from speechlm.eval.report import Accuracy, ResultRow, write_report
from speechlm.perf.benchmarks import compression as bench_compression
from speechlm.perf.benchmarks import quality as bench_quality


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("bench_world"), n_train=6, n_valid=2)


def test_compression_counts_follow_each_connector(world):
    from transformers import AutoTokenizer

    from speechlm.data.feature_cache import FeatureCache
    from speechlm.data.manifest import read_manifest

    res = bench_compression.measure(world["manifest"], world["cache"], world["llm"])
    cache = FeatureCache.open(world["cache"])
    utts = read_manifest(world["manifest"])
    frames = [cache.frames(u.id) for u in utts]
    seconds = sum(frames) / cache.frame_rate_hz
    tok = AutoTokenizer.from_pretrained(world["llm"])
    rows = {r["connector"]: r for r in res["rows"]}
    assert res["utterances"] == len(utts) and res["audio_s"] == pytest.approx(seconds)
    ssr = rows["SSR (reference tokens)"]
    assert ssr["vectors"] == sum(len(tok(u.text, add_special_tokens=False).input_ids) for u in utts)
    # the baselines: one vector per k frames, the last group padded
    assert rows["stack k=8 (Ultravox)"]["vectors"] == sum(math.ceil(f / 8) for f in frames)
    assert rows["conv k=5 (SLAM-LLM)"]["vectors"] == sum(math.ceil(f / 5) for f in frames)
    assert rows["stack k=8 (Ultravox)"]["vectors_per_s"] == pytest.approx(sum(math.ceil(f / 8) for f in frames) / seconds)
    # long clips: a baseline's own count for that many frames; SSR: its measured rate x duration
    assert rows["stack k=8 (Ultravox)"]["seq_len"]["300s"] == math.ceil(300 * cache.frame_rate_hz / 8)
    assert rows["conv k=5 (SLAM-LLM)"]["seq_len"]["30s"] == 30 * 50 // 5
    assert ssr["seq_len"]["30s"] == round(30 * ssr["vectors_per_s"])
    q = rows["Q-Former 0.33 s (SALMONN)"]
    assert 2.5 < q["seq_len"]["300s"] / 300 < 3.5  # ~3 windows a second
    assert "| SSR (reference tokens) |" in bench_compression.table(res)


def test_peak_rss_sees_a_large_allocation():
    """In a fresh process (whose high-water mark is where it stands), touching 160 MiB raises the peak by as much."""
    code = ("import numpy as np; from speechlm.perf.bench import peak_rss_mib; "
            "before = peak_rss_mib(); block = np.ones(160 * 2**20 // 8); after = peak_rss_mib(); "
            "print(before, after, block.sum() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert out[2] == "True" and after - before > 140, out


@pytest.mark.slow
def test_training_steps_each_in_a_child_process(world, tmp_path):
    """bench_training end to end on the tiny world: one child process per step, the stage module from the factory."""
    run = tmp_path / "tiny"
    (run / "aligned").mkdir(parents=True)
    (run / "aligned" / "train.jsonl").write_text(Path(world["manifest"]).read_text())
    (run / "aligned" / "audio").symlink_to(Path(world["manifest"]).parent / "audio", target_is_directory=True)
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "train").symlink_to(world["cache"], target_is_directory=True)
    proc = run_recipe("stage1_distill.py", "stage1_tiny.yaml",
                      stage1_overrides(world, run / "stage1", **{"loop.max_steps": 1, "loop.eval_every": 0,
                                                                 "loop.save_every": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "training.json"
    proc = _script("bench_training.py", "--run", str(run), "--preset", "tiny", "--features", str(tmp_path / "feats"),
                   "--llm", world["llm"], "--encoder", world["enc"], "--only", "ssr,stack,stage1-cache",
                   "--repeats", "1", "--json", str(out), "--png", str(tmp_path / "training.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["ssr", "stack", "stage1-cache"] and "ssr_vs_stack_throughput" in result["targets"]
    assert rows["ssr"]["tokens"] == rows["stack"]["tokens"] == rows["stage1-cache"]["tokens"] > 0
    assert rows["ssr"]["speech_vectors"] == rows["ssr"]["tokens"]  # SSR: one vector per token
    assert rows["stack"]["speech_vectors"] > 0 and rows["ssr"]["trainable_params"] == rows["stage1-cache"][
        "trainable_params"]  # the same stage-1 connector trains in both
    assert all(r["peak_rss_mib"] >= r["peak_rss_loaded_mib"] > 0 for r in rows.values())
    assert "| ssr |" in proc.stdout and (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def _report(folder: Path, name: str, rows: list[ResultRow]) -> None:
    write_report(rows, folder, name)


def test_quality_collect_reads_the_evaluation_reports(tmp_path):
    """The table is read from the reports the evaluation recipes write (speechlm.eval.report), per connector and
    seed (the reports name a connector by its run folder, ``<name>-s<seed>/connector``)."""
    names = ["ssr", "stack", "ssr-mid"]
    text = Accuracy(7, 10)
    sc = []
    for style in ("adversarial", "random"):
        sc.append(ResultRow(f"storycloze/{style}", "text", "llm", "none", "summed", text))
        if style == "adversarial":  # the endings alone: the floor line, where the report has it
            sc.append(ResultRow(f"storycloze/{style}", "endings", "llm", "none", "summed", Accuracy(6, 10), text))
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "ssr-s0/connector", "free", "summed", Accuracy(6, 10), text))
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "ssr-s0/connector", "free", "length_norm", Accuracy(1, 10),
                            text))
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "stack-s0/connector", "none", "summed", Accuracy(5, 10),
                            text))
        # another seed's row of the same connector must not be read for seed 0
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "ssr-s1/connector", "free", "summed", Accuracy(9, 10), text))
    _report(tmp_path, "storycloze", sc)
    mm = [ResultRow("speech_mmlu/all", "speech_0shot", "ssr-s0/connector", "free", "cloze", Accuracy(3, 8),
                    Accuracy(6, 8)),
          ResultRow("speech_mmlu/all", "speech_5shot", "ssr-s0/connector", "free", "cloze", Accuracy(8, 8),
                    Accuracy(6, 8)),
          ResultRow("speech_mmlu/geography", "speech_0shot", "stack-s0/connector", "none", "cloze", Accuracy(1, 1),
                    Accuracy(1, 1))]
    _report(tmp_path, "speech_mmlu", mm)
    (tmp_path / "asr.json").write_text(json.dumps({"results": [{"system": "stack-s0/connector", "wer": 0.5},
                                                               {"system": "ssr-s0/connector", "wer": 0.25}]}))
    metrics = {f"{n}-s0": {"steps": 100, "final_valid": {"loss_speech": 5.0, "loss_text": 4.0},
                           "step_time_s_median": 1.0} for n in names}  # as a stage's metrics.json has them
    metrics["ssr-mid-s0"] = {**metrics["ssr-mid-s0"], "steps": 60, "mid": {"steps": 40}}  # what train() returns
    reports = {k: tmp_path / f"{k}.json" for k in ("storycloze", "speech_mmlu", "asr")}
    rows = bench_quality.collect([(n, 0) for n in names], metrics, {f"{n}-s0": reports for n in names})
    ssr, stack, mid = rows
    assert mid["steps"] == 100 and mid["mid_steps"] == 40 and ssr["mid_steps"] == 0
    assert mid["storycloze_adversarial"] is None and mid["asr_wer"] is None  # no reports for it: missing, not made up
    assert ssr["storycloze_adversarial"]["acc"] == 0.6 and ssr["storycloze_adversarial"]["parity"] == pytest.approx(6 / 7, abs=1e-4)
    assert ssr["storycloze_random"]["text"] == 0.7
    assert ssr["storycloze_adversarial"]["floor"] == 0.6 and stack["storycloze_adversarial"]["floor"] == 0.6
    assert "floor" not in ssr["storycloze_random"] and "floor" not in ssr["mmlu_0shot"]  # not in the reports
    assert ssr["mmlu_0shot"]["acc"] == 0.375 and ssr["asr_wer"] == 0.25
    assert ssr["mmlu_0shot"]["text"] == 0.75  # the text line of the Speech-MMLU panel
    assert ssr["mmlu_5shot"]["acc"] == 1.0 and stack["mmlu_5shot"] is None  # 5-shot: its own row
    assert stack["storycloze_adversarial"]["acc"] == 0.5 and stack["asr_wer"] == 0.5
    assert ssr["valid_loss_speech"] == 5.0 and ssr["valid_loss_text"] == 4.0
    assert stack["mmlu_0shot"] is None  # only a per-subject row: the overall one is missing, not made up
    table = bench_quality.table(rows)
    assert "| SSR (stage 1 + 2) | 0 | 100 | 1.00 | 5.000 (4.000) |" in table and "60.0 [31, 83] (0.86)" in table
    assert "| SSR (stage 1 + mid + 2) | 0 | 40 + 60 | 1.00 |" in table
    assert "| 37.5 [14, 69] (0.50) | 100.0 [68, 100] (1.33) |" in table  # MMLU 0-shot, 5-shot
    assert ssr["seed"] == 0 and ssr["items"]["storycloze_adversarial"] is None  # rows written without outcomes
    bench_quality.plot(rows, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def _script(name: str, *argv: str) -> subprocess.CompletedProcess:
    """A benchmark script's command line, run as the user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "benchmarks" / name), *argv], check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_quality_refuses_unknown_connectors_and_missing_runs(tmp_path):
    from speechlm.errors import ConfigError

    proc = _script("bench_quality.py", "--connectors", "ssr,mlp", "--run", str(tmp_path))
    assert proc.returncode != 0 and f"{ConfigError.__name__}: bench_quality --connectors: unknown choice(s) ['mlp']" in proc.stderr
    proc = _script("bench_quality.py", "--run", str(tmp_path / "nope"), "--llm", str(tmp_path), "--encoder",
                   str(tmp_path))
    assert proc.returncode != 0 and f"{ConfigError.__name__}: bench_quality: train not found" in proc.stderr
    (tmp_path / "stage1").mkdir()
    for bad in (0, 100, 120):  # ssr-mid splits --steps between the mid stage and stage 2: both get some
        args = argparse.Namespace(steps=100, mid_steps=bad, retrain=False)
        with pytest.raises(ConfigError, match="--mid-steps"):
            bench_quality.train("ssr-mid", args, {"stage1": tmp_path / "stage1"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _outcomes(right: range | list[int], n: int, prefix: str = "") -> dict[str, bool]:
    return {f"{prefix}{i}": i in right for i in range(n)}


def test_quality_pairs_each_connector_with_ssr_of_its_seed_item_by_item(tmp_path):
    """The paired differences come from the reports' per-item outcomes, against SSR of the same seed; the numbers
    are checked by hand (discordant counts, exact McNemar p, the mean and spread over seeds)."""
    from speechlm.perf.benchmarks import quality_paired

    text = Accuracy(7, 10)

    def sc_row(run: str, items: dict[str, bool]) -> ResultRow:
        return ResultRow("storycloze/adversarial", "s2t", f"{run}/connector", "free", "summed", Accuracy.of(
            list(items.values())), text, items)

    def mm_row(run: str, items: dict[str, bool]) -> ResultRow:
        return ResultRow("speech_mmlu/all", "speech_0shot", f"{run}/connector", "free", "cloze",
                         Accuracy.of(list(items.values())), Accuracy(20, 20), items)

    # seed 0, StoryCloze: SSR right on stories 0-5, stack on 0-2 and 6-7 (+ a story SSR lacks: dropped, not paired)
    # -> stack right / SSR wrong: 6, 7 (2); SSR right / stack wrong: 3, 4, 5 (3); diff 0.5 - 0.6 = -10 points;
    # McNemar p = 2 * P(X <= 2 | n=5, 1/2) = 2 * 16/32 = 1.
    stack0 = {**_outcomes([0, 1, 2, 6, 7], 10), "x": False}
    sc = [sc_row("ssr-s0", _outcomes(range(6), 10)), sc_row("stack-s0", stack0),
          sc_row("ssr-s1", _outcomes(range(8), 10)), sc_row("stack-s1", _outcomes(range(8), 10))]
    # seed 0, Speech-MMLU: SSR right on all 20, stack on 5 -> diff -75 points, 15 discordant all one way,
    # p = 2 / 2**15; seed 1: both right on the same 10 -> 0, no discordant item, p = 1
    mm = [mm_row("ssr-s0", _outcomes(range(20), 20, "geo/")), mm_row("stack-s0", _outcomes(range(5), 20, "geo/")),
          mm_row("ssr-s1", _outcomes(range(10), 20, "geo/")), mm_row("stack-s1", _outcomes(range(10), 20, "geo/"))]
    _report(tmp_path, "storycloze", sc)
    _report(tmp_path, "speech_mmlu", mm)
    (tmp_path / "asr.json").write_text(json.dumps({"results": []}))
    runs = [("ssr", 0), ("stack", 0), ("qformer", 0), ("ssr", 1), ("stack", 1)]
    metrics = {f"{n}-s{s}": {"steps": 10} for n, s in runs}
    reports = {k: tmp_path / f"{k}.json" for k in ("storycloze", "speech_mmlu", "asr")}
    rows = bench_quality.collect(runs, metrics, {f"{n}-s{s}": reports for n, s in runs if n != "qformer"})
    assert [(r["connector"], r["seed"]) for r in rows] == runs
    assert rows[1]["items"]["storycloze_adversarial"] == stack0  # read back from the report as booleans

    paired = quality_paired.paired_vs_ssr(rows, resamples=2000)
    assert [(p["connector"], p["seed"]) for p in paired] == [("stack", 0), ("qformer", 0), ("stack", 1)]
    s0 = paired[0]["storycloze_adversarial"]
    assert (s0["n"], s0["dropped"], s0["a_only"], s0["b_only"]) == (10, 1, 2, 3)
    assert s0["acc_a"] == 0.5 and s0["acc_b"] == 0.6 and s0["diff"] == pytest.approx(-0.1)
    assert s0["p_mcnemar"] == 1.0 and s0["inside_noise"] and s0["diff_ci95"][0] < 0 < s0["diff_ci95"][1]
    m0 = paired[0]["mmlu_0shot"]
    assert (m0["n"], m0["a_only"], m0["b_only"]) == (20, 0, 15) and m0["diff"] == -0.75
    assert m0["p_mcnemar"] == pytest.approx(2 / 2**15, rel=1e-3) and not m0["inside_noise"]
    assert m0["diff_ci95"][1] < 0
    s1 = paired[2]["storycloze_adversarial"]
    assert s1["diff"] == 0 and s1["p_mcnemar"] == 1.0 and s1["diff_ci95"] == [0.0, 0.0] and s1["inside_noise"]
    assert paired[0]["storycloze_random"] is None  # no such rows: missing, not made up
    assert all(paired[1][k] is None for k, _ in quality_paired.METRICS)  # qformer: not in the reports

    summary = {s["connector"]: s for s in quality_paired.over_seeds(rows, paired)}
    ssr = summary["ssr"]
    assert ssr["seeds"] == [0, 1] and "minus_ssr" not in ssr
    assert ssr["storycloze_adversarial"]["per_seed"] == [0.6, 0.8]
    assert ssr["storycloze_adversarial"]["mean"] == pytest.approx(0.7)
    assert ssr["storycloze_adversarial"]["sd"] == pytest.approx(0.2 / math.sqrt(2), abs=1e-4)
    assert ssr["storycloze_adversarial"]["range"] == pytest.approx(0.2)
    assert ssr["mmlu_0shot"]["mean"] == pytest.approx(0.75)
    stack = summary["stack"]["minus_ssr"]
    assert stack["storycloze_adversarial"]["per_seed"] == pytest.approx([-0.1, 0.0])
    assert stack["storycloze_adversarial"]["outside_noise"] == 0
    assert stack["mmlu_0shot"]["mean"] == pytest.approx(-0.375) and stack["mmlu_0shot"]["outside_noise"] == 1
    q = summary["qformer"]
    assert q["seeds"] == [0] and q["storycloze_adversarial"] is None and q["minus_ssr"]["mmlu_0shot"] is None

    ptable = quality_paired.paired_table(paired, bench_quality.LABELS)
    assert "| stack k=8 (Ultravox) | 0 | -10.0 [" in ptable and "p=1, n=10 (inside the noise)" in ptable
    assert "p=6.1e-05, n=20 |" in ptable  # outside the noise: no remark
    stable = quality_paired.seeds_table(list(summary.values()))
    assert "| SSR (stage 1 + 2) | 0,1 | 70.0 ± 14.1 |" in stable
    assert "-37.5 vs SSR, 1/2 outside the noise" in stable


def _fake_stage_run(calls: list):
    """bench_quality's launcher stand-in: the recipe's config is loaded with the overrides as the recipe loads it
    (so ``seed=`` must be a key it takes) and saved as the run's config.yaml, with a finished run's files."""
    from speechlm.atomic import atomic_write_text
    from speechlm.config import load_config, save_config
    from speechlm.training.configs import Stage2Config, StageMidConfig

    def launch(name, script, config, keys, args, log):
        cls = StageMidConfig if script == "stage_mid_supervised.py" else Stage2Config
        cfg = load_config(cls, config, keys)
        out = Path(cfg.out_dir)
        assert log == Path(args.out) / f"{out.relative_to(args.out).parts[0]}.log"  # each run's log apart
        save_config(cfg, out / "config.yaml")
        (out / "connector").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps({"steps": cfg.loop.max_steps, "final_valid": {}}))
        calls.append((name, script, out.relative_to(Path(args.out)).as_posix(), cfg.seed))
        return 1.0

    return launch


def test_quality_trains_each_seed_apart_and_reuses_only_that_seed(tmp_path, monkeypatch):
    from speechlm.errors import ConfigError

    run = tmp_path / "run"
    (run / "stage1" / "connector").mkdir(parents=True)
    paths = {"run": run, "train": run / "train.jsonl", "valid": run / "valid.jsonl", "features": tmp_path / "f",
             "test": run / "test.jsonl", "aligner": run / "aligner", "stage1": run / "stage1" / "connector",
             "config": ROOT / "recipes" / "configs" / "stage2_tiny.yaml",
             "mid_config": ROOT / "recipes" / "configs" / "stage_mid_tiny.yaml", "llm": tmp_path, "encoder": tmp_path}
    calls: list = []
    monkeypatch.setattr(bench_quality, "_paths", lambda args: paths)
    monkeypatch.setattr(bench_quality, "_launch", _fake_stage_run(calls))
    out = tmp_path / "bench"
    args = argparse.Namespace(connectors="ssr,stack,ssr-mid", seeds="0,1", steps=4, mid_steps=1, retrain=False,
                              skip_eval=True, out=str(out), stories=0, questions=0, asr_utts=0)
    metrics = bench_quality.run(args)["metrics"]
    assert sorted(metrics) == ["ssr-mid-s0", "ssr-mid-s1", "ssr-s0", "ssr-s1", "stack-s0", "stack-s1"]
    assert all(m["seed"] == int(k[-1]) for k, m in metrics.items())
    assert sorted(calls) == sorted([("ssr", "stage2_finetune.py", "ssr-s0", 0),
                                    ("ssr", "stage2_finetune.py", "ssr-s1", 1),
                                    ("stack", "stage2_finetune.py", "stack-s0", 0),
                                    ("stack", "stage2_finetune.py", "stack-s1", 1),
                                    ("ssr-mid", "stage_mid_supervised.py", "ssr-mid-s0/mid", 0),
                                    ("ssr-mid", "stage2_finetune.py", "ssr-mid-s0", 0),
                                    ("ssr-mid", "stage_mid_supervised.py", "ssr-mid-s1/mid", 1),
                                    ("ssr-mid", "stage2_finetune.py", "ssr-mid-s1", 1)])
    for folder in ("ssr-s0", "ssr-s1", "stack-s1", "ssr-mid-s1/mid", "ssr-mid-s1"):
        assert bench_quality.recorded_seed(out / folder) == int(folder.split("/")[0][-1])
    assert metrics["ssr-mid-s1"]["steps"] == 3 and metrics["ssr-mid-s1"]["mid"]["steps"] == 1  # 1 + 3 = --steps

    calls.clear()  # a second run reuses every finished run of its seed, and all runs are evaluated in one go
    evaluated = []

    def evaluate(names, args, paths, work):
        evaluated.append(names)
        rows = [ResultRow("storycloze/adversarial", "s2t", f"{n}/connector", "free", "summed",
                          Accuracy(i % 3 + 1, 4), None, _outcomes(range(i % 3 + 1), 4)) for i, n in enumerate(names)]
        _report(work / "eval", "storycloze", rows)
        _report(work / "eval", "speech_mmlu", [])
        (work / "eval" / "asr.json").write_text(json.dumps({"results": []}))
        return {n: {k: work / "eval" / f"{k}.json" for k in ("storycloze", "speech_mmlu", "asr")} for n in names}

    monkeypatch.setattr(bench_quality, "evaluate", evaluate)
    result = bench_quality.run(argparse.Namespace(**{**vars(args), "skip_eval": False, "ranks": 1}))
    assert calls == [] and evaluated == [["ssr-s0", "stack-s0", "ssr-mid-s0", "ssr-s1", "stack-s1", "ssr-mid-s1"]]
    saved = json.loads((out / "bench_quality.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["stories"] == 0 and all("items" not in r for r in saved["rows"])
    # of 4 stories, each seed: ssr right on 1, stack on 2, ssr-mid on 3 (the first ones)
    pairs = {(p["connector"], p["seed"]): p["storycloze_adversarial"] for p in saved["paired_vs_ssr"]}
    assert pairs[("stack", 0)]["diff"] == 0.25 and pairs[("stack", 0)]["a_only"] == 1
    assert pairs[("ssr-mid", 1)]["diff"] == 0.5 and pairs[("ssr-mid", 1)]["p_mcnemar"] == 0.5  # 2 * (1/2)**2
    assert pairs[("ssr-mid", 1)]["inside_noise"] and saved["paired_vs_ssr"][0]["mmlu_0shot"] is None
    over = {s["connector"]: s for s in saved["over_seeds"]}
    assert over["ssr"]["storycloze_adversarial"]["per_seed"] == [0.25, 0.25] and over["ssr"]["mmlu_0shot"] is None
    assert over["ssr-mid"]["minus_ssr"]["storycloze_adversarial"]["mean"] == 0.5
    assert result["over_seeds"] == saved["over_seeds"] and (out / "bench_quality.png").is_file()
    calls.clear()  # a new seed trains only that seed
    bench_quality.run(argparse.Namespace(**{**vars(args), "seeds": "1,2", "connectors": "stack"}))
    assert calls == [("stack", "stage2_finetune.py", "stack-s2", 2)]
    # a folder holding another seed's run is neither reused nor resumed
    cfg = out / "stack-s1" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("seed: 1", "seed: 0"))
    with pytest.raises(ConfigError, match=r"stack-s1 holds a stack run with seed 0, not 1"):
        bench_quality.run(argparse.Namespace(**{**vars(args), "connectors": "stack"}))
    calls.clear()  # --retrain starts it again
    bench_quality.run(argparse.Namespace(**{**vars(args), "connectors": "stack", "seeds": "1", "retrain": True}))
    assert calls == [("stack", "stage2_finetune.py", "stack-s1", 1)] and bench_quality.recorded_seed(cfg.parent) == 1


def test_quality_seeds_and_limits_are_checked():
    from speechlm.errors import ConfigError

    assert bench_quality.parse_seeds("0, 1") == [0, 1] and bench_quality.parse_seeds("3") == [3]
    for bad in ("", "0,0", "-1", "a"):
        with pytest.raises(ConfigError, match="--seeds"):
            bench_quality.parse_seeds(bad)
    args = argparse.Namespace(connectors="ssr", seeds="0", stories=-1, questions=0, asr_utts=0)
    with pytest.raises(ConfigError, match=r"--stories: need >= 0 \(0 = the whole set\)"):
        bench_quality.run(args)


def test_quality_evaluates_each_run_once_and_reuses_its_reports(tmp_path, monkeypatch):
    """Only runs without reports of the same settings (or with a connector newer than them) are evaluated, together;
    the index says which reports hold each run; a pre-index folder's reports are adopted."""
    import os

    from speechlm.perf.benchmarks import quality_eval

    work = tmp_path / "bench"
    batches: list[tuple[str, list[str]]] = []

    def call(cmd, stdout, stderr, cwd, env):  # the evaluation recipes' stand-in: one report naming its connectors
        opts = dict(a.split("=", 1) for a in cmd[2:])
        key = {"eval_storycloze.py": "storycloze", "eval_speech_mmlu.py": "speech_mmlu", "eval_asr.py": "asr"}[
            Path(cmd[1]).name]
        runs = [Path(c).parent.name for c in opts["connectors"].strip("[]").split(",")]
        out = Path(opts["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{key}.json").write_text(json.dumps({"results": runs, "limit": opts["limit"]}))
        batches.append((key, runs))
        return 0

    monkeypatch.setattr(quality_eval.subprocess, "call", call)
    paths = {"llm": tmp_path / "llm", "aligner": tmp_path / "aligner", "test": tmp_path / "test.jsonl"}
    args = argparse.Namespace(out=str(work), stories=0, questions=0, asr_utts=100, asr_max_tokens=96, threads=1)

    def trained(*runs):
        for n in runs:
            (work / n / "connector").mkdir(parents=True, exist_ok=True)
            (work / n / "connector" / "model.safetensors").write_bytes(b"w")
            os.utime(work / n / "connector" / "model.safetensors", (1e9, 1e9))  # trained long before any report

    def evaluated(names, **changed):
        batches.clear()
        got = quality_eval.evaluate(names, argparse.Namespace(**{**vars(args), **changed}), paths, work)
        assert list(got) == names
        return got, sorted({tuple(r) for _, r in batches})

    trained("ssr-s0", "stack-s0", "ssr-s1")
    got, runs = evaluated(["ssr-s0", "stack-s0"])
    assert runs == [("ssr-s0", "stack-s0")] and len(batches) == 3  # one go: all three evaluations, both runs
    assert got["ssr-s0"]["asr"] == work / "eval" / "ssr-s0+stack-s0" / "asr.json"
    index = json.loads((work / "eval" / "index.json").read_text())["runs"]
    assert index["stack-s0"]["reports"]["storycloze"] == "eval/ssr-s0+stack-s0/storycloze.json"
    assert index["stack-s0"]["settings"]["asr_utts"] == 100

    got, runs = evaluated(["ssr-s0", "stack-s0", "ssr-s1"])  # a new seed: only it is evaluated
    assert runs == [("ssr-s1",)] and got["ssr-s0"]["asr"].parent.name == "ssr-s0+stack-s0"
    assert got["ssr-s1"]["asr"] == work / "eval" / "ssr-s1" / "asr.json"
    assert evaluated(["ssr-s0", "stack-s0", "ssr-s1"])[1] == []  # nothing new: nothing evaluated

    (work / "stack-s0" / "connector" / "model.safetensors").write_bytes(b"retrained")  # newer than its reports
    assert evaluated(["ssr-s0", "stack-s0", "ssr-s1"])[1] == [("stack-s0",)]
    assert evaluated(["ssr-s0", "ssr-s1"], stories=40)[1] == [("ssr-s0", "ssr-s1")]  # other settings: again
    assert json.loads((work / "eval" / "ssr-s0+ssr-s1" / "storycloze.json").read_text())["limit"] == "40"
    assert evaluated(["ssr-s0"], reevaluate=True)[1] == [("ssr-s0",)]

    # a folder from before the index: one report set for all the runs in its bench_quality.json, adopted
    old = tmp_path / "old"
    for n in ("ssr-s0", "stack-s0"):
        (old / n / "connector").mkdir(parents=True)
        (old / n / "connector" / "w").write_bytes(b"w")
        os.utime(old / n / "connector" / "w", (1e9, 1e9))
    (old / "eval").mkdir()
    for key in quality_eval.KEYS:
        (old / "eval" / f"{key}.json").write_text(json.dumps({"meta": {"llm": str(paths["llm"])}, "results": []}))
    (old / "bench_quality.json").write_text(json.dumps({
        "stories": 0, "questions_per_subject": 0, "asr_utts": 100,
        "reports": {k: str(old / "eval" / f"{k}.json") for k in quality_eval.KEYS},
        "rows": [{"connector": "ssr", "seed": 0}, {"connector": "stack", "seed": 0}]}))
    batches.clear()
    got = quality_eval.evaluate(["ssr-s0", "stack-s0"], argparse.Namespace(**{**vars(args), "out": str(old)}),
                                paths, old)
    assert batches == [] and got["stack-s0"]["speech_mmlu"] == old / "eval" / "speech_mmlu.json"
    batches.clear()  # adopted with the limits it recorded: other limits evaluate again
    quality_eval.evaluate(["ssr-s0"], argparse.Namespace(**{**vars(args), "out": str(old), "asr_utts": 50}), paths,
                          old)
    assert sorted({tuple(r) for _, r in batches}) == [("ssr-s0",)]
