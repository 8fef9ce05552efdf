"""What every connector shares: its output type, layer fusion, configs, save/load and the registry.

The registry is filled by the connector modules themselves (``class SSRConnector(Connector, name="ssr")``),
which the package imports: this module imports none of them.

A connector maps frozen encoder frames to LLM input vectors::

    forward(features (B, L, T, D_enc), frame_lengths (B,), boundaries (B, N) | None,
            token_mask (B, N) | None) -> ConnectorOutput(embeds (B, N, d_llm), mask (B, N))

``boundaries[b, i]`` is the inclusive END frame of LLM token i at the ENCODER frame rate; padded
token positions have ``token_mask`` False. Only SSR uses boundaries; the baselines output one
vector per group of frames and ignore them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from speechlm.atomic import atomic_path
from speechlm.config import from_dict
from speechlm.errors import CheckpointError, ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ConnectorOutput:
    embeds: torch.Tensor  # (B, N, d_llm); zero where mask is False
    mask: torch.Tensor  # (B, N) bool, True at real vectors


# ----------------------------------------------------------------------------------------- configs
@dataclass
class ConnectorConfig:
    """Fields every connector has: the encoder and LLM it sits between (saved with its weights).

    The sizes and identities (d_enc .. llm_vocab_size) are filled in from the encoder and LLM when a run
    builds the connector (speechlm.training.build.make_connector); a config file need not set them.
    ``name`` picks the dataclass (``config_tag``): a key the named connector lacks is a ConfigError when
    the config loads (speechlm.config).
    """

    config_tag = "name"  # not a field (no annotation): which field selects the concrete config class

    name: str = ""
    d_enc: int = 512  # encoder hidden size
    n_enc_layers: int = 1  # L: encoder layers fused by the layer fusion (layer_fusion)
    d_llm: int = 576  # LLM hidden size
    frame_rate_hz: float = 50.0  # encoder frame rate
    # Identity of the models this connector belongs to (checked on load; "" = not yet known).
    encoder_name: str = ""
    encoder_layers: list[int] = field(default_factory=list)
    llm_name: str = ""
    llm_vocab_size: int = 0
    # How the L encoder layers become one frame sequence (fusion.py), in front of every connector:
    #   "weighted": learned softmax-weighted sum of the L layers (LayerFusion; one layer passes through unchanged);
    #     the default, identical to connectors saved before this field existed.
    #   "hierarchical": hierarchical feature fusion (Huo et al., 2022): groups of fusion_group adjacent layers,
    #     bottom to top, each fused with the previous step's output by a small MLP (LayerNorm -> Linear(n*D ->
    #     fusion_dim) -> GELU -> Linear(fusion_dim -> D), plus the mean of its inputs); needs L >= 2 (ConfigError).
    # The baselines need no option: top layer only = encoder_layers [-1] (the recipes' default), one middle layer =
    # encoder_layers [k], weighted sum of all = every layer selected and "weighted" (the feature cache holds
    # exactly the layers tools/cache_features.py --layers stored). tools/benchmarks/bench_fusion.py compares them.
    layer_fusion: str = "weighted"
    fusion_group: int = 2  # hierarchical: adjacent layers fused per step (the top group keeps the remainder)
    fusion_dim: int = 0  # hierarchical: hidden width of each step's MLP (0 = d_enc)

    @classmethod
    def config_variants(cls) -> dict[str, type[ConnectorConfig]]:
        """The config class of each connector name (what ``name`` selects)."""
        return CONFIGS


@dataclass
class SSRConfig(ConnectorConfig):
    name: str = "ssr"
    d_model: int = 384  # width of the compressor Transformer
    n_layers: int = 4
    n_heads: int = 6
    ffn_mult: float = 8 / 3  # SwiGLU hidden = ffn_mult * d_model (Llama's ratio)
    mask: str = "blockwise"  # "blockwise" | "causal"
    readout: str = "boundary"  # "boundary" | "mean"
    # Tokens that share a read-out frame (after stacking, e.g. a word and the full stop after it) get
    # distinct vectors: slot embeddings (rank among the sharers, "a later token shares this frame",
    # the token's end offset inside the stacked frame) and a small SwiGLU head after the read-out.
    slot_readout: bool = False
    stack: int = 1  # k encoder frames concatenated into one compressor frame
    dropout: float = 0.0
    rope: bool = False  # rotary positions over frames (the prototype used none)
    rope_theta: float = 10000.0
    # Partition-and-fusion (partition.py): > 1 splits the feed-forward into this many fused groups; 0/1 = dense.
    partition_groups: int = 0


@dataclass
class StackConfig(ConnectorConfig):
    name: str = "stack"
    stack: int = 8  # Ultravox: 50 Hz -> 6.25 Hz
    hidden: int = 1024
    # Partition-and-fusion (partition.py): > 1 splits the MLP into this many fused groups; 0/1 = dense.
    partition_groups: int = 0


@dataclass
class ConvConfig(ConnectorConfig):
    name: str = "conv"
    stack: int = 5  # SLAM-LLM: kernel = stride = 5, 50 Hz -> 10 Hz
    hidden: int = 1024
    # Partition-and-fusion (partition.py): > 1 splits conv + output layer into this many fused groups; 0/1 = dense.
    partition_groups: int = 0


@dataclass
class QFormerConfig(ConnectorConfig):
    name: str = "qformer"
    window_s: float = 0.33  # SALMONN: ~17 frames at 50 Hz per window
    n_queries: int = 1  # learned queries per window
    d_model: int = 384
    n_layers: int = 2
    n_heads: int = 6
    ffn_mult: float = 4.0
    dropout: float = 0.0
    # Partition-and-fusion (partition.py): > 1 splits the feed-forward into this many fused groups; 0/1 = dense.
    partition_groups: int = 0


CONFIGS: dict[str, type[ConnectorConfig]] = {
    "ssr": SSRConfig,
    "stack": StackConfig,
    "conv": ConvConfig,
    "qformer": QFormerConfig,
}


def connector_config_from_dict(data: dict[str, Any]) -> ConnectorConfig:
    """The config dataclass named by ``data["name"]``, filled from ``data`` (unknown keys raise)."""
    name = data.get("name", "")
    if name not in CONFIGS:
        raise ModelError(f"unknown connector {name!r}; known: {', '.join(CONFIGS)}")
    return from_dict(CONFIGS[name], dict(data))


def build_connector(cfg: ConnectorConfig | dict[str, Any]) -> Connector:
    """The connector module for ``cfg`` (a config dataclass or a mapping with ``name``)."""
    if isinstance(cfg, dict):
        cfg = connector_config_from_dict(cfg)
    module = Connector.registry.get(cfg.name)
    if module is None:
        raise ModelError(f"unknown connector {cfg.name!r}; known: {', '.join(sorted(Connector.registry))}")
    return module(cfg)


# ------------------------------------------------------------------------------------ shared parts
class LayerFusion(nn.Module):
    """Learned softmax-weighted sum over the L encoder layers (``layer_fusion="weighted"``; the other: fusion.py)."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers
        # Zeros = a plain average at the start; a single layer needs no weights at all.
        self.logits = nn.Parameter(torch.zeros(n_layers)) if n_layers > 1 else None

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # features (B, L, T, D) -> (B, T, D); ``lengths`` is unused (zero padding frames stay zero in a weighted sum)
        if features.shape[1] != self.n_layers:
            raise ValueError(f"expected {self.n_layers} encoder layers, got features {tuple(features.shape)}")
        if self.logits is None:
            return features[:, 0]
        w = torch.softmax(self.logits, dim=0).to(features.dtype)
        return torch.einsum("bltd,l->btd", features, w)


def stack_frames(x: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate k consecutive frames: x (B, T, D) -> (B, ceil(T/k), k*D), lengths -> ceil(len/k).

    The last group of a clip is zero-padded, as padding frames already are.
    """
    if k == 1:
        return x, lengths
    b, t, d = x.shape
    pad = (-t) % k
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(b, (t + pad) // k, k * d), torch.div(lengths + k - 1, k, rounding_mode="floor")


def frame_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) bool, True at the valid frames."""
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


def llm_identity(llm: nn.Module) -> tuple[str, int, int]:
    """(name, hidden size, vocab size) of a HF causal LM (PEFT-wrapped or not)."""
    cfg = llm.config
    name = Path(str(getattr(cfg, "_name_or_path", "") or "")).name or str(cfg.model_type)
    return name, int(cfg.hidden_size), int(cfg.vocab_size)


# ------------------------------------------------------------------------------------- save / load
class Connector(nn.Module):
    """Base of the four connectors: holds ``cfg`` and saves itself as a folder."""

    cfg: ConnectorConfig
    #: The connector class of each config name, filled as each connector module defines its class
    #: (``class SSRConnector(Connector, name="ssr")``); the package imports all four.
    registry: ClassVar[dict[str, type[Connector]]] = {}
    #: One output vector per transcript token, read at the token boundaries (SSR); the baselines give a fixed
    #: number of vectors per second and are trained with the speech as a prefix of the transcript.
    uses_boundaries: bool = False

    def __init_subclass__(cls, name: str = "", **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if name:
            Connector.registry[name] = cls

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``folder/config.json`` (type + config + encoder/LLM identity) and ``model.safetensors``."""
        meta = {
            "connector": self.cfg.name,
            "config": dataclasses.asdict(self.cfg),
            "encoder": {"name": self.cfg.encoder_name, "layers": self.cfg.encoder_layers,
                        "frame_rate_hz": self.cfg.frame_rate_hz, "hidden_size": self.cfg.d_enc},
            "llm": {"name": self.cfg.llm_name, "hidden_size": self.cfg.d_llm,
                    "vocab_size": self.cfg.llm_vocab_size},
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"connector": self.cfg.name})


def check_llm(cfg: ConnectorConfig, llm: nn.Module, where: str) -> None:
    """Raise ModelError when ``llm`` is not the LLM the connector was built for."""
    name, hidden, vocab = llm_identity(llm)
    if hidden != cfg.d_llm:
        raise ModelError(f"{where}: connector outputs d_llm={cfg.d_llm} but LLM {name!r} has hidden size {hidden}")
    if cfg.llm_name and cfg.llm_name != name:
        raise ModelError(f"{where}: connector was trained for LLM {cfg.llm_name!r}, not {name!r}")
    if cfg.llm_vocab_size and cfg.llm_vocab_size != vocab:
        raise ModelError(f"{where}: connector was trained for LLM vocab size {cfg.llm_vocab_size}, "
                         f"LLM {name!r} has {vocab}")


def check_encoder(cfg: ConnectorConfig, encoder: Any, where: str) -> None:
    """Raise ModelError when ``encoder`` (a SpeechEncoder) does not produce what the connector expects."""
    if encoder.hidden_size != cfg.d_enc:
        raise ModelError(f"{where}: connector expects d_enc={cfg.d_enc}, encoder {encoder.name!r} "
                         f"has hidden size {encoder.hidden_size}")
    if len(encoder.layers) != cfg.n_enc_layers:
        raise ModelError(f"{where}: connector fuses {cfg.n_enc_layers} encoder layers, encoder "
                         f"{encoder.name!r} gives {len(encoder.layers)}")
    if abs(float(encoder.frame_rate_hz) - cfg.frame_rate_hz) > 1e-6:
        raise ModelError(f"{where}: connector expects {cfg.frame_rate_hz} Hz frames, encoder "
                         f"{encoder.name!r} gives {encoder.frame_rate_hz} Hz")
    # Compare folder names only: the same converted encoder may live in another cache folder.
    if cfg.encoder_name and Path(cfg.encoder_name).name != Path(str(encoder.name)).name:
        raise ModelError(f"{where}: connector was trained on encoder {cfg.encoder_name!r}, not {encoder.name!r}")
    if cfg.encoder_layers and list(cfg.encoder_layers) != list(encoder.layers):
        raise ModelError(f"{where}: connector was trained on encoder layers {cfg.encoder_layers}, "
                         f"encoder gives {list(encoder.layers)}")


def load_connector(folder: str | Path, llm: nn.Module | None = None, encoder: Any = None) -> Connector:
    """Load a connector saved by ``save_pretrained``; optionally check it against an LLM/encoder.

    Raises ModelError (missing folder, wrong LLM/encoder) or CheckpointError (unreadable files).
    """
    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: connector config not found")
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = connector_config_from_dict({**meta["config"], "name": meta["connector"]})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a connector config ({e})") from None
    if llm is not None:
        check_llm(cfg, llm, str(folder))
    if encoder is not None:
        check_encoder(cfg, encoder, str(folder))
    connector = build_connector(cfg)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: connector weights not found")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({e})") from None
    try:
        connector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_path}: weights do not match the {cfg.name} config: {e}") from None
    return connector
