"""The frozen speech encoder: any Hugging Face speech encoder by name or folder -> per-layer frames at ~50 Hz.

Whisper runs on each clip's own length (log-mel of the clip, first T positional embeddings) unless
``whisper_pad_to_30s``; clips longer than ``max_chunk_s`` are cut into equal chunks whose frames are
concatenated. A batch of clips gives, per clip, what that clip gives alone:

* Whisper, wav2vec2/HuBERT/WavLM with ``feat_extract_norm == "layer"``, w2v-BERT 2.0: padded batch
  plus an attention mask (Whisper: masked attention keys and zeroed conv activations past the clip).
* wav2vec2-style models with ``feat_extract_norm == "group"`` (the *base* checkpoints): their first
  conv layer's GroupNorm normalises over time, so padding changes every frame. Such clips run in
  groups of identical length (usually one by one), never padded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from speechlm.errors import AudioError, ModelError

#: The precisions the encoder can run in, by their short names (the CLI's and configs' spelling).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: model_type values whose encoders take raw waveforms through a conv feature encoder.
WAVEFORM_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat",
                        "wav2vec2-conformer", "sew", "sew-d")


@dataclass
class EncoderOutput:
    features: torch.Tensor  # (B, L, T, D) float32 (whatever the encoder's dtype): the L selected layers, 0-padded
    lengths: torch.Tensor  # (B,) int64: valid frames per clip


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its short name in :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"encoder dtype must be one of {sorted(DTYPES)}, not {dtype!r}")


class SpeechEncoder(nn.Module):
    """A frozen speech encoder returning the hidden states of selected layers, with exact frame lengths.

    ``dtype`` (a torch dtype or "fp32" | "fp16" | "bf16") is the precision the encoder's weights and
    activations run in: half precision is for GPUs (about twice as fast there); fp32 is the default.
    """

    def __init__(self, name_or_path: str, layers: Sequence[int] = (-1,), whisper_pad_to_30s: bool = False,
                 max_chunk_s: float = 30.0, dtype: torch.dtype | str = torch.float32):
        super().__init__()
        self.name = str(name_or_path)
        dtype = resolve_dtype(dtype)
        source = Path(name_or_path).expanduser()
        source_str = str(source) if source.exists() else str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(source_str)
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(source_str)
        except (OSError, ValueError) as e:
            raise ModelError(f"{name_or_path}: cannot load a speech encoder config/feature extractor ({e})") from None
        self.model_type: str = config.model_type
        self.whisper_pad_to_30s = bool(whisper_pad_to_30s)
        self.max_chunk_s = float(max_chunk_s)
        self.sample_rate: int = int(self.feature_extractor.sampling_rate)

        if self.model_type == "whisper":
            from transformers import WhisperModel

            whisper = WhisperModel.from_pretrained(source_str, dtype=dtype)
            self.model = whisper.encoder  # the decoder is dropped with `whisper`
            self.hidden_size = config.d_model
            self.num_hidden_layers = config.encoder_layers
            conv_stride = self.model.conv1.stride[0] * self.model.conv2.stride[0]
            self._samples_per_frame = self.feature_extractor.hop_length * conv_stride
            self._mask_capable = True
        elif self.model_type == "wav2vec2-bert":
            from transformers import Wav2Vec2BertModel

            self.model = Wav2Vec2BertModel.from_pretrained(source_str, dtype=dtype)
            self.hidden_size = config.hidden_size
            self.num_hidden_layers = config.num_hidden_layers
            # fbank hop (10 ms) x the feature extractor's frame stacking x the optional adapter's strides
            adapter = config.adapter_stride ** config.num_adapter_layers if config.add_adapter else 1
            self._samples_per_frame = 160 * self.feature_extractor.stride * adapter
            self._mask_capable = True
        elif self.model_type in WAVEFORM_MODEL_TYPES:
            self.model = AutoModel.from_pretrained(source_str, dtype=dtype)
            self.hidden_size = config.hidden_size
            self.num_hidden_layers = config.num_hidden_layers
            self._samples_per_frame = int(np.prod(config.conv_stride))
            if getattr(config, "add_adapter", False):
                self._samples_per_frame *= config.adapter_stride ** config.num_adapter_layers
            self._mask_capable = getattr(config, "feat_extract_norm", "layer") == "layer"
        else:
            raise ModelError(f"{name_or_path}: model_type {self.model_type!r} is not a supported speech encoder")

        self.frame_rate_hz: float = self.sample_rate / self._samples_per_frame
        self.layers: tuple[int, ...] = self._resolve_layers(layers)
        self.model.requires_grad_(False)
        self.model.eval()
        self._fingerprint: str | None = None
        self.adaptation: Any = None  # an EncoderAdaptation once adapt() installed one (speechlm.models.encoder_adapt)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw) -> SpeechEncoder:
        return cls(name_or_path, **kw)

    def _resolve_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        n = self.num_hidden_layers + 1  # hidden_states: embeddings output + one per layer
        out = []
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise ModelError(f"{self.name}: layer {layer} out of range for {self.num_hidden_layers} layers")
            out.append(int(idx))
        if not out:
            raise ModelError(f"{self.name}: no layers selected")
        return tuple(out)

    def train(self, mode: bool = True) -> SpeechEncoder:
        # The encoder is frozen: a parent's .train() must not switch on its dropout. Only an installed
        # adaptation (its LoRA dropout) follows ``mode``.
        super().train(False)
        if self.adaptation is not None:
            self.adaptation.train(mode)
        return self

    # ---------------------------------------------------------------- parameter-efficient adaptation
    @property
    def adapted(self) -> bool:
        """Whether an adaptation (adapters, LoRA or prompts) is installed: forward then keeps gradients."""
        return self.adaptation is not None

    def adapt(self, cfg: Any, folder: str | Path | None = None) -> Any:
        """Install a parameter-efficient adaptation (an EncoderAdaptConfig or its dict; see
        speechlm.models.encoder_adapt) and return it; ``folder``: start from an exported adaptation instead.

        The base weights stay frozen and in eval mode; the adaptation's parameters train unless
        ``cfg.train`` is false. A probe pass checks that every hook runs (an architecture whose modules
        are bypassed raises :class:`ModelError` instead of training nothing). Returns None for method none.
        """
        from speechlm.models import encoder_adapt as ea

        if self.adaptation is not None:
            raise ModelError(f"{self.name}: the encoder is already adapted ({self.adaptation.cfg.method})")
        cfg = ea.adapt_config_from_dict(cfg)
        meta = None
        if folder is not None:
            saved, meta = ea.read_adaptation_config(folder)
            if cfg.enabled and cfg.essentials() != saved.essentials():
                raise ModelError(f"{folder}: the saved adaptation {saved.essentials()} differs from the configured "
                                 f"one {cfg.essentials()} (drop encoder_adapt settings or the folder)")
            ea.check_folder_matches(folder, meta, self)
            cfg = dataclasses.replace(saved, train=cfg.train)
        if not cfg.enabled:
            return None
        adaptation = ea.EncoderAdaptation(cfg, self.model, self.hidden_size, self.model_type)
        adaptation.to(self.device, self.dtype)
        if folder is not None:
            ea.load_state(folder, adaptation)
        adaptation.requires_grad_(cfg.train)
        adaptation.install()
        self.adaptation = adaptation
        try:
            self._probe()
        except BaseException:
            adaptation.remove()
            self.adaptation = None
            raise
        self.train(self.training)
        return adaptation

    def _probe(self) -> None:
        """One short pass: every hook site must run (else the method cannot reach that architecture's modules)."""
        self.adaptation.fired.clear()
        n = max(self._samples_per_frame * 8, self.sample_rate // 2)
        with torch.no_grad():
            self([torch.zeros(n)])
        unfired = [s for s in self.adaptation.sites if s not in self.adaptation.fired]
        if unfired:
            raise ModelError(f"{self.name}: encoder_adapt.method={self.adaptation.cfg.method} cannot reach "
                             f"{len(unfired)} module(s) of this {self.model_type} encoder ({', '.join(unfired[:4])}): "
                             "its forward pass bypasses them (e.g. WavLM's fused attention takes the projection "
                             "weights directly); use another method")

    def adaptation_parameters(self) -> list[nn.Parameter]:
        """The adaptation's parameters (empty when not adapted); the base encoder's are never among them."""
        return [] if self.adaptation is None else list(self.adaptation.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: the adaptation's (when ``cfg.train``), never the frozen base weights."""
        return [p for p in self.adaptation_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def save_adaptation(self, folder: str | Path) -> Path:
        """Export the adaptation: ``folder``/config.json + model.safetensors."""
        from speechlm.models.encoder_adapt import save_adaptation

        return save_adaptation(self, folder)

    # ---------------------------------------------------------------- lengths and chunks
    def _chunk_bounds(self, num_samples: int) -> list[tuple[int, int]]:
        """Cut a clip into equal chunks of at most max_chunk_s, each a whole number of encoder frames."""
        step = self._samples_per_frame
        max_s = self.max_chunk_s
        if self.model_type == "whisper":  # positional embeddings end at 30 s
            max_s = min(max_s, float(self.feature_extractor.chunk_length))
        max_len = max(step, int(max_s * self.sample_rate) // step * step)
        if num_samples <= max_len:
            return [(0, num_samples)]
        n_chunks = math.ceil(num_samples / max_len)
        chunk_len = math.ceil(math.ceil(num_samples / n_chunks) / step) * step  # <= max_len
        return [(s, min(s + chunk_len, num_samples)) for s in range(0, num_samples, chunk_len)]

    def _chunk_frames(self, n: int) -> int:
        """Encoder frames of one chunk of ``n`` samples (exactly what the forward pass yields)."""
        if self.model_type == "whisper":
            mel_frames = n // self.feature_extractor.hop_length  # the extractor drops the STFT's last frame
            return (mel_frames + 1) // 2  # conv2: kernel 3, stride 2, padding 1 -> ceil(mel/2)
        if self.model_type == "wav2vec2-bert":
            fbank = 1 + (n - 400) // 160 if n >= 400 else 0  # 25 ms window, 10 ms hop, no centering
            frames = fbank // self.feature_extractor.stride  # a half-filled last stack is masked out
            if self.model.config.add_adapter and frames > 0:
                frames = int(self.model._get_feat_extract_output_lengths(torch.tensor(frames)))
            return max(frames, 0)
        if n < 1:
            return 0
        frames = int(self.model._get_feat_extract_output_lengths(torch.tensor(n)))
        return max(frames, 0)

    def frame_lengths(self, num_samples: torch.Tensor) -> torch.Tensor:
        """(B,) samples at ``sample_rate`` -> (B,) int64 encoder frames (chunking included)."""
        counts = [sum(self._chunk_frames(e - s) for s, e in self._chunk_bounds(int(n)))
                  for n in torch.as_tensor(num_samples).reshape(-1).tolist()]
        return torch.tensor(counts, dtype=torch.int64)

    # ---------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, waves: list[torch.Tensor]) -> EncoderOutput:
        """Encode 1-D float waveforms at ``sample_rate``; returns (B, L, T, D) float32 and (B,) lengths.

        Features are on the encoder's device, lengths on the CPU. A clip shorter than one encoder
        frame raises :class:`AudioError`. The frozen encoder runs without gradients; an adapted one
        keeps them (for its adaptation's parameters) whenever the caller has gradients enabled.
        """
        if self.adaptation is None:
            with torch.no_grad():
                return self._forward(waves)
        return self._forward(waves)

    def _forward(self, waves: list[torch.Tensor]) -> EncoderOutput:
        pieces: list[np.ndarray] = []  # every chunk of every clip
        owner: list[int] = []
        for i, wave in enumerate(waves):
            w = torch.as_tensor(wave).detach().float().cpu().reshape(-1).numpy()
            if self.frame_lengths(torch.tensor([w.shape[0]]))[0] == 0:
                raise AudioError(f"clip {i} has {w.shape[0]} samples: shorter than one encoder frame "
                                 f"({self._samples_per_frame} samples at {self.sample_rate} Hz)")
            for s, e in self._chunk_bounds(w.shape[0]):
                if self._chunk_frames(e - s) > 0:
                    pieces.append(w[s:e])
                    owner.append(i)
        chunk_feats = self._encode_chunks(pieces)  # each (L, T_chunk, D)
        per_clip: list[list[torch.Tensor]] = [[] for _ in waves]
        for i, f in zip(owner, chunk_feats):
            per_clip[i].append(f)
        clips = [torch.cat(parts, dim=1) for parts in per_clip]
        lengths = torch.tensor([c.shape[1] for c in clips], dtype=torch.int64)
        feats = clips[0].new_zeros(len(clips), len(self.layers), int(lengths.max()), self.hidden_size)
        for i, c in enumerate(clips):
            feats[i, :, : c.shape[1]] = c
        return EncoderOutput(features=feats, lengths=lengths)

    def _encode_chunks(self, pieces: list[np.ndarray]) -> list[torch.Tensor]:
        """Encode chunks (each <= max_chunk_s) -> one (L, T, D) float32 tensor per chunk, in order."""
        if self._mask_capable:
            groups = [list(range(len(pieces)))]
        else:  # group-norm feature encoders: only identical lengths may share a batch
            by_len: dict[int, list[int]] = {}
            for j, p in enumerate(pieces):
                by_len.setdefault(p.shape[0], []).append(j)
            groups = list(by_len.values())
        out: list[torch.Tensor | None] = [None] * len(pieces)
        for group in groups:
            batch = [pieces[j] for j in group]
            if self.model_type == "whisper":
                feats = self._whisper_batch(batch)
            elif self.model_type == "wav2vec2-bert":
                feats = self._w2vbert_batch(batch)
            else:
                feats = self._waveform_batch(batch)
            for j, f in zip(group, feats):
                expected = self._chunk_frames(pieces[j].shape[0])
                assert f.shape[1] == expected, (f.shape, expected)  # frame_lengths must stay exact
                out[j] = f
        return out  # type: ignore[return-value]

    def _select(self, hidden_states: Sequence[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
        if self.adaptation is not None and self.adaptation.n_prompts:  # prompt positions out: frames stay exact
            hidden_states = [self.adaptation.strip(h, k) for k, h in enumerate(hidden_states)]
        stacked = torch.stack([hidden_states[k] for k in self.layers], dim=1).float()  # (B, L, T, D)
        return [stacked[b, :, :n] for b, n in enumerate(lengths)]  # stays on the model's device

    def _whisper_batch(self, batch: list[np.ndarray]) -> list[torch.Tensor]:
        fe, enc = self.feature_extractor, self.model
        if self.whisper_pad_to_30s:
            mels = [fe(w, sampling_rate=self.sample_rate, return_tensors="pt").input_features[0] for w in batch]
        else:
            mels = [fe(w, sampling_rate=self.sample_rate, padding="longest",
                       return_tensors="pt").input_features[0] for w in batch]  # (80, n // hop)
        lengths = [self._chunk_frames(w.shape[0]) for w in batch]
        mel_lens = [m.shape[1] for m in mels]
        max_mel = max(mel_lens)
        mel = torch.zeros(len(batch), mels[0].shape[0], max_mel)
        for b, m in enumerate(mels):
            mel[b, :, : m.shape[1]] = m  # zeros past the clip = the conv's own zero padding
        mel = mel.to(self.device, self.dtype)
        x = nn.functional.gelu(enc.conv1(mel))  # (B, D, M)
        if len(set(mel_lens)) > 1:
            # conv2 (kernel 3) at a clip's last frame would read conv1 outputs of the padding
            keep = torch.arange(max_mel, device=x.device)[None, :] < torch.tensor(mel_lens, device=x.device)[:, None]
            x = x * keep[:, None, :]
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)  # (B, T, D)
        t = x.shape[1]
        if t > enc.embed_positions.num_embeddings:
            raise AudioError(f"chunk of {t} frames exceeds Whisper's {enc.embed_positions.num_embeddings} positions")
        h = x + enc.embed_positions.weight[:t]
        mask = None
        if not self.whisper_pad_to_30s and len(set(lengths)) > 1:
            valid = torch.arange(t, device=h.device)[None, :] < torch.tensor(lengths, device=h.device)[:, None]
            mask = torch.zeros(len(batch), 1, t, t, dtype=h.dtype, device=h.device)
            mask.masked_fill_(~valid[:, None, None, :], torch.finfo(h.dtype).min)
        hidden = [h]
        last = max(self.layers)
        for layer in enc.layers[:last]:
            h = layer(h, mask, layer_head_mask=None)[0]
            hidden.append(h)
        if last == self.num_hidden_layers:  # HF's last hidden state is after the final layer norm
            hidden[-1] = enc.layer_norm(h)
        return self._select(hidden, lengths)

    def _waveform_batch(self, batch: list[np.ndarray]) -> list[torch.Tensor]:
        # Normalise each clip on its own (the extractor's per-utterance zero-mean/unit-variance), then pad.
        values = [self.feature_extractor(w, sampling_rate=self.sample_rate, return_tensors="pt").input_values[0]
                  for w in batch]
        n_max = max(v.shape[0] for v in values)
        x = torch.zeros(len(batch), n_max)
        attn = torch.zeros(len(batch), n_max, dtype=torch.long)
        for b, v in enumerate(values):
            x[b, : v.shape[0]] = v
            attn[b, : v.shape[0]] = 1
        kw = {"attention_mask": attn.to(self.device)} if self._mask_capable else {}
        out = self.model(x.to(self.device, self.dtype), output_hidden_states=True, **kw)
        return self._select(out.hidden_states, [self._chunk_frames(w.shape[0]) for w in batch])

    def _w2vbert_batch(self, batch: list[np.ndarray]) -> list[torch.Tensor]:
        feats = []
        for w in batch:
            enc = self.feature_extractor(w, sampling_rate=self.sample_rate, return_tensors="pt")
            n = int(enc.attention_mask[0].sum())  # drop a half-padded last stack
            feats.append(enc.input_features[0, :n])
        f_max = max(f.shape[0] for f in feats)
        x = torch.zeros(len(batch), f_max, feats[0].shape[1])
        attn = torch.zeros(len(batch), f_max, dtype=torch.long)
        for b, f in enumerate(feats):
            x[b, : f.shape[0]] = f
            attn[b, : f.shape[0]] = 1
        out = self.model(x.to(self.device, self.dtype), attention_mask=attn.to(self.device), output_hidden_states=True)
        return self._select(out.hidden_states, [self._chunk_frames(w.shape[0]) for w in batch])

    # ---------------------------------------------------------------- identity
    def weights_fingerprint(self) -> str:
        """SHA-256 over the encoder's parameters and buffers (names, shapes, bytes) and its feature extractor."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            h.update(self.feature_extractor.to_json_string().encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def cache_key(self) -> dict:
        """What identifies these features: same key, same weights and settings -> same frames."""
        return {
            "encoder": self.name,
            "model_type": self.model_type,
            "weights_sha256": self.weights_fingerprint(),
            "layers": list(self.layers),
            "whisper_pad_to_30s": self.whisper_pad_to_30s if self.model_type == "whisper" else False,
            "max_chunk_s": self.max_chunk_s,
            "sample_rate": self.sample_rate,
            "frame_rate_hz": self.frame_rate_hz,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),  # half-precision frames differ from fp32 ones
        }
