"""Train a CTC aligner (charCTC or subCTC) on frozen speech-encoder frames of a manifest.

    python recipes/train_aligner.py --config recipes/configs/aligner_tiny.yaml \
        train_manifest=~/.cache/speechlm/corpus/train.jsonl valid_manifest=~/.cache/speechlm/corpus/valid.jsonl \
        out_dir=~/.cache/speechlm/aligners/charctc-whisper-base [steps=3000 model.layers=4 ...]

Frames come from ``feature_cache_train``/``feature_cache_valid`` (tools/cache_features.py) when set,
else the frozen encoder runs once over each manifest at start. Every ``valid_every`` steps the greedy
CER on the validation manifest is printed and the best model so far is saved to ``out_dir``
(``config.json`` + ``model.safetensors``, written atomically; ``train_state.json`` beside it).

``encoder_adapt.method=adapter|lora|prompt`` (speechlm.models.encoder_adapt; ``init_encoder_adapt=FOLDER`` starts
from an exported adaptation) adapts the encoder while the head trains: the audio is held in memory and the encoder
runs on every batch (no feature cache), its adaptation trained with the CTC head and saved with the best model
as ``out_dir/encoder_adapt/`` (config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

import torch
from tqdm import tqdm

from alignment.aligner import ENCODER_ADAPT_DIR, Aligner, load_aligner_model
from alignment.cif import CIFAligner, cif_config, cif_loss
from alignment.ctc_model import CTCAligner, char_ctc_config, sub_ctc_config
from alignment.features import describe, iter_feature_batches
from alignment.metrics import (
    BoundaryErrors,
    character_error_rate,
    median_offsets_frames,
    word_boundary_errors,
)
from alignment.tokens import normalize_for_alignment
from speechlm.atomic import atomic_write_text
from speechlm.config import load_config, to_dict
from speechlm.data.manifest import Utterance, read_manifest
from speechlm.errors import ConfigError, ModelError, SpeechLMError
from speechlm.paths import SMOLLM2_135M, WHISPER_BASE, default_model
from speechlm.training.schedule import warmup_cosine


@dataclass
class ModelConfig:
    kind: str = "charCTC"          # charCTC | subCTC | CIF
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1


@dataclass
class TrainAlignerConfig:
    train_manifest: str = ""
    valid_manifest: str = ""
    out_dir: str = ""
    encoder: str = ""                       # default: the converted Whisper base (speechlm.paths)
    encoder_layers: list[int] = field(default_factory=lambda: [-1])
    feature_cache_train: str = ""
    feature_cache_valid: str = ""
    tokenizer: str = ""                     # subCTC/CIF: default the converted SmolLM2 tokenizer
    quantity_weight: float = 1.0            # CIF: weight of the quantity loss
    calibrate: bool = True                  # after training: fit whole-frame start/end offsets on valid words
    init_from: str = ""                     # continue from this aligner folder's weights (same model config)
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    time_mask: float = 0.0                  # share of frames zeroed in random spans (SpecAugment-like)
    valid_every: int = 250
    max_valid: int = 200
    max_minutes: float = 0.0                # stop early after this much wall time (0: no limit)
    seed: int = 0
    threads: int = 0                        # torch CPU threads (0: torch default)
    encode_batch_size: int = 8
    device: str = "cpu"
    # Parameter-efficient encoder adaptation (speechlm.models.encoder_adapt.EncoderAdaptConfig fields): method none
    # (default: frozen frames, computed once) | adapter | lora | prompt (the encoder runs on every batch)
    encoder_adapt: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    init_encoder_adapt: str = ""            # an exported encoder_adapt folder to start from (its config is used)


def adapt_config(cfg: TrainAlignerConfig):
    """The encoder adaptation of this run (an EncoderAdaptConfig) or None (the frozen encoder, the default);
    ConfigError when feature caches are set with it (cached frames come from the frozen encoder)."""
    from speechlm.training.build import encoder_adapt_config
    from speechlm.training.configs import ModelConfig

    adapt = encoder_adapt_config(ModelConfig(encoder_adapt=cfg.encoder_adapt,
                                             init_encoder_adapt=cfg.init_encoder_adapt))
    if adapt is not None:
        for key in ("feature_cache_train", "feature_cache_valid"):
            if getattr(cfg, key):
                raise ConfigError(f"encoder_adapt.method={adapt.method}: the adapted encoder runs on every batch, "
                                  f"but {key}={getattr(cfg, key)} is set (cached frames come from the frozen "
                                  f"encoder); set {key}= (empty) or encoder_adapt.method=none")
    return adapt


def load_waves(manifest: str, encoder, what: str) -> list[tuple[Utterance, torch.Tensor]]:
    """All rows of a manifest with their audio in memory (the adapted encoder encodes them on every batch)."""
    from speechlm.data.audio import load_audio

    utts = read_manifest(Path(manifest).expanduser())
    return [(u, load_audio(u.audio_path, target_sr=encoder.sample_rate, expected_sr=u.sample_rate))
            for u in tqdm(utts, desc=f"audio ({what})", unit="utt")]


def item_frames(item, encoder=None) -> int:
    """Encoder frames of one ``(utt, frames (L, T, D) or 1-D audio)`` item."""
    payload = item[1]
    if payload.dim() == 1:
        return int(encoder.frame_lengths(torch.tensor([payload.numel()]))[0])
    return int(payload.shape[1])


def item_features(items, encoder=None) -> list[torch.Tensor]:
    """(L, T, D) float frames per item: stored ones, or (audio items) the adapted encoder's, with gradients when
    the caller has them on."""
    if not items or items[0][1].dim() > 1:
        return [f.float() for _, f in items]
    out = encoder([w for _, w in items])
    return [out.features[k, :, : int(out.lengths[k])] for k in range(len(items))]


def save_best(model, out_dir: Path, tokenizer, encoder=None) -> None:
    """The aligner folder, then (adapted encoder) its adaptation inside it as ``encoder_adapt/``: the folder is
    replaced atomically on every save, so the adaptation is written after it."""
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    if encoder is not None and encoder.adapted:
        encoder.save_adaptation(out_dir / ENCODER_ADAPT_DIR)


def labels_for(utt: Utterance, kind: str, model, tokenizer) -> list[int]:
    """Training targets: charCTC labels, subCTC token ids + 1 (0 is the blank), CIF token ids."""
    if kind == "charCTC":
        return model.text_to_labels(normalize_for_alignment(utt.text).text)
    ids = list(tokenizer(utt.text, add_special_tokens=False)["input_ids"])
    return ids if kind == "CIF" else [i + 1 for i in ids]


def load_split(manifest: str, cache_dir: str, encoder, batch_size: int, what: str):
    """All rows of a manifest with their frames in memory (fp16): [(utt, (L, T, D))]."""
    from speechlm.data.feature_cache import FeatureCache

    utts = read_manifest(Path(manifest).expanduser())
    cache = FeatureCache.open(Path(cache_dir).expanduser()) if cache_dir else None
    out = []
    with tqdm(total=len(utts), desc=f"frames ({what})", unit="utt") as bar:
        for fb in iter_feature_batches(utts, batch_size, encoder=None if cache else encoder, cache=cache):
            for k, utt in enumerate(fb.utts):
                out.append((utt, fb.features[k, :, : int(fb.lengths[k])].half()))
            bar.update(len(fb.utts))
    return out, cache


def collate(items, labels, device, time_mask: float = 0.0, rng: random.Random | None = None, encoder=None):
    feats = item_features(items, encoder)
    lengths = torch.tensor([f.shape[1] for f in feats])
    x = feats[0].new_zeros(len(feats), feats[0].shape[0], int(lengths.max()), feats[0].shape[2])
    for i, f in enumerate(feats):
        x[i, :, : f.shape[1]] = f
        if time_mask > 0 and rng is not None:
            n = f.shape[1]
            masked = 0
            while masked < time_mask * n:
                w = rng.randint(2, 8)
                s = rng.randrange(0, max(1, n - w))
                x[i, :, s:s + w] = 0
                masked += w
    targets = torch.tensor([x_ for lab in labels for x_ in lab], dtype=torch.long)
    target_lengths = torch.tensor([len(lab) for lab in labels])
    return x.to(device), lengths.to(device), targets.to(device), target_lengths.to(device)


@torch.no_grad()
def evaluate_cer(model, data, cfg: TrainAlignerConfig, tokenizer, encoder=None) -> float:
    """Greedy free-mode CER on ``data`` (the aligner's own transcript vs the reference)."""
    aligner = Aligner(model, llm_tokenizer=None, sub_tokenizer=tokenizer, device=cfg.device)
    if encoder is not None:
        encoder.train(False)
    refs, hyps = [], []
    for i in range(0, len(data), cfg.batch_size):
        items = data[i:i + cfg.batch_size]
        x, lengths, *_ = collate(items, [[1]] * len(items), cfg.device, encoder=encoder)
        out = aligner.frame_outputs(x, lengths)
        for k, (utt, _) in enumerate(items):
            refs.append(utt.text)
            hyps.append(aligner.decode(out[k, : int(lengths[k])]))
    model.train()
    if encoder is not None:
        encoder.train(True)
    return character_error_rate(refs, hyps)


@torch.no_grad()
def calibrate(out_dir: Path, data, cfg: TrainAlignerConfig, tokenizer, encoder=None) -> dict:
    """Fit the saved model's whole-frame start/end offsets to the reference words of ``data``; re-save.

    An adapted ``encoder`` first takes the adaptation saved with that model (the best one, not the last)."""
    if encoder is not None and encoder.adapted:
        from speechlm.models.encoder_adapt import load_state

        load_state(out_dir / ENCODER_ADAPT_DIR, encoder.adaptation)
        encoder.train(False)
    model = load_aligner_model(out_dir)
    model.config.start_offset_frames = model.config.end_offset_frames = 0
    aligner = Aligner(model, llm_tokenizer=None, sub_tokenizer=tokenizer)
    errors = BoundaryErrors()
    for i in range(0, len(data), cfg.batch_size):
        items = [(u, f) for u, f in data[i:i + cfg.batch_size] if u.words]
        if not items:
            continue
        x, lengths, *_ = collate(items, [[1]] * len(items), "cpu", encoder=encoder)
        for (utt, _), res in zip(items, aligner.align(x, lengths, [u.text for u, _ in items],
                                                      [u.id for u, _ in items]), strict=True):
            errors.extend(word_boundary_errors([(w.word, w.start_s, w.end_s) for w in utt.words],
                                               [(w.word, w.start_s, w.end_s) for w in res.words]))
    before = errors.summary()
    start, end = median_offsets_frames(errors, model.frame_rate_hz)
    model.config.start_offset_frames, model.config.end_offset_frames = start, end
    save_best(model, out_dir, tokenizer, encoder)
    return {"start_offset_frames": start, "end_offset_frames": end, "uncalibrated_valid": before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (recipes/configs/aligner_tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 model.layers=4")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(TrainAlignerConfig, args.config, args.overrides)
        return train(cfg)
    except SpeechLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(cfg: TrainAlignerConfig) -> int:
    if not (cfg.train_manifest and cfg.valid_manifest and cfg.out_dir):
        print("error: train_manifest, valid_manifest and out_dir must be set", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out_dir = Path(cfg.out_dir).expanduser()

    adapt = adapt_config(cfg)  # None: the frozen encoder, frames computed once (the default)
    encoder = None
    if adapt is not None or not (cfg.feature_cache_train and cfg.feature_cache_valid):
        from speechlm.models.encoder import SpeechEncoder

        encoder = SpeechEncoder(cfg.encoder or str(default_model(WHISPER_BASE)), layers=cfg.encoder_layers)
    if adapt is not None:
        encoder.adapt(cfg.encoder_adapt, folder=Path(cfg.init_encoder_adapt).expanduser()
                      if cfg.init_encoder_adapt else None)
        encoder.to(cfg.device).train(True)
        train_data, train_cache = load_waves(cfg.train_manifest, encoder, "train"), None
        valid_data = load_waves(cfg.valid_manifest, encoder, "valid")
    else:
        train_data, train_cache = load_split(cfg.train_manifest, cfg.feature_cache_train, encoder,
                                             cfg.encode_batch_size, "train")
        valid_data, _ = load_split(cfg.valid_manifest, cfg.feature_cache_valid, encoder, cfg.encode_batch_size,
                                   "valid")
    valid_data = valid_data[: cfg.max_valid]
    adapted = encoder if adapt is not None else None  # what runs on every batch (None: stored frames)
    enc_name, enc_layers, rate, hidden = describe(encoder, train_cache)
    if encoder is None and cfg.encoder:
        enc_name = cfg.encoder

    tokenizer = None
    m = cfg.model
    common = {"input_dim": hidden, "num_input_layers": len(enc_layers), "d_model": m.d_model, "layers": m.layers,
                  "heads": m.heads, "ff_mult": m.ff_mult, "dropout": m.dropout, "encoder_name": enc_name,
                  "encoder_layers": enc_layers, "frame_rate_hz": rate}
    if m.kind in ("subCTC", "CIF"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(default_model(SMOLLM2_135M)))
        model = CIFAligner(cif_config(tokenizer, **common)) if m.kind == "CIF" else \
            CTCAligner(sub_ctc_config(tokenizer, **common))
    else:
        model = CTCAligner(char_ctc_config(**common))
    if cfg.init_from:
        # Weights only; calibration is refitted at the end. Tensors are taken by name, so a CIF model
        # can start from a charCTC model's frame Transformer ("body.*"); a name with another shape is an error.
        src = load_aligner_model(Path(cfg.init_from).expanduser()).state_dict()
        own = model.state_dict()
        shared = {k: v for k, v in src.items() if k in own}
        bad = [k for k, v in shared.items() if v.shape != own[k].shape]
        if bad or not any(k.startswith("body.") for k in shared):
            raise ModelError(f"{cfg.init_from}: weights do not match this run's model config "
                             f"({', '.join(bad[:3]) or 'no shared frame Transformer'})")
        model.load_state_dict(shared, strict=False)
        print(f"init_from {cfg.init_from}: {len(shared)} of {len(own)} tensors")
    model.to(cfg.device).train()

    labels = [labels_for(u, m.kind, model, tokenizer) for u, _ in train_data]
    # CTC needs one frame per label (+ one blank between repeats): drop rows that cannot be aligned.
    frames = [item_frames(item, encoder) for item in train_data]
    keep = [i for i, (lab, n) in enumerate(zip(labels, frames))
            if lab and len(lab) + sum(a == b for a, b in itertools.pairwise(lab)) <= n]
    if len(keep) < len(train_data):
        print(f"note: {len(train_data) - len(keep)} training rows have more labels than frames; skipped")
    order_by_len = sorted(keep, key=lambda i: frames[i])
    batches = [order_by_len[i:i + cfg.batch_size] for i in range(0, len(order_by_len), cfg.batch_size)]

    params = sum(p.numel() for p in model.parameters())
    trained = list(model.parameters()) + (adapted.trainable_parameters() if adapted is not None else [])
    print(f"{m.kind}: {params / 1e6:.2f}M parameters; {len(keep)} train / {len(valid_data)} valid utterances; "
          f"encoder {enc_name} layers {enc_layers} at {rate} Hz" +
          (f"; encoder adaptation {adapt.method}: {adapted.num_trainable_parameters():,} trainable parameters"
           if adapted is not None else ""))
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.steps, floor=0.05)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    best_cer = math.inf
    history = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    loss_avg = None
    step = 0
    for step in bar:
        idx = batches[rng.randrange(len(batches))]
        x, lengths, targets, target_lengths = collate([train_data[i] for i in idx], [labels[i] for i in idx],
                                                      cfg.device, cfg.time_mask, rng, encoder=adapted)
        if m.kind == "CIF":
            loss, _ = cif_loss(model, x, lengths, [labels[i] for i in idx], cfg.quantity_weight)
        else:
            lp = model(x, lengths)                                 # (B, T, V)
            loss = ctc(lp.transpose(0, 1), targets, lengths, target_lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        last = step == cfg.steps - 1 or (cfg.max_minutes and time.time() - start > cfg.max_minutes * 60)
        if (step + 1) % cfg.valid_every == 0 or last:
            cer = evaluate_cer(model, valid_data, cfg, tokenizer, adapted)
            history.append({"step": step + 1, "loss": loss_avg, "valid_cer": cer,
                            "minutes": (time.time() - start) / 60})
            tqdm.write(f"step {step + 1}: loss {loss_avg:.3f} valid CER {cer:.4f}")
            if cer < best_cer:
                best_cer = cer
                save_best(model, out_dir, tokenizer, adapted)
                atomic_write_text(out_dir.parent / f"{out_dir.name}.train_state.json",
                                  json.dumps({"config": to_dict(cfg), "best_valid_cer": cer, "history": history},
                                             indent=2))
        if last:
            break
    bar.close()
    if cfg.calibrate and best_cer < math.inf and any(u.words for u, _ in valid_data):
        cal = calibrate(out_dir, valid_data, cfg, tokenizer, adapted)
        state_path = out_dir.parent / f"{out_dir.name}.train_state.json"
        state = json.loads(state_path.read_text())
        state["calibration"] = cal
        atomic_write_text(state_path, json.dumps(state, indent=2))
        print(f"calibrated on {len(valid_data)} valid rows: start {cal['start_offset_frames']:+d} frames, end "
              f"{cal['end_offset_frames']:+d} frames (uncalibrated valid MAE "
              f"{cal['uncalibrated_valid']['mae_ms']:.1f} ms)")
    print(f"done: {step + 1} steps in {(time.time() - start) / 60:.1f} min, best valid CER {best_cer:.4f}, "
          f"saved to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
