"""Speaker-verification probe over FROZEN features, and its metrics (EER, minDCF) on held-out speakers.

How much speaker information do encoder frames, or a connector's LLM input vectors, keep? A small probe
learns an utterance-level speaker embedding from them and is scored on trial pairs of speakers it never saw::

    sequence (B, T, d_in)  encoder frames (feature cache) | connector vectors (one per transcript token)
    -> [mean of pool_frames frames] -> Linear (B, T', d_model) -> n_layers pre-norm Transformer blocks
       (the SSR connector's Block: its feed-forward becomes partition-and-fusion with partition_groups > 1)
    -> attentive statistics pooling (channel-wise attention with global context, ECAPA-TDNN style)
       -> [weighted mean, weighted std] (B, 2 d_model) -> LayerNorm -> Linear -> embedding (B, embed_dim)
    -> additive-margin softmax over the training speakers (training only)

AM-softmax: logits = scale * (cos(e, w_c) - margin * [c = label]); margin 0 is a plain scaled-cosine softmax.

Metrics (``eer``, ``min_dcf``): a trial is accepted when its score >= the threshold; the thresholds swept are
every distinct score and +inf (accept nothing). P_miss(t) = targets below t / targets, P_fa(t) = non-targets
at or above t / non-targets. EER = (P_miss + P_fa) / 2 at the threshold where |P_miss - P_fa| is smallest
(the first such). minDCF = min_t [C_miss P_miss p_target + C_fa P_fa (1 - p_target)] / min(C_miss p_target,
C_fa (1 - p_target)), by default p_target = 0.01, C_miss = C_fa = 1 (NIST SRE / VoxCeleb), so 1.0 is
the cost of rejecting everything.

Speakers: the corpus's ``speaker`` field is ``voice/rRATE/pPITCH``; ``speaker_level="voice"`` keeps the part
before the first "/" (the voice is the speaker; rate and pitch are per-utterance variation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from speechlm.atomic import atomic_path, atomic_write_text
from speechlm.data.manifest import Utterance, read_manifest
from speechlm.errors import CheckpointError, ConfigError, ManifestError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS = ("encoder", "connector")


# ------------------------------------------------------------------------------------------ metrics
def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, P_miss, P_fa) over every distinct score and +inf; accept = score >= threshold."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal 1-D arrays")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    tar, non = np.sort(scores[labels]), np.sort(scores[~labels])
    if not len(tar) or not len(non):
        raise ValueError(f"need target and non-target trials, got {len(tar)} targets, {len(non)} non-targets")
    thresholds = np.append(np.unique(scores), np.inf)
    p_miss = np.searchsorted(tar, thresholds, side="left") / len(tar)
    p_fa = (len(non) - np.searchsorted(non, thresholds, side="left")) / len(non)
    return thresholds, p_miss, p_fa


def eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(equal error rate, its threshold): the mean of P_miss and P_fa where they are closest."""
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    i = int(np.argmin(np.abs(p_miss - p_fa)))
    return float((p_miss[i] + p_fa[i]) / 2), float(thresholds[i])


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> tuple[float, float]:
    """(normalised minimum detection cost, its threshold)."""
    if not 0 < p_target < 1 or c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"DCF needs 0 < p_target < 1 and positive costs, got {p_target}, {c_miss}, {c_fa}")
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    dcf = (c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))
    i = int(np.argmin(dcf))
    return float(dcf[i]), float(thresholds[i])


def all_pairs(speakers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) of utterances: (pairs (P, 2), target (P,) bool = same speaker)."""
    n = len(speakers)
    i, j = np.triu_indices(n, k=1)
    ids = np.unique(np.asarray(speakers), return_inverse=True)[1]
    return np.stack([i, j], 1), ids[i] == ids[j]


def score_trials(embeddings: torch.Tensor, speakers: list[str], p_target: float = 0.01, c_miss: float = 1.0,
                 c_fa: float = 1.0) -> dict[str, Any]:
    """Cosine scores of all pairs of ``embeddings`` (U, E) and their EER / minDCF."""
    if len(speakers) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(speakers)} speakers")
    pairs, target = all_pairs(speakers)
    e = F.normalize(embeddings.float(), dim=-1)
    scores = (e[pairs[:, 0]] * e[pairs[:, 1]]).sum(-1).numpy()
    rate, eer_t = eer(scores, target)
    dcf, dcf_t = min_dcf(scores, target, p_target, c_miss, c_fa)
    return {"eer": rate, "eer_threshold": eer_t, "min_dcf": dcf, "min_dcf_threshold": dcf_t,
            "dcf": {"p_target": p_target, "c_miss": c_miss, "c_fa": c_fa},
            "trials": len(target), "target_trials": int(target.sum()), "utterances": len(speakers),
            "speakers": len(set(speakers))}


# ------------------------------------------------------------------------------------------ configs
@dataclass
class ProbeModelConfig:
    d_in: int = 0  # filled from the data (encoder hidden size or the connector's d_llm)
    d_model: int = 128
    n_layers: int = 1
    n_heads: int = 4
    ffn_mult: float = 2.0
    embed_dim: int = 128
    att_dim: int = 64  # attentive statistics pooling's bottleneck
    pool_frames: int = 1  # average this many consecutive input vectors first (speed; 1 = none)
    partition_groups: int = 0  # > 1: the blocks' feed-forward is partition-and-fusion (0/1 = dense SwiGLU)
    dropout: float = 0.0


@dataclass
class ProbeDataConfig:
    input: str = "encoder"  # encoder: cached encoder frames | connector: a trained connector's vectors
    train_manifest: str = ""  # rows with a speaker field (connector input: aligned rows with token_boundaries)
    feature_cache: str = ""  # cached encoder features of the train manifest (tools/cache_features.py)
    connector: str = ""  # input=connector: the connector folder (e.g. runs/tiny/stage1/connector)
    split: str = "train"  # rows of this split only ("" = all)
    layer: int = -1  # input=encoder: index into the cached layers
    speaker_level: str = "voice"  # voice: the part of `speaker` before "/" | raw: the whole field
    min_utts: int = 2  # training speakers need at least this many utterances
    crop: int = 200  # training: random windows of at most this many input vectors (0 = whole utterances)


@dataclass
class ProbeTrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    margin: float = 0.2  # AM-softmax additive margin
    scale: float = 30.0  # AM-softmax scale
    balanced: bool = True  # sample speakers uniformly (else utterances uniformly)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    progress: bool = True


@dataclass
class SpeakerProbeConfig:
    out_dir: str = "runs/speaker_probe"
    seed: int = 0
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    train: ProbeTrainConfig = field(default_factory=ProbeTrainConfig)


# ------------------------------------------------------------------------------------------- model
class AttentiveStatsPool(nn.Module):
    """Channel-wise attentive statistics pooling with global context: (B, T, d), mask -> (B, 2d)."""

    def __init__(self, d: int, att_dim: int):
        super().__init__()
        self.att = nn.Sequential(nn.Linear(3 * d, att_dim), nn.Tanh(), nn.Linear(att_dim, d))

    @staticmethod
    def stats(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (w * h).sum(1)
        var = ((w * h * h).sum(1) - mean * mean).clamp(min=1e-6)
        return mean, var.sqrt()

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, :, None].to(h.dtype)  # (B, T, 1)
        uniform = m / m.sum(1, keepdim=True)
        mean, std = self.stats(h, uniform)  # global context of the utterance
        ctx = torch.cat((h, mean[:, None].expand_as(h), std[:, None].expand_as(h)), -1)  # (B, T, 3d)
        logits = self.att(ctx).masked_fill(~mask[:, :, None], float("-inf"))  # (B, T, d)
        mean, std = self.stats(h, torch.softmax(logits, dim=1))
        return torch.cat((mean, std), -1)


class AMSoftmax(nn.Module):
    """Additive-margin softmax: loss of scale * (cos - margin at the true class) against the labels."""

    def __init__(self, embed_dim: int, n_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        if n_classes < 2:
            raise ConfigError(f"AM-softmax needs at least 2 training speakers, got {n_classes}")
        if margin < 0 or scale <= 0:
            raise ConfigError(f"AM-softmax needs margin >= 0 and scale > 0, got margin={margin}, scale={scale}")
        self.margin, self.scale = margin, scale
        self.weight = nn.Parameter(torch.randn(n_classes, embed_dim) * 0.01)

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).T  # (B, C)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cosines(emb)
        logits = self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype))
        return F.cross_entropy(logits, labels), logits


class SpeakerEmbedder(nn.Module):
    """(B, T, d_in), lengths (B,) -> utterance embeddings (B, embed_dim)."""

    def __init__(self, cfg: ProbeModelConfig):
        super().__init__()
        from speechlm.models.connectors.base import SSRConfig
        from speechlm.models.connectors.ssr import Block

        if cfg.d_in <= 0:
            raise ConfigError("probe model.d_in must be set (the input vectors' size)")
        if cfg.pool_frames < 1:
            raise ConfigError(f"probe model.pool_frames must be >= 1, got {cfg.pool_frames}")
        self.cfg = cfg
        self.inp = nn.Linear(cfg.d_in, cfg.d_model)
        block_cfg = SSRConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, ffn_mult=cfg.ffn_mult, dropout=cfg.dropout,
                              partition_groups=cfg.partition_groups)
        try:
            self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(cfg.n_layers))
        except ValueError as e:
            raise ConfigError(f"speaker probe: {e}") from None
        self.norm = nn.RMSNorm(cfg.d_model)
        self.pool = AttentiveStatsPool(cfg.d_model, cfg.att_dim)
        self.out_norm = nn.LayerNorm(2 * cfg.d_model)
        self.out = nn.Linear(2 * cfg.d_model, cfg.embed_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from speechlm.models.connectors.base import frame_mask, stack_frames

        k = self.cfg.pool_frames
        if k > 1:
            x, lengths = stack_frames(x, lengths, k)  # (B, T/k, k*d_in); a clip's last group may hold padding
            x = x.unflatten(-1, (k, self.cfg.d_in)).mean(-2)
        t = x.shape[1]
        mask = frame_mask(lengths, t)  # (B, T)
        h = self.inp(x)
        allowed = (mask[:, None, :] | torch.eye(t, dtype=torch.bool, device=x.device)[None]).expand(-1, t, -1)
        for block in self.blocks:
            h = block(h, allowed)
        return self.out(self.out_norm(self.pool(self.norm(h), mask)))


class SpeakerProbe(nn.Module):
    """The embedder plus the AM-softmax head over the training speakers."""

    def __init__(self, cfg: ProbeModelConfig, n_speakers: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.embedder = SpeakerEmbedder(cfg)
        self.head = AMSoftmax(cfg.embed_dim, n_speakers, margin, scale)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x, lengths), labels)[0]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -------------------------------------------------------------------------------------------- data
def speaker_of(utt: Utterance, level: str = "voice") -> str:
    """The speaker label of a manifest row (ManifestError when it has none)."""
    if not utt.speaker:
        raise ManifestError(f"row {utt.id!r} has no speaker field (the speaker probe needs one on every row)")
    if level == "voice":
        return utt.speaker.split("/", 1)[0]
    if level == "raw":
        return utt.speaker
    raise ConfigError(f"unknown speaker_level {level!r} (voice | raw)")


def read_rows(manifest: str | Path, split: str = "") -> list[Utterance]:
    rows = [u for u in read_manifest(Path(manifest).expanduser()) if not split or u.split == split]
    if not rows:
        raise ManifestError(f"{manifest}: no rows" + (f" of split {split!r}" if split else ""))
    return rows


@torch.no_grad()
def load_sequences(rows: list[Utterance], feature_cache: str | Path, input_kind: str = "encoder", layer: int = -1,
                   connector: Any = None, batch_size: int = 16, progress: bool = True,
                   desc: str = "reading features") -> list[torch.Tensor]:
    """One fp16 sequence (T, d) per row: cached encoder frames, or the connector's vectors (N, d_llm) of them."""
    from speechlm.data.feature_cache import FeatureCache

    if input_kind not in INPUTS:
        raise ConfigError(f"unknown probe input {input_kind!r} ({' | '.join(INPUTS)})")
    cache = FeatureCache.open(Path(feature_cache).expanduser())
    missing = [u.id for u in rows if u.id not in cache]
    if missing:
        raise ManifestError(f"{feature_cache}: {len(missing)} manifest rows are not in the feature cache "
                            f"(first: {missing[0]!r}); cache the manifest with tools/cache_features.py")
    if input_kind == "encoder":
        if not -len(cache.layers) <= layer < len(cache.layers):
            raise ConfigError(f"layer {layer}: the cache holds layers {list(cache.layers)}")
        return [cache[u.id][layer].half() for u in tqdm(rows, desc=desc, disable=not progress, leave=False)]
    if connector is None:
        raise ConfigError("input=connector needs a connector (data.connector=FOLDER)")
    from speechlm.data.boundaries import convert_boundaries

    if not getattr(connector, "uses_boundaries", False):
        raise ConfigError(f"input=connector: the {connector.cfg.name!r} connector gives no per-token vectors")
    bad = [u.id for u in rows if not u.token_boundaries]
    if bad:
        raise ManifestError(f"input=connector needs aligned rows with token_boundaries; {len(bad)} have none "
                            f"(first: {bad[0]!r}): use the aligner's manifest (tools/align.py)")
    connector.eval()
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: cache.frames(rows[i].id))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        feats = [cache[rows[i].id] for i in idx]  # (L, T, D)
        t = max(f.shape[1] for f in feats)
        x = torch.stack([F.pad(f, (0, 0, 0, t - f.shape[1])) for f in feats])  # (B, L, T, D)
        lengths = torch.tensor([f.shape[1] for f in feats])
        bnds = []
        for i, f in zip(idx, feats):
            b = convert_boundaries(rows[i].token_boundaries, rows[i].boundary_frame_rate_hz or cache.frame_rate_hz,
                                   cache.frame_rate_hz)
            b = np.maximum.accumulate(np.clip(np.asarray(b, dtype=np.int64), 0, f.shape[1] - 1))
            bnds.append(torch.from_numpy(b))
        n = max(len(b) for b in bnds)
        bnd = torch.stack([F.pad(b, (0, n - len(b))) for b in bnds])
        tmask = torch.arange(n)[None] < torch.tensor([len(b) for b in bnds])[:, None]
        emb = connector(x, lengths, bnd, tmask).embeds  # (B, N, d_llm)
        for j, i in enumerate(idx):
            out[i] = emb[j, :len(bnds[j])].half()
    return out  # type: ignore[return-value]


def collate(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (B, T, d) float32 and lengths (B,)."""
    t = max(s.shape[0] for s in seqs)
    x = torch.stack([F.pad(s.float(), (0, 0, 0, t - s.shape[0])) for s in seqs])
    return x, torch.tensor([s.shape[0] for s in seqs])


@torch.no_grad()
def embed_all(embedder: SpeakerEmbedder, seqs: list[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """(U, embed_dim) embeddings of whole sequences (batched by length)."""
    embedder.eval()
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].shape[0])
    out = torch.empty(len(seqs), embedder.cfg.embed_dim)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, lengths = collate([seqs[i] for i in idx])
        out[idx] = embedder(x, lengths)
    return out


# ------------------------------------------------------------------------------------------ training
def _open_connector(folder: str) -> Any:
    from speechlm.models.connectors import load_connector

    if not folder:
        raise ConfigError("data.input=connector needs data.connector=FOLDER (a saved connector)")
    return load_connector(Path(folder).expanduser())


def train_probe(cfg: SpeakerProbeConfig) -> dict[str, Any]:
    """Train the probe as ``cfg`` says; writes ``out_dir/probe/`` and ``out_dir/metrics.json``; returns metrics."""
    d, tr = cfg.data, cfg.train
    if d.input not in INPUTS:
        raise ConfigError(f"data.input={d.input!r}: use one of {', '.join(INPUTS)}")
    if not d.train_manifest or not d.feature_cache:
        raise ConfigError("data.train_manifest and data.feature_cache are required")
    if tr.steps < 1 or tr.batch_size < 2:
        raise ConfigError(f"train.steps ({tr.steps}) must be >= 1 and train.batch_size ({tr.batch_size}) >= 2")
    if tr.threads:
        torch.set_num_threads(tr.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = read_rows(d.train_manifest, d.split)
    counts = Counter(speaker_of(u, d.speaker_level) for u in rows)
    keep = sorted(s for s, c in counts.items() if c >= d.min_utts)
    if len(keep) < 2:
        raise ConfigError(f"{d.train_manifest}: {len(keep)} speakers with >= {d.min_utts} utterances; need 2")
    label_of = {s: i for i, s in enumerate(keep)}
    rows = [u for u in rows if speaker_of(u, d.speaker_level) in label_of]
    connector = _open_connector(d.connector) if d.input == "connector" else None
    seqs = load_sequences(rows, d.feature_cache, d.input, d.layer, connector, progress=tr.progress)
    labels = torch.tensor([label_of[speaker_of(u, d.speaker_level)] for u in rows])

    mcfg = dataclasses.replace(cfg.model, d_in=int(seqs[0].shape[-1]))
    probe = SpeakerProbe(mcfg, len(keep), tr.margin, tr.scale).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        p = (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    per_spk = Counter(labels.tolist())
    weights = (1.0 / torch.tensor([per_spk[int(c)] for c in labels], dtype=torch.float)) if tr.balanced \
        else torch.ones(len(rows))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, times = [], []
    bar = tqdm(range(tr.steps), desc="speaker probe", disable=not tr.progress)
    for step in bar:
        idx = torch.multinomial(weights, tr.batch_size, replacement=True, generator=gen).tolist()
        crops = []
        for i in idx:
            s = seqs[i]
            if d.crop and s.shape[0] > d.crop:
                o = int(torch.randint(0, s.shape[0] - d.crop + 1, (1,), generator=gen))
                s = s[o:o + d.crop]
            crops.append(s)
        x, lengths = collate(crops)
        start = time.perf_counter()
        loss = probe(x, lengths, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(probe.parameters(), 5.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"speaker probe: loss {losses[-1]} at step {step}")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")

    out_dir = Path(cfg.out_dir)
    meta = {"probe": dataclasses.asdict(mcfg), "input": d.input, "connector": d.connector, "layer": d.layer,
            "speaker_level": d.speaker_level, "train_speakers": keep, "margin": tr.margin, "scale": tr.scale,
            "train_manifest": d.train_manifest}
    save_probe(probe, meta, out_dir / "probe")
    k = max(1, min(20, tr.steps // 5))
    metrics = {"config": dataclasses.asdict(cfg), "params_embedder": n_params(probe.embedder),
               "params_head": n_params(probe.head), "params_blocks": n_params(probe.embedder.blocks),
               "train_utterances": len(rows), "train_speakers": len(keep),
               "loss_first": statistics.mean(losses[:k]), "loss_last": statistics.mean(losses[-k:]),
               "losses": losses, "step_time_s_median": statistics.median(times[1:] or times)}
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def save_probe(probe: SpeakerProbe, meta: dict, folder: str | Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE))


def load_probe(folder: str | Path) -> tuple[SpeakerProbe, dict]:
    """(probe in eval mode, its meta) from a folder written by ``train_probe``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        mcfg = ProbeModelConfig(**meta["probe"])
        probe = SpeakerProbe(mcfg, len(meta["train_speakers"]), meta["margin"], meta["scale"])
        probe.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: not a speaker probe ({type(e).__name__}: {e})") from None
    return probe.eval(), meta


def evaluate_probe(probe_dir: str | Path, manifests: list[str], caches: list[str], p_target: float = 0.01,
                   c_miss: float = 1.0, c_fa: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """EER/minDCF of a probe on all pairs of the utterances in ``manifests`` whose speakers it never trained on.

    ``caches[i]`` is the feature cache of ``manifests[i]``. Rows of training speakers are dropped (counted).
    """
    if len(manifests) != len(caches) or not manifests:
        raise ConfigError(f"give one feature cache per manifest ({len(manifests)} manifests, {len(caches)} caches)")
    probe, meta = load_probe(probe_dir)
    seen = set(meta["train_speakers"])
    connector = _open_connector(meta["connector"]) if meta["input"] == "connector" else None
    seqs, speakers, dropped = [], [], 0
    for manifest, cache in zip(manifests, caches):
        rows = read_rows(manifest)
        held = [u for u in rows if speaker_of(u, meta["speaker_level"]) not in seen]
        dropped += len(rows) - len(held)
        if held:
            seqs += load_sequences(held, cache, meta["input"], meta["layer"], connector, progress=progress,
                                   desc=f"reading {Path(manifest).name}")
            speakers += [speaker_of(u, meta["speaker_level"]) for u in held]
    if len(set(speakers)) < 2:
        raise ManifestError(f"{', '.join(manifests)}: {len(set(speakers))} held-out speaker(s); need at least 2")
    result = score_trials(embed_all(probe.embedder, seqs), speakers, p_target, c_miss, c_fa)
    result.update(dropped_seen_speaker_rows=dropped, held_out_speakers=sorted(set(speakers)), input=meta["input"],
                  partition_groups=meta["probe"]["partition_groups"], params_embedder=n_params(probe.embedder))
    return result
