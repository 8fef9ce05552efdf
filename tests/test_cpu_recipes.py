"""The CPU recipes (run_tiny.sh, run_small.sh -> run_cpu.sh): every preset's configs load through the
recipes' config classes (unknown keys fail), the presets differ where they should, and the shared
flow refuses an unknown preset or step before it does any work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from speechlm.config import load_config
from speechlm.training.configs import Stage1Config, Stage2Config, StageMidConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
PRESETS = ("tiny", "small", "large")


def _aligner_config_cls():
    from alignment.training import TrainAlignerConfig

    return TrainAlignerConfig


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_configs_load(preset):
    s1 = load_config(Stage1Config, CONFIGS / f"stage1_{preset}.yaml")
    s2 = load_config(Stage2Config, CONFIGS / f"stage2_{preset}.yaml")
    al = load_config(_aligner_config_cls(), CONFIGS / f"aligner_{preset}.yaml")
    assert s1.model.connector.name == "ssr" and s1.model.connector.mask == "causal"
    assert s1.out_dir == f"runs/{preset}/stage1" and s2.out_dir == f"runs/{preset}/stage2"
    assert s2.variant == "frozen" and 0 < s2.distill_weight
    assert al.model.kind == "charCTC" and al.steps > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_mid_configs_load(preset):
    """MID=1 runs recipes/configs/stage_mid_$PRESET.yaml between stage 1 and stage 2, into <run>/mid."""
    mid = load_config(StageMidConfig, CONFIGS / f"stage_mid_{preset}.yaml")
    s2 = load_config(Stage2Config, CONFIGS / f"stage2_{preset}.yaml")
    assert mid.objective == "supervised" and mid.out_dir == f"runs/{preset}/mid"
    assert 0 < mid.loop.max_steps < s2.loop.max_steps
    assert "{speech}" in mid.supervised.transcribe_prompt


def test_flow_refuses_mid_without_its_config(tmp_path):
    """MID=1 with a preset whose stage_mid config is missing stops before any step runs."""
    configs = tmp_path / "repo" / "recipes" / "configs"
    configs.mkdir(parents=True)
    for c in ("aligner", "stage1", "stage2"):
        (configs / f"{c}_tiny.yaml").write_text("{}\n")
    script = tmp_path / "repo" / "recipes" / "run_cpu.sh"
    script.write_text((ROOT / "recipes" / "run_cpu.sh").read_text())
    (tmp_path / "repo" / ".venv").symlink_to(ROOT / ".venv")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False,
                          env={**os.environ, "MID": "1", "RUN": str(tmp_path / "run"),
                               "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MID=1: no recipes/configs/stage_mid_tiny.yaml" in proc.stderr
    assert not (tmp_path / "run" / "times.json").exists()


def test_each_preset_trains_longer_than_the_one_before():
    s1 = [load_config(Stage1Config, CONFIGS / f"stage1_{p}.yaml") for p in PRESETS]
    s2 = [load_config(Stage2Config, CONFIGS / f"stage2_{p}.yaml") for p in PRESETS]
    al = [load_config(_aligner_config_cls(), CONFIGS / f"aligner_{p}.yaml") for p in PRESETS]
    for i in (1, 2):
        assert s1[i].loop.max_steps > s1[i - 1].loop.max_steps and s2[i].loop.max_steps > s2[i - 1].loop.max_steps
        assert al[i].steps > al[i - 1].steps
    # The large preset's connector is wider and deeper (the data can feed it).
    assert s1[2].model.connector.d_model > s1[0].model.connector.d_model
    assert s1[2].model.connector.n_layers > s1[0].model.connector.n_layers


@pytest.mark.parametrize("env, message", [({"PRESET": "huge"}, "no recipes/configs/aligner_huge.yaml"),
                                          ({"FROM": "stage9"}, "FROM must be one of"),
                                          ({"UNTIL": "stage9"}, "UNTIL must be one of"),
                                          ({"FROM": "stage2", "UNTIL": "stage1"}, "UNTIL=stage1 comes before")])
def test_flow_refuses_unknown_preset_or_step(env, message, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "run_cpu.sh")], capture_output=True, text=True, check=False,
                          env={**os.environ, "RUN": str(tmp_path / "run"), **env}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run" / "times.json").exists()  # nothing ran


def test_summary_gathers_corpus_whisper_and_token_analysis(tmp_path):
    """tools/summarize_run.py: corpus coverage and engines, Whisper's test WER (overall and per engine)
    and the stage-1 token analysis land in summary.json; keys the evaluations wrote stay."""
    import json

    from speechlm.eval import summary as mod
    run, corpus = tmp_path / "run", tmp_path / "corpus"
    (run / "eval").mkdir(parents=True)
    corpus.mkdir()
    (corpus / "summary.json").write_text(json.dumps({
        "hours": {"train": 1.8}, "coverage": 0.71, "coverage_general": 0.66, "augmented_share": 0.9,
        "by_engine": {"test": {"piper": {"utterances": 3, "hours": 0.01}}}, "missing_voices": []}))
    (run / "eval" / "asr.json").write_text(json.dumps({
        "results": [{"system": "x/conn", "wer": 0.5, "n": 4}, {"system": "whisper", "wer": 0.08, "n": 4}],
        "by_engine": {"piper": [{"system": "x/conn", "wer": 0.6}, {"system": "whisper", "wer": 0.1}],
                      "festival": [{"system": "whisper", "wer": 0.06}]}}))
    (run / "token_analysis.json").write_text(json.dumps({
        "classes": {"all": {"tokens": 10, "share": 1.0, "token_acc": 0.5, "cosine": 0.6, "extra": 1}},
        "by_engine": {"piper": {"tokens": 10, "share": 1.0, "token_acc": 0.5, "cosine": 0.6}}}))
    (run / "summary.json").write_text(json.dumps({"storycloze": {"s2t_acc": 0.7}}))
    summary = mod.summarize(run, corpus)
    assert summary["storycloze"] == {"s2t_acc": 0.7}
    c = summary["corpus"]
    assert c["eval_type_coverage"] == 0.71 and c["whisper_wer_test"] == 0.08 and c["whisper_n_test"] == 4
    assert c["whisper_wer_test_by_engine"] == {"piper": 0.1, "festival": 0.06}
    assert summary["stage1"]["by_class"]["all"] == {"tokens": 10, "share": 1.0, "token_acc": 0.5, "cosine": 0.6}
    assert summary["stage1"]["by_engine"]["piper"]["token_acc"] == 0.5
    assert json.loads((run / "summary.json").read_text()) == summary
    assert "corpus.whisper_wer_test" in mod.table(summary)


@pytest.mark.parametrize("wrapper", ["run_tiny.sh", "run_small.sh", "run_large.sh"])
def test_default_step_list_reaches_the_summary(wrapper, tmp_path):
    """`make demo` / `make small` run every step and then the summary table: with no UNTIL the flow goes
    through eval_asr and on to tools/summarize_run.py (a dry run prints the commands and runs none)."""
    env = {k: v for k, v in os.environ.items() if k not in ("UNTIL", "FROM")}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / wrapper)], capture_output=True, text=True, check=False,
                          env={**env, "DRY_RUN": "1", "RUN": str(tmp_path / "run")}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = [line.split("]")[0].removeprefix("=== [") for line in proc.stdout.splitlines()
           if line.startswith("=== [") and "not run (DRY_RUN=1)" in line]
    assert ran[-2:] == ["eval_asr", "summary"], ran
    assert ran[:3] == ["prepare_models", "synthesize_corpus", "cache_features"]
    assert "tools/summarize_run.py --run " + str(tmp_path / "run") in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    if wrapper == "run_large.sh":  # 30 h and the whole evaluation sets (limit=0), the cascade beside SSR
        assert "large-30.0h" in proc.stdout and "limit=0" in proc.stdout and "cascade=true" in proc.stdout
        assert "shots=[0] " in proc.stdout  # the headline 0-shot only on the whole Speech-MMLU set
    else:
        assert "shots=[0,5] " in proc.stdout


def _scaling_dry_run(runs: Path, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("UNTIL", "FROM", "RUN", "HOURS", "COMPARE_AT")}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "run_scaling.sh")], capture_output=True, text=True,
                          check=False, env={**env, "DRY_RUN": "1", "RUNS": str(runs), **extra}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_scaling_recipe_runs_the_large_preset_at_each_amount_then_the_curve_and_the_comparison(tmp_path):
    out = _scaling_dry_run(tmp_path)
    for h in ("2.0", "5.0", "12.5"):  # the large preset's flow at each amount, into its own run folder
        assert f"large-{h}h" in out and f"tools/summarize_run.py --run {tmp_path}/scale-{h}h" in out
    evals = [line for line in out.splitlines() if "recipes/eval_" in line and "/scale-" in line]
    # the cascade reads no connector: evaluated once by make large, not again at every amount
    assert len(evals) == 9 and all("cascade=false" in line for line in evals if "eval_asr" not in line)
    assert f"tools/scaling_curve.py --runs {tmp_path}/scale-2.0h {tmp_path}/scale-5.0h {tmp_path}/scale-12.5h " in out
    assert "has no summary.json (make large)" in out
    comparisons = [line for line in out.splitlines() if "bench_quality.py" in line]
    assert len(comparisons) == 2 and all("--seeds 0,1" in c and "--connectors ssr,stack,qformer" in c
                                         and "--steps 400" in c for c in comparisons)
    assert f"--run {tmp_path}/scale-5.0h --preset large --hours 5.0" in comparisons[0]
    assert "--hours 30.0" in comparisons[1]


def test_scaling_recipe_keeps_the_amounts_already_run(tmp_path):
    """An amount with its summary is not run again; the curve takes it with the others and make large's run."""
    for r in ("scale-5.0h", "large"):
        (tmp_path / r).mkdir()
        (tmp_path / r / "summary.json").write_text("{}")
    out = _scaling_dry_run(tmp_path, HOURS_LIST="2.0 5.0", COMPARE_AT="")
    assert f"{tmp_path}/scale-5.0h has its summary.json: not run again" in out
    assert f"--run {tmp_path}/scale-5.0h" not in out and f"tools/summarize_run.py --run {tmp_path}/scale-2.0h" in out
    assert f"--runs {tmp_path}/scale-5.0h {tmp_path}/scale-2.0h {tmp_path}/large " in out
    assert "bench_quality.py" not in out  # COMPARE_AT="": no comparison
    assert f"tools/summarize_run.py --run {tmp_path}/scale-5.0h" in _scaling_dry_run(tmp_path, HOURS_LIST="5.0",
                                                                                      RERUN="1")


def test_scaling_recipe_joins_the_points_recorded_before(tmp_path):
    """An amount whose point the report holds (its run folder gone) is not run again; the curve reads the report
    back and writes its points into it."""
    report = tmp_path / "scaling.json"
    report.write_text(json.dumps({"points": [{"run": f"{tmp_path}/scale-2.0h", "hours": 1.9, "values": {}}]}))
    out = _scaling_dry_run(tmp_path, HOURS_LIST="2.0 5.0", COMPARE_AT="", REPORT=str(report))
    assert f"{tmp_path}/scale-2.0h has its point in {report}: not run again" in out
    assert f"tools/summarize_run.py --run {tmp_path}/scale-2.0h" not in out
    assert f"--runs {tmp_path}/scale-5.0h --recorded {report} --png docs/scaling.png --out {report} " in out


def test_until_stops_before_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FROM"}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "run_cpu.sh")], capture_output=True, text=True,
                          check=False, env={**env, "DRY_RUN": "1", "UNTIL": "stage1", "RUN": str(tmp_path / "run")},
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopping after [stage1]" in proc.stdout
    assert "[summary]" not in proc.stdout and "[stage2]" not in proc.stdout


def test_a_run_started_at_a_later_evaluation_keeps_the_earlier_evaluations_figures(tmp_path):
    """FROM=eval_speech_mmlu (say, after an interrupted evaluation) keeps the StoryCloze entry of summary.json;
    a run that evaluates from the start writes it anew. Each step's command is a no-op Python here."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "python").chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FROM", "UNTIL", "DRY_RUN")}
    env.update(VENV=str(tmp_path / "venv"), RUN=str(run))
    for start, kept in (("eval_speech_mmlu", True), ("eval_storycloze", False)):
        (run / "summary.json").write_text('{"storycloze": {"s2t_acc": 0.6}}')
        proc = subprocess.run(["bash", str(ROOT / "recipes" / "run_cpu.sh")], capture_output=True, text=True,
                              check=False, env={**env, "FROM": start, "UNTIL": start}, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"=== [{start}]" in proc.stdout and (run / "summary.json").exists() == kept, start
