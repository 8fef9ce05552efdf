"""Train an aligner (charCTC, subCTC or CIF) on speech-encoder frames of a manifest: the config, the training loop,
best-model saving and calibration behind ``recipes/train_aligner.py`` (whose docstring describes a run)."""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from alignment.aligner import ENCODER_ADAPT_DIR, Aligner, load_aligner_model
from alignment.features import describe, iter_feature_batches
from alignment.kinds import KINDS, AlignerKind, kind_of, model_kind
from alignment.metrics import (
    BoundaryErrors,
    character_error_rate,
    median_offsets_frames,
    word_boundary_errors,
)
from speechlm.atomic import atomic_write_text
from speechlm.config import load_config, to_dict
from speechlm.data.manifest import Utterance, read_manifest
from speechlm.errors import ConfigError, ModelError
from speechlm.models.encoder_adapt import EncoderAdaptConfig, resolve_adaptation
from speechlm.models.encoder_adapt_config import adapt_config_field
from speechlm.paths import SMOLLM2_135M, WHISPER_BASE, default_model
from speechlm.schedule import lr_factor


@dataclass
class AlignerModelConfig:
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
    model: AlignerModelConfig = field(default_factory=AlignerModelConfig)
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
    # Parameter-efficient encoder adaptation (speechlm.models.encoder_adapt_config: one dataclass per method, picked
    # by method, its keys checked when the config loads): method none (default: frozen frames, computed once)
    # | adapter | lora | prompt (the encoder runs on every batch)
    encoder_adapt: EncoderAdaptConfig = field(default_factory=EncoderAdaptConfig)
    init_encoder_adapt: str = ""            # an exported encoder_adapt folder to start from (its config is used)

    def __post_init__(self) -> None:
        # a plain mapping (from code) becomes its method's config; a key that method lacks fails now
        self.encoder_adapt = adapt_config_field(self.encoder_adapt, "encoder_adapt")

    def check(self) -> TrainAlignerConfig:
        """Raise :class:`ConfigError` for a value no run can use (before any model or data is read); returns self."""
        if self.model.kind not in KINDS:
            raise ConfigError(f"model.kind: {self.model.kind!r} is not one of {', '.join(KINDS)}")
        adapt_config(self)
        return self

    def missing_required(self) -> list[str]:
        """The required fields left empty (train_manifest, valid_manifest, out_dir)."""
        return [k for k in ("train_manifest", "valid_manifest", "out_dir") if not getattr(self, k)]


def load_train_config(config_path: str | Path | None = None, overrides: list[str] | None = None
                      ) -> TrainAlignerConfig:
    """A :class:`TrainAlignerConfig` from a YAML file and ``key=value`` overrides, checked (ConfigError on a bad
    key or value)."""
    return load_config(TrainAlignerConfig, config_path, list(overrides or [])).check()


def adapt_config(cfg: TrainAlignerConfig) -> EncoderAdaptConfig | None:
    """The encoder adaptation of this run (``encoder_adapt``, or the one ``init_encoder_adapt`` holds) or None (the
    frozen encoder, the default); ConfigError when feature caches are set with it (cached frames come from the
    frozen encoder) or when ``encoder_adapt`` contradicts the folder it starts from."""
    adapt = resolve_adaptation(cfg.encoder_adapt, cfg.init_encoder_adapt)
    if not adapt.enabled:
        return None
    for key in ("feature_cache_train", "feature_cache_valid"):
        if getattr(cfg, key):
            raise ConfigError(f"encoder_adapt.method={adapt.method}: the adapted encoder runs on every batch, "
                              f"but {key}={getattr(cfg, key)} is set (cached frames come from the frozen "
                              f"encoder); set {key}= (empty) or encoder_adapt.method=none")
    return adapt


# ---------------------------------------------------------------------------------------------- data
def load_waves(manifest: str, encoder, what: str) -> list[tuple[Utterance, torch.Tensor]]:
    """All rows of a manifest with their audio in memory (the adapted encoder encodes them on every batch)."""
    from speechlm.data.audio import load_audio

    utts = read_manifest(Path(manifest).expanduser())
    return [(u, load_audio(u.audio_path, target_sr=encoder.sample_rate, expected_sr=u.sample_rate))
            for u in tqdm(utts, desc=f"audio ({what})", unit="utt")]


def load_split(manifest: str, cache_dir: str, encoder, batch_size: int, what: str):
    """All rows of a manifest with their frames in memory (fp16): ``([(utt, (L, T, D))], cache or None)``."""
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


def collate(items, device, time_mask: float = 0.0, rng: random.Random | None = None, encoder=None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Items -> ``(B, L, T, D)`` zero-padded frames (random time spans zeroed with ``time_mask``) + lengths."""
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
    return x.to(device), lengths.to(device)


def trainable_rows(labels: list[list[int]], frames: list[int]) -> list[int]:
    """Rows CTC can align: one frame per label (+ one blank between repeats); the others are dropped."""
    return [i for i, (lab, n) in enumerate(zip(labels, frames, strict=True))
            if lab and len(lab) + sum(a == b for a, b in itertools.pairwise(lab)) <= n]


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainAlignerConfig, kind: AlignerKind, tokenizer, enc_name: str, enc_layers: list[int],
                rate: float, hidden: int):
    """The new model of this run, with the weights of ``init_from`` when set."""
    m = cfg.model
    model = kind.build(tokenizer, input_dim=hidden, num_input_layers=len(enc_layers), d_model=m.d_model,
                       layers=m.layers, heads=m.heads, ff_mult=m.ff_mult, dropout=m.dropout, encoder_name=enc_name,
                       encoder_layers=enc_layers, frame_rate_hz=rate)
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
    return model


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``floor`` x the peak lr: the trainer's rule,
    :func:`speechlm.schedule.lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, floor))


def save_best(model, out_dir: Path, tokenizer, encoder=None) -> None:
    """The aligner folder, then (adapted encoder) its adaptation inside it as ``encoder_adapt/``: the folder is
    replaced atomically on every save, so the adaptation is written after it."""
    model_kind(model).save(model, out_dir, tokenizer)
    if encoder is not None and encoder.adapted:
        encoder.save_adaptation(out_dir / ENCODER_ADAPT_DIR)


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate_cer(model, data, cfg: TrainAlignerConfig, tokenizer, encoder=None) -> float:
    """Greedy free-mode CER on ``data`` (the aligner's own transcript vs the reference)."""
    aligner = Aligner(model, llm_tokenizer=None, sub_tokenizer=tokenizer, device=cfg.device)
    if encoder is not None:
        encoder.train(False)
    refs, hyps = [], []
    for i in range(0, len(data), cfg.batch_size):
        items = data[i:i + cfg.batch_size]
        x, lengths = collate(items, cfg.device, encoder=encoder)
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
        x, lengths = collate(items, "cpu", encoder=encoder)
        for (utt, _), res in zip(items, aligner.align(x, lengths, [u.text for u, _ in items],
                                                      [u.id for u, _ in items]), strict=True):
            errors.extend(word_boundary_errors([(w.word, w.start_s, w.end_s) for w in utt.words],
                                               [(w.word, w.start_s, w.end_s) for w in res.words]))
    before = errors.summary()
    start, end = median_offsets_frames(errors, model.frame_rate_hz)
    model.config.start_offset_frames, model.config.end_offset_frames = start, end
    save_best(model, out_dir, tokenizer, encoder)
    return {"start_offset_frames": start, "end_offset_frames": end, "uncalibrated_valid": before}


def state_path(out_dir: Path) -> Path:
    """``<out_dir>.train_state.json``: the run's config, validation history and calibration."""
    return out_dir.parent / f"{out_dir.name}.train_state.json"


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainAlignerConfig) -> dict:
    """Train, save the best model to ``cfg.out_dir`` and calibrate it; returns ``{"steps", "best_valid_cer",
    "out_dir", "minutes"}``. SpeechLMError (ConfigError, ModelError, ...) when the run cannot be done."""
    missing = cfg.missing_required()
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (train_manifest, valid_manifest and out_dir)")
    kind = kind_of(cfg.check().model.kind)
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
    if kind.uses_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(default_model(SMOLLM2_135M)))
    model = build_model(cfg, kind, tokenizer, enc_name, enc_layers, rate, hidden)
    model.to(cfg.device).train()

    labels = [kind.targets(model, u.text, tokenizer) for u, _ in train_data]
    frames = [item_frames(item, encoder) for item in train_data]
    keep = trainable_rows(labels, frames)
    if len(keep) < len(train_data):
        print(f"note: {len(train_data) - len(keep)} training rows have more labels than frames; skipped")
    order_by_len = sorted(keep, key=lambda i: frames[i])
    batches = [order_by_len[i:i + cfg.batch_size] for i in range(0, len(order_by_len), cfg.batch_size)]

    params = sum(p.numel() for p in model.parameters())
    trained = list(model.parameters()) + (adapted.trainable_parameters() if adapted is not None else [])
    print(f"{kind.name}: {params / 1e6:.2f}M parameters; {len(keep)} train / {len(valid_data)} valid utterances; "
          f"encoder {enc_name} layers {enc_layers} at {rate} Hz" +
          (f"; encoder adaptation {adapt.method}: {adapted.num_trainable_parameters():,} trainable parameters"
           if adapted is not None else ""))
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, cfg.warmup_steps, cfg.steps, floor=0.05)
    best_cer = math.inf
    history = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    loss_avg = None
    step = 0
    for step in bar:
        idx = batches[rng.randrange(len(batches))]
        x, lengths = collate([train_data[i] for i in idx], cfg.device, cfg.time_mask, rng, encoder=adapted)
        loss = kind.loss(model, x, lengths, [labels[i] for i in idx], cfg.quantity_weight)
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
                atomic_write_text(state_path(out_dir), json.dumps(
                    {"config": to_dict(cfg), "best_valid_cer": cer, "history": history}, indent=2))
        if last:
            break
    bar.close()
    if cfg.calibrate and best_cer < math.inf and any(u.words for u, _ in valid_data):
        cal = calibrate(out_dir, valid_data, cfg, tokenizer, adapted)
        state = json.loads(state_path(out_dir).read_text())
        state["calibration"] = cal
        atomic_write_text(state_path(out_dir), json.dumps(state, indent=2))
        print(f"calibrated on {len(valid_data)} valid rows: start {cal['start_offset_frames']:+d} frames, end "
              f"{cal['end_offset_frames']:+d} frames (uncalibrated valid MAE "
              f"{cal['uncalibrated_valid']['mae_ms']:.1f} ms)")
    minutes = (time.time() - start) / 60
    print(f"done: {step + 1} steps in {minutes:.1f} min, best valid CER {best_cer:.4f}, saved to {out_dir}")
    return {"steps": step + 1, "best_valid_cer": best_cer, "out_dir": str(out_dir), "minutes": minutes}
