"""tools/export.py (speechlm.inference.export) and SpeechLMPipeline.from_pretrained (speechlm.inference.pretrained)
on a tiny random run: the folder holds safetensors only and a model card with the run's metrics, loads in a fresh
process and answers as from_run does; bad folders and an offline --push-to-hub are clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechlm.errors import CheckpointError, ModelError
from speechlm.inference import SpeechLMPipeline
from speechlm.inference.export import export_run
from speechlm.inference.pretrained import CONFIG_FILE, PICKLE_SUFFIXES, read_config
from tests.test_inference import ENCODER_NAME, LLM_NAME, build_tiny_run, speech_wav

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = {"stage1": {"valid_cosine": 0.612345, "valid_token_acc": 0.4031}, "asr": {"wer": 0.961}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """build_tiny_run's run, plus an encoder adaptation beside the connector, a summary.json and a stage config."""
    from speechlm.models.encoder import SpeechEncoder

    root = tmp_path_factory.mktemp("export")
    run, models = build_tiny_run(root)
    enc = SpeechEncoder(str(models / ENCODER_NAME), layers=(2,))
    enc.adapt({"method": "adapter", "bottleneck": 4})
    with torch.no_grad():
        for p in enc.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc.save_adaptation(run / "stage2" / "encoder_adapt")
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "stage2" / "config.yaml").write_text("data:\n  train_manifest: data/train.jsonl\n  train_split: train\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPEECHLM_MODELS", str(models))
    torch.set_num_threads(1)
    yield {"run": run, "models": models, "root": root, "wav": speech_wav(root / "tom.wav")}
    mp.undo()


def _env(models: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SPEECHLM_MODELS": str(models), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def _export_cli(*args: str, models: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), *args], capture_output=True, text=True,
                          env=_env(models, **env), timeout=300, check=False)


LOAD = """
import json, sys, torch
torch.set_num_threads(1)
from speechlm.inference import SpeechLMPipeline
pipe = SpeechLMPipeline.from_pretrained(sys.argv[1])
r = pipe.generate(sys.argv[2], max_new_tokens=12)
print(json.dumps({"answer": r.answer, "transcript": r.transcript, "ids": r.token_ids,
                  "score": pipe.score(sys.argv[2], " the store"), "adapted": pipe.model.encoder.adapted}))
"""


def test_export_loads_in_a_fresh_process_and_answers_like_from_run(tiny, tmp_path):
    out = tmp_path / "my-ssr"
    proc = _export_cli("--run", str(tiny["run"]), "--out", str(out), models=tiny["models"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert {"README.md", CONFIG_FILE, "connector/config.json", "connector/model.safetensors", "aligner/config.json",
            "aligner/model.safetensors", "encoder_adapt/config.json", "encoder_adapt/model.safetensors",
            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(files)
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    weights = [f for f in files if not f.endswith((".json", ".md", ".jinja", ".txt"))]
    assert all(f.endswith(".safetensors") for f in weights), weights
    meta = read_config(out)
    assert meta["llm"]["name"] == LLM_NAME and meta["encoder"]["name"] == ENCODER_NAME
    assert meta["llm"]["path"] == str((tiny["models"] / LLM_NAME).resolve()) and meta["metrics"] == SUMMARY
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: speechlm")
    assert "0.6123" in card and "stage1.valid_token_acc" in card and "0.961" in card  # the run's metrics
    assert "| zero-shot ASR WER (n ?; lower is better) | 96.1% |" in card  # the headline table, then all figures
    assert card.index("| task | speech (SSR) |") < card.index("<details>") < card.index("stage1.valid_token_acc")
    assert "data/train.jsonl" in card and "## Intended use" in card and "## Limits" in card

    pipe = SpeechLMPipeline.from_run(tiny["run"])
    want = pipe.generate(tiny["wav"], max_new_tokens=12)
    assert pipe.model.encoder.adapted
    proc = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tiny["wav"])], capture_output=True, text=True,
                          env=_env(tiny["models"]), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["answer"], got["transcript"], got["ids"]) == (want.answer, want.transcript, want.token_ids)
    assert got["adapted"] and got["score"] == pytest.approx(pipe.score(tiny["wav"], " the store"), abs=1e-5)


def test_models_are_found_by_name_when_the_recorded_path_is_gone(tiny, tmp_path):
    out = export_run(tiny["run"], tmp_path / "x")
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["llm"]["path"] = meta["encoder"]["path"] = str(tmp_path / "elsewhere")
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    pipe = SpeechLMPipeline.from_pretrained(out)  # SPEECHLM_MODELS holds both by name
    assert pipe.folders.llm == tiny["models"] / LLM_NAME and pipe.folders.connector == out / "connector"
    assert pipe.folders.aligner == out / "aligner"
    meta["llm"]["name"], meta["llm"]["hub_id"] = "not-there", None
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="LLM 'not-there' of this export not found.*llm="):
        SpeechLMPipeline.from_pretrained(out)
    assert SpeechLMPipeline.from_pretrained(out, llm=tiny["models"] / LLM_NAME).folders.llm == tiny["models"] / LLM_NAME


def test_pickles_missing_configs_and_existing_folders_are_refused(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    out = export_run(run, tmp_path / "ok")
    with pytest.raises(ModelError, match="already exists.*overwrite"):
        export_run(run, out)
    export_run(run, out, overwrite=True)
    torch.save({"w": torch.zeros(1)}, run / "stage2" / "connector" / "extra.bin")
    with pytest.raises(CheckpointError, match="pickle-capable files.*extra.bin"):
        export_run(run, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    (out / "connector" / "sneaky.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="may be pickles.*sneaky.pt"):
        SpeechLMPipeline.from_pretrained(out)
    with pytest.raises(ModelError, match="not an exported speechlm folder"):
        SpeechLMPipeline.from_pretrained(tiny["run"])
    with pytest.raises(ModelError, match="exported folder not found"):
        SpeechLMPipeline.from_pretrained(tmp_path / "nothing")


def test_push_to_hub_offline_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "pushed"
    proc = _export_cli("--run", str(tiny["run"]), "--out", str(out), "--push-to-hub", "someone/my-ssr",
                       models=tiny["models"], HF_HUB_OFFLINE="1", HF_TOKEN="hf_not_a_real_token")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: pushing" in proc.stderr and "someone/my-ssr" in proc.stderr and "network" in proc.stderr
    assert (out / CONFIG_FILE).is_file()  # the export itself is complete
