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
    """The table is read from the reports the evaluation recipes write (speechlm.eval.report), per connector."""
    names = ["ssr", "stack", "ssr-mid"]
    text = Accuracy(7, 10)
    sc = []
    for style in ("adversarial", "random"):
        sc.append(ResultRow(f"storycloze/{style}", "text", "llm", "none", "summed", text))
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "ssr/connector", "free", "summed", Accuracy(6, 10), text))
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "ssr/connector", "free", "length_norm", Accuracy(1, 10), text))
        sc.append(ResultRow(f"storycloze/{style}", "s2t", "stack/connector", "none", "summed", Accuracy(5, 10), text))
    _report(tmp_path, "storycloze", sc)
    mm = [ResultRow("speech_mmlu/all", "speech_0shot", "ssr/connector", "free", "cloze", Accuracy(3, 8), Accuracy(6, 8)),
          ResultRow("speech_mmlu/all", "speech_5shot", "ssr/connector", "free", "cloze", Accuracy(8, 8), Accuracy(6, 8)),
          ResultRow("speech_mmlu/geography", "speech_0shot", "stack/connector", "none", "cloze", Accuracy(1, 1),
                    Accuracy(1, 1))]
    _report(tmp_path, "speech_mmlu", mm)
    (tmp_path / "asr.json").write_text(json.dumps({"results": [{"system": "stack/connector", "wer": 0.5},
                                                               {"system": "ssr/connector", "wer": 0.25}]}))
    metrics = {n: {"steps": 100, "final_valid": {"loss_speech": 5.0, "loss_text": 4.0}, "step_time_s_median": 1.0}
               for n in names}  # as a stage's metrics.json has them
    metrics["ssr-mid"] = {**metrics["ssr-mid"], "steps": 60, "mid": {"steps": 40}}  # what train() returns for it
    reports = {k: tmp_path / f"{k}.json" for k in ("storycloze", "speech_mmlu", "asr")}
    rows = bench_quality.collect(names, metrics, reports)
    ssr, stack, mid = rows
    assert mid["steps"] == 100 and mid["mid_steps"] == 40 and ssr["mid_steps"] == 0
    assert mid["storycloze_adversarial"] is None and mid["asr_wer"] is None  # no reports for it: missing, not made up
    assert ssr["storycloze_adversarial"]["acc"] == 0.6 and ssr["storycloze_adversarial"]["parity"] == pytest.approx(6 / 7, abs=1e-4)
    assert ssr["storycloze_random"]["text"] == 0.7
    assert ssr["mmlu_0shot"]["acc"] == 0.375 and ssr["asr_wer"] == 0.25
    assert ssr["mmlu_0shot"]["text"] == 0.75  # the text line of the Speech-MMLU panel
    assert stack["storycloze_adversarial"]["acc"] == 0.5 and stack["asr_wer"] == 0.5
    assert ssr["valid_loss_speech"] == 5.0 and ssr["valid_loss_text"] == 4.0
    assert stack["mmlu_0shot"] is None  # only a per-subject row: the overall one is missing, not made up
    table = bench_quality.table(rows)
    assert "| SSR (stage 1 + 2) | 100 | 1.00 | 5.000 (4.000) |" in table and "60.0 [31, 83] (0.86)" in table
    assert "| SSR (stage 1 + mid + 2) | 40 + 60 | 1.00 |" in table
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
