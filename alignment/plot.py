"""PNG of an alignment: log-mel spectrogram, reference and predicted word boundaries, LLM-token boundaries
(:func:`plot_manifest` for rows of a manifest: the logic behind ``tools/plot_alignment.py``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np
import torch
import torchaudio.functional as AF

from alignment.aligner import Aligner, AlignmentResult
from alignment.features import iter_feature_batches, open_frame_source
from speechlm.atomic import atomic_path
from speechlm.data.audio import load_audio
from speechlm.data.manifest import read_manifest


def log_mel(wave: torch.Tensor, sample_rate: int, n_mels: int = 80, hop_s: float = 0.01) -> np.ndarray:
    """``(n_mels, frames)`` log-mel spectrogram in dB at ``hop_s`` steps."""
    n_fft = int(0.025 * sample_rate)
    hop = int(hop_s * sample_rate)
    spec = torch.stft(wave.float(), n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft),
                      return_complex=True).abs() ** 2                     # (F, frames)
    fb = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)   # (F, n_mels)
    mel = fb.T @ spec
    return (10 * torch.log10(mel.clamp_min(1e-10))).numpy()


def plot_alignment(path: str | Path, wave: torch.Tensor, sample_rate: int, result: AlignmentResult,
                   tokenizer, reference: Sequence[tuple[str, float, float]] | None = None,
                   title: str | None = None) -> None:
    """Write a PNG: spectrogram; reference word spans (top, green) and predicted ones (red); below, one
    tick per LLM token at its boundary's end time, labelled with the token text."""
    mel = log_mel(wave, sample_rate)
    duration = wave.shape[0] / sample_rate
    fig, (ax, ax_tok) = plt.subplots(2, 1, figsize=(max(8.0, duration * 4), 5.5), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    ax.imshow(mel, origin="lower", aspect="auto", extent=(0, duration, 0, mel.shape[0]), cmap="magma",
              vmin=mel.max() - 80)
    top = mel.shape[0]
    if reference:
        for w, s, e in reference:
            ax.axvline(s, color="lime", lw=1.2, ymin=0.5, ymax=1.0)
            ax.axvline(e, color="lime", lw=1.2, ls="--", ymin=0.5, ymax=1.0)
            ax.text(s, top * 0.93, w, color="lime", fontsize=8, clip_on=True)
    for w in result.words:
        ax.axvline(w.start_s, color="red", lw=1.2, ymin=0.0, ymax=0.5)
        ax.axvline(w.end_s, color="red", lw=1.2, ls="--", ymin=0.0, ymax=0.5)
        ax.text(w.start_s, top * 0.05, w.word, color="red", fontsize=8, clip_on=True)
    ax.set_ylabel("mel bin")
    ax.set_title(title or f"{result.utt_id} ({result.mode}): reference (green, top) vs predicted (red, bottom); "
                 "solid = start, dashed = end", fontsize=9)
    ends = result.token_end_s
    pieces = [tokenizer.decode([t]) for t in result.token_ids]
    for k, (t, piece) in enumerate(zip(ends, pieces, strict=True)):
        ax_tok.axvline(t, color="tab:blue", lw=0.8)
        ax_tok.text(t, 0.15 + 0.6 * (k % 3) / 2, repr(piece)[1:-1], fontsize=7, ha="right", rotation=0,
                    clip_on=True)
    ax_tok.set_yticks([])
    ax_tok.set_xlabel(f"time (s); LLM-token boundaries at {result.frame_rate_hz:g} Hz")
    ax_tok.set_xlim(0, duration)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_manifest(manifest: str, aligner_folder: str, tokenizer: str, out_dir: str | Path, *, encoder: str = "",
                  feature_cache: str = "", ids: Sequence[str] | None = None, limit: int = 4, free: bool = False,
                  decoder: str = "ctc_segmentation") -> Iterator[Path]:
    """One PNG per row (``ids``, else the first ``limit`` rows) as ``out_dir/<id>.<mode>.png``, yielding each path
    once written."""
    from transformers import AutoTokenizer

    llm_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    aligner = Aligner.from_pretrained(aligner_folder, llm_tokenizer, decoder=decoder)
    enc, cache = open_frame_source(aligner, encoder, feature_cache)
    utts = read_manifest(manifest)
    utts = [u for u in utts if u.id in set(ids)] if ids else utts[:limit]
    for fb in iter_feature_batches(utts, 4, encoder=enc, cache=cache):
        texts = [None if free else u.text for u in fb.utts]
        for utt, res in zip(fb.utts, aligner.align(fb.features, fb.lengths, texts, [u.id for u in fb.utts]),
                            strict=True):
            ref = [(w.word, w.start_s, w.end_s) for w in utt.words] if utt.words else None
            png = Path(out_dir) / f"{utt.id}.{res.mode}.png"
            plot_alignment(png, load_audio(utt.audio_path), 16_000, res, llm_tokenizer, ref)
            yield png
