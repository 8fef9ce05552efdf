"""The configs of the encoder adaptations (speechlm.models.encoder_adapt): one dataclass per method, picked by
``method``, so a key the chosen method does not have is refused when the config loads (speechlm.config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from speechlm.config import from_dict
from speechlm.errors import ConfigError

METHODS = ("none", "adapter", "lora", "prompt")
PLACEMENTS = ("sequential", "parallel")
WHERES = ("attn", "ffn", "both")
PROJECTIONS = ("q", "k", "v", "o")
ACTIVATION_NAMES = ("gelu", "relu")


def _bad(where: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{where}.{key}: {why}")


@dataclass
class EncoderAdaptConfig:
    """How the encoder is adapted (``model.encoder_adapt`` of the stage configs, ``encoder_adapt`` of the aligner).

    This class is method ``none`` (the frozen encoder); :class:`AdapterConfig`, :class:`EncoderLoRAConfig` and
    :class:`PromptTuningConfig` hold the other methods' fields. ``method`` selects the class (``config_tag``).
    """

    config_tag = "method"  # not a field (no annotation): which field selects the concrete config class

    method: str = "none"  # none | adapter | lora | prompt
    train: bool = True  # false: a loaded adaptation (init_encoder_adapt) is used but kept frozen

    def __post_init__(self) -> None:
        own = ADAPT_CONFIGS.get(self.method)
        if own is not None and own is not type(self):
            raise ConfigError(f"encoder_adapt.method={self.method}: build it as {own.__name__}, "
                              f"not {type(self).__name__}")

    @classmethod
    def config_variants(cls) -> dict[str, type[EncoderAdaptConfig]]:
        """The config class of each method (what ``method`` selects)."""
        return ADAPT_CONFIGS

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def check(self, where: str = "encoder_adapt") -> EncoderAdaptConfig:
        """Raise :class:`ConfigError` naming the ``where.key`` that is out of range; returns self."""
        if self.method not in METHODS:
            raise _bad(where, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        return self

    def essentials(self) -> dict[str, Any]:
        """The fields that define the adaptation's tensors and computation (what two folders must share)."""
        return {"method": self.method}


@dataclass
class AdapterConfig(EncoderAdaptConfig):
    """A bottleneck adapter per transformer layer (see speechlm.models.encoder_adapt)."""

    method: str = "adapter"
    # sequential (adapt the sublayer's output) | parallel (beside the sublayer, from its input)
    placement: str = "sequential"
    where: str = "both"  # after the self-attention (attn), the feed-forward (ffn), or both
    bottleneck: int = 64  # the down projection's width
    scale: float = 1.0  # multiplies the adapter's output
    activation: str = "gelu"  # gelu | relu between down and up

    def check(self, where: str = "encoder_adapt") -> AdapterConfig:
        super().check(where)
        if self.placement not in PLACEMENTS:
            raise _bad(where, "placement", f"{self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.where not in WHERES:
            raise _bad(where, "where", f"{self.where!r} is not one of {', '.join(WHERES)}")
        if self.activation not in ACTIVATION_NAMES:
            raise _bad(where, "activation", f"{self.activation!r} is not one of {', '.join(ACTIVATION_NAMES)}")
        if self.bottleneck < 1:
            raise _bad(where, "bottleneck", f"must be >= 1, not {self.bottleneck}")
        return self

    def essentials(self) -> dict[str, Any]:
        return {"method": self.method, "placement": self.placement, "where": self.where,
                "bottleneck": self.bottleneck, "scale": self.scale, "activation": self.activation}


@dataclass
class EncoderLoRAConfig(EncoderAdaptConfig):
    """LoRA on the chosen self-attention projections of every transformer layer."""

    method: str = "lora"
    r: int = 8  # rank
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA branch's input (training only)
    projections: list[str] = field(default_factory=lambda: ["q", "v"])  # which of q, k, v, o

    def __post_init__(self) -> None:
        super().__post_init__()
        # an override gives "q,v" (a YAML string), a YAML list gives ["q", "v"]
        items = self.projections.split(",") if isinstance(self.projections, str) else self.projections
        self.projections = [str(p).strip() for p in items]

    def check(self, where: str = "encoder_adapt") -> EncoderLoRAConfig:
        super().check(where)
        if self.r < 1:
            raise _bad(where, "r", f"must be >= 1, not {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise _bad(where, "dropout", f"must be in [0, 1), not {self.dropout}")
        unknown = [p for p in self.projections if p not in PROJECTIONS]
        if unknown or not self.projections:
            raise _bad(where, "projections", f"{list(self.projections)}: choose one or more of {', '.join(PROJECTIONS)}")
        return self

    def essentials(self) -> dict[str, Any]:
        return {"method": self.method, "r": self.r, "alpha": self.alpha, "projections": sorted(self.projections)}


@dataclass
class PromptTuningConfig(EncoderAdaptConfig):
    """Learned vectors put before the hidden sequence at the first transformer layer."""

    method: str = "prompt"
    n_prompts: int = 16  # learned vectors before the sequence
    prompt_init_std: float = 0.02  # the vectors start as N(0, std^2)

    def check(self, where: str = "encoder_adapt") -> PromptTuningConfig:
        super().check(where)
        if self.n_prompts < 1:
            raise _bad(where, "n_prompts", f"must be >= 1, not {self.n_prompts}")
        return self

    def essentials(self) -> dict[str, Any]:
        return {"method": self.method, "n_prompts": self.n_prompts}


ADAPT_CONFIGS: dict[str, type[EncoderAdaptConfig]] = {
    "none": EncoderAdaptConfig,
    "adapter": AdapterConfig,
    "lora": EncoderLoRAConfig,
    "prompt": PromptTuningConfig,
}
#: Every field of every method (an exported folder's config.json of an earlier version holds them all).
_ALL_FIELDS = frozenset(f.name for c in ADAPT_CONFIGS.values() for f in dataclasses.fields(c))


def adapt_config_from_dict(data: dict[str, Any] | EncoderAdaptConfig | None, where: str = "encoder_adapt",
                           strict: bool = True) -> EncoderAdaptConfig:
    """The config of the method ``data["method"]`` names (default none), checked; a key that method lacks is a
    :class:`ConfigError` naming it. ``strict=False`` (reading an exported folder) drops the keys of the other
    methods: folders written before the per-method configs hold every method's fields."""
    if isinstance(data, EncoderAdaptConfig):
        return data.check(where)
    data = dict(data or {})
    method = data.get("method", "none")
    cls = ADAPT_CONFIGS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise _bad(where, "method", f"{method!r} is not one of {', '.join(METHODS)}")
    names = {f.name for f in dataclasses.fields(cls)}
    if not strict:
        data = {k: v for k, v in data.items() if k in names or k not in _ALL_FIELDS}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for method {method}; known: {', '.join(sorted(names))}")
    return from_dict(cls, data, prefix=where + ".").check(where)


def adapt_config_field(value: dict[str, Any] | EncoderAdaptConfig | None, where: str) -> EncoderAdaptConfig:
    """A config's ``encoder_adapt`` field as its typed, checked config (what the stage configs' and the aligner
    config's ``__post_init__`` store): None (``encoder_adapt: null`` in a YAML file) is the frozen encoder, a
    mapping (from code) is filled as the class its ``method`` names, so a key that method lacks is refused here."""
    if value is None:
        value = EncoderAdaptConfig()
    if isinstance(value, dict):
        value = from_dict(EncoderAdaptConfig, value, where + ".")
    if not isinstance(value, EncoderAdaptConfig):
        raise ConfigError(f"{where}: expected a mapping with a method, got {value!r}")
    return value.check(where)
