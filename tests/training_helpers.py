"""A tiny training world on disk: word-level tokenizer + tiny Llama LLM, tiny Whisper encoder, noise audio,
a manifest with token boundaries, and a feature cache. Shared by the tests/test_training_*.py files."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "blue", "quick", "slow", "fox", "jumps", "over", "lazy", "sun", "moon", "star", "tree", "house", "car", "road"]
SR = 16_000


def make_tokenizer(folder: Path):
    """The word-level tokenizer of :data:`WORDS` (``<pad> <s> </s> <unk>`` first), saved into ``folder``."""
    from speechlm.perf.shapes import word_tokenizer

    return word_tokenizer(WORDS, folder)


def make_llm(folder: Path, vocab: int, hidden: int = 32) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def make_whisper(folder: Path, encoder_layers: int = 1, mel_bins: int = 80) -> None:
    """A tiny random Whisper (seed 0) and its feature extractor; ``mel_bins=128``: whisper-large-v3's front end."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=16, encoder_layers=encoder_layers, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=mel_bins,
                        max_source_positions=1500, vocab_size=100, max_target_positions=32, pad_token_id=1,
                        bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, suppress_tokens=None,
                        begin_suppress_tokens=None)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=mel_bins).save_pretrained(folder)


def make_world(root: Path, n_train: int = 24, n_valid: int = 6, cache: bool = True) -> dict[str, str]:
    """Build everything under ``root``; returns the paths the recipes need (as config overrides)."""
    from speechlm.data.audio import save_audio
    from speechlm.data.manifest import Utterance, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(root / "llm")
    make_llm(root / "llm", vocab=len(tok))
    make_whisper(root / "enc")
    rng = random.Random(0)
    np_rng = np.random.default_rng(0)
    utts = []
    for i in range(n_train + n_valid):
        n_words = rng.randint(3, 8)
        text = " ".join(rng.choice(WORDS) for _ in range(n_words))
        dur = 0.15 * n_words + rng.uniform(0.1, 0.3)
        samples = int(dur * SR)
        t = np.arange(samples) / SR
        wave = 0.1 * np_rng.standard_normal(samples) + 0.2 * np.sin(2 * np.pi * (200 + 40 * (i % 7)) * t)
        path = root / "audio" / f"u{i:03d}.wav"
        save_audio(path, wave.astype(np.float32), SR)
        frames = int(dur * 100)  # boundaries given at 100 Hz: the batching must convert them to 50 Hz
        bnd = [int((k + 1) * frames / n_words) - 1 for k in range(n_words)]
        utts.append(Utterance(id=f"u{i:03d}", audio=f"audio/u{i:03d}.wav", sample_rate=SR, duration_s=samples / SR,
                              text=text, split="train" if i < n_train else "valid", token_boundaries=bnd,
                              boundary_frame_rate_hz=100.0))
    write_manifest(root / "manifest.jsonl", utts)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(40)))
    paths = {"llm": str(root / "llm"), "enc": str(root / "enc"), "manifest": str(root / "manifest.jsonl"),
             "text": str(root / "text.txt")}
    if cache:
        from speechlm.data.feature_cache import build_feature_cache
        from speechlm.models.encoder import SpeechEncoder

        build_feature_cache(root / "manifest.jsonl", SpeechEncoder(str(root / "enc")), root / "cache")
        paths["cache"] = str(root / "cache")
    return paths


def stage1_overrides(paths: dict[str, str], out_dir: Path, cache: bool = True, **extra: object) -> list[str]:
    over = {
        "out_dir": str(out_dir), "model.llm": paths["llm"], "model.encoder": paths["enc"],
        "model.connector.d_model": 32, "model.connector.n_layers": 1, "model.connector.n_heads": 2,
        "data.train_manifest": paths["manifest"], "data.feature_cache": paths["cache"] if cache else "",
        "data.max_frames": 400, "data.max_tokens": 40, "engine.lr": 3e-3, "engine.warmup_steps": 2,
        "engine.threads": 1, "loop.max_steps": 6, "loop.eval_every": 3, "loop.save_every": 3,
        "loop.progress": False,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def run_recipe(script: str, config: str, overrides: list[str], ranks: int = 0, timeout: int = 600
               ) -> subprocess.CompletedProcess:
    """Run a recipe as a subprocess: plain python (ranks=0) or through the deepspeed launcher."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    script_path, config_path = str(ROOT / "recipes" / script), str(ROOT / "recipes" / "configs" / config)
    if ranks:
        port = str(29500 + random.randint(100, 2000))
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", port,
               script_path, "--config", config_path, *overrides]
    else:
        port = ""
        cmd = [sys.executable, script_path, "--config", config_path, *overrides]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    proc.master_port = port  # type: ignore[attr-defined]
    return proc


def leaked_shm_buffers(port: str) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers still in /dev/shm for a launcher run on ``port`` (there should be none)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) if port else []


class FakeDeepSpeed:
    """Just enough of a DeepSpeedEngine for the training loop in-process (no process group): a linear model, SGD,
    fp32, ZeRO-0; a step whose optimizer reports an overflow is not applied, as DeepSpeed's overflow check does."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.device = torch.device("cpu")
        self.skipped_steps = 0
        self.applied = True

    def __call__(self, batch):
        loss = (self.module(batch.x) ** 2).mean()
        return loss, {"loss": float(loss.detach())}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.applied = not getattr(self.optimizer, "overflow", False)
        self.skipped_steps += int(not self.applied)
        self.optimizer.zero_grad()

    def was_step_applied(self) -> bool:
        return self.applied

    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass

    def fp16_enabled(self) -> bool:
        return False

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, folder: str, tag: str, **kwargs: object) -> None:
        torch.save(self.module.state_dict(), Path(folder) / tag / "mp_rank_00_model_states.pt")


def fake_engine(seed: int = 0):
    """A :class:`speechlm.training.deepspeed_engine.Engine` around :class:`FakeDeepSpeed` (rank 0 of 1)."""
    from speechlm.training.deepspeed_engine import Engine, EngineConfig
    from speechlm.training.distributed import DistInfo

    ds = FakeDeepSpeed(seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ds.optimizer, lambda step: 1.0)
    return Engine(ds, scheduler, DistInfo(0, 1, 0, 1), EngineConfig(precision="fp32"), bf16=False)


def fake_batches(seed: int = 0):
    """An endless stream of tiny batches with what the loop reads of a Batch (position, skipped rows, ids)."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        yield SimpleNamespace(epoch=0, index=i, skipped=[], empty=False, utt_ids=[f"u{i}"],
                              x=torch.randn(4, 2, generator=gen))
        i += 1
