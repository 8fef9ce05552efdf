"""Multimodal attention merging (MAM, Sundar et al. 2023): blend a speech encoder's self-attention with another model's.

For every self-attention layer ``l`` of the *target* (a speech encoder) and the *source* layer ``m(l)`` it is
paired with (:func:`layer_map`), each chosen projection (q, k, v and optionally the output o) becomes::

    W = (1 - a_l) * W_target + a_l * W_source        (weights and biases alike)

The default pair is Whisper's own: the encoder takes from the decoder's self-attention (same width, same
depth). Any two Hugging Face models of equal width work: attention modules are found by walking the
modules named ``self_attn`` / ``attention`` / ``self_attention`` / ``attn`` / ``self`` whose children
include q/k/v projections (``q_proj``/``k_proj``/``v_proj``/``out_proj``|``o_proj`` as in Whisper, wav2vec2,
HuBERT, WavLM and Llama; ``linear_q``/.../``linear_out`` as in w2v-BERT; ``query``/``key``/``value`` as
in BERT). Cross-attention (``encoder_attn``) is never taken.

Biases: a missing bias counts as zero (Whisper's ``k_proj`` has none, on both sides). A target
projection with a bias and a source without one gets ``(1 - a) * b_target``; a target projection
*without* a bias cannot take a source's non-zero bias (the architecture has nowhere to store it):
that is a :class:`~speechlm.errors.ModelError`.

The arithmetic is exact and reproducible: a factor of 0 leaves a layer untouched (bit for bit), a factor
of 1 copies the source, anything in between is computed in float64 and rounded once to the weight's dtype.

**Learnable MAM** (:class:`LearnableMerge`): both weight sets frozen, one trainable factor per layer
(``a_l = sigmoid(logit_l)``), the target's projections re-parametrised (``torch.nn.utils.parametrize``)
so that any forward pass through the target, alone or inside a larger model, uses the blended
weights and gradients reach only the factors. :meth:`LearnableMerge.bake` writes the final weights
into the plain target. :func:`train_merge_factors` trains the factors on any loss; for Whisper,
speechlm.training.whisper_merge.learn_whisper_merge uses Whisper's own teacher-forced ASR loss on manifest
rows (it reads their audio, so it lives above the data layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from speechlm.errors import ConfigError, ModelError
from speechlm.models import attention
from speechlm.models.attention import PROJECTION_NAMES, AttentionLayer
from speechlm.models.encoder import SpeechEncoder

RULES = ("same", "spread")
#: Learnable factors start inside (EPS, 1 - EPS): a sigmoid never reaches 0 or 1.
EPS = 1e-4


# ---------------------------------------------------------------------------------------------- finding layers
def _unwrap(model: nn.Module) -> nn.Module:
    """A SpeechEncoder -> the HF model inside it; anything else as is."""
    return model.model if isinstance(model, SpeechEncoder) else model


def find_attention_layers(model: nn.Module, part: str = "auto", prefer: str = "encoder") -> list[AttentionLayer]:
    """:func:`speechlm.models.attention.find_attention_layers` of ``model``, or of the HF model inside a
    :class:`SpeechEncoder`."""
    return attention.find_attention_layers(_unwrap(model), part, prefer)


def layer_map(n_target: int, n_source: int, rule: str = "same") -> list[int]:
    """Which source layer each target layer takes from.

    "same": layer i <- layer i (needs ``n_source >= n_target``). "spread": the source's layers spread
    evenly over the target's depth, i <- round(i * (n_source - 1) / (n_target - 1)), rounded half up
    (first to first, last to last).
    """
    if n_target < 1 or n_source < 1:
        raise ModelError(f"layer_map: both models need layers (target {n_target}, source {n_source})")
    if rule == "same":
        if n_source < n_target:
            raise ModelError(f"layer_map: rule 'same' needs at least as many source layers as target layers "
                             f"(source {n_source} < target {n_target}); use rule 'spread'")
        return list(range(n_target))
    if rule == "spread":
        if n_target == 1:
            return [0]
        return [math.floor(i * (n_source - 1) / (n_target - 1) + 0.5) for i in range(n_target)]
    raise ConfigError(f"layer_map: rule must be one of {RULES}, not {rule!r}")


def _check_projections(projections: Sequence[str]) -> tuple[str, ...]:
    projections = tuple(projections)
    bad = [p for p in projections if p not in PROJECTION_NAMES]
    if bad or not projections or len(set(projections)) != len(projections):
        raise ConfigError(f"projections must be distinct names among {tuple(PROJECTION_NAMES)}, not {projections}")
    return projections


def factor_list(factors: float | Sequence[float], n: int) -> list[float]:
    if isinstance(factors, (int, float)):
        out = [float(factors)] * n
    else:
        out = [float(f) for f in factors]
        if len(out) != n:
            raise ConfigError(f"{len(out)} merge factors for {n} target attention layers (give one, or one per layer)")
    for f in out:
        if not (math.isfinite(f) and 0.0 <= f <= 1.0):
            raise ConfigError(f"merge factors must lie in [0, 1], not {f}")
    return out


@dataclass
class _Pair:
    """A target layer, its source layer, and the source's tensors per projection (snapshots)."""

    target: AttentionLayer
    source: AttentionLayer
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor | None]


def _pairs(target: nn.Module, source: nn.Module, projections: Sequence[str], rule: str, target_part: str,
           source_part: str) -> tuple[list[_Pair], list[int]]:
    t_layers = find_attention_layers(target, target_part, prefer="encoder")
    s_layers = find_attention_layers(source, source_part, prefer="decoder")
    mapping = layer_map(len(t_layers), len(s_layers), rule)
    pairs = []
    for t, j in zip(t_layers, mapping):
        s = s_layers[j]
        weights, biases = {}, {}
        for p in projections:
            tm, sm = t.projection(p), s.projection(p)
            if tm.weight.shape != sm.weight.shape:
                raise ModelError(f"width mismatch: {t.name}.{t.projections[p][0]} has weight "
                                 f"{tuple(tm.weight.shape)}, source {s.name}.{s.projections[p][0]} has "
                                 f"{tuple(sm.weight.shape)}; attention merging needs models of equal width")
            t_bias, s_bias = getattr(tm, "bias", None), getattr(sm, "bias", None)
            if t_bias is None and s_bias is not None and bool(torch.any(s_bias != 0)):
                raise ModelError(f"{t.name}.{t.projections[p][0]} has no bias, but the source's "
                                 f"{s.name}.{s.projections[p][0]} has a non-zero one: it cannot be merged "
                                 f"(leave {p!r} out of the projections)")
            # snapshots: the source may share modules with the target (merging a model into itself)
            weights[p] = sm.weight.detach().clone()
            biases[p] = None if s_bias is None else s_bias.detach().clone()
        pairs.append(_Pair(t, s, weights, biases))
    return pairs, mapping


# ---------------------------------------------------------------------------------------------- fixed merge
def interpolate(w_target: torch.Tensor, w_source: torch.Tensor | None, factor: float) -> torch.Tensor:
    """``(1 - a) * w_target + a * w_source`` in float64, rounded once to the target's dtype.

    A source of None counts as zeros; a = 0 returns ``w_target`` itself, a = 1 the source (cast).
    """
    if factor == 0.0:
        return w_target
    src = torch.zeros_like(w_target) if w_source is None else w_source.to(w_target.device)
    if factor == 1.0:
        return src.to(w_target.dtype).clone()
    mixed = (1.0 - factor) * w_target.double() + factor * src.double()
    return mixed.to(w_target.dtype)


@torch.no_grad()
def _write(pairs: list[_Pair], factors: list[float], projections: Sequence[str]) -> None:
    for pair, a in zip(pairs, factors):
        if a == 0.0:
            continue
        for p in projections:
            lin = pair.target.projection(p)
            lin.weight.copy_(interpolate(lin.weight, pair.weights[p], a))
            if getattr(lin, "bias", None) is not None:
                lin.bias.copy_(interpolate(lin.bias, pair.biases[p], a))


def _report(pairs: list[_Pair], mapping: list[int], factors: list[float], projections: Sequence[str],
            rule: str) -> dict:
    return {"factors": factors, "projections": list(projections), "rule": rule, "layer_map": mapping,
            "target_modules": [p.target.name for p in pairs], "source_modules": [p.source.name for p in pairs]}


def merge_attention(target: nn.Module, source: nn.Module, factors: float | Sequence[float],
                    projections: Sequence[str] = ("q", "k", "v"), rule: str = "same",
                    target_part: str = "auto", source_part: str = "auto") -> dict:
    """Merge ``source``'s self-attention into ``target``'s, in place; returns what was done (for merge.json).

    ``target``: a speech encoder (an HF model, its encoder, or a :class:`SpeechEncoder`); ``source``:
    any model of the same width (may be the same object: Whisper's decoder into its encoder).
    ``factors``: one float for every layer, or one per target layer, each in [0, 1].
    ``target_part`` / ``source_part``: see :func:`find_attention_layers` ("auto" = the encoder of an
    encoder-decoder target, the decoder of an encoder-decoder source).
    """
    projections = _check_projections(projections)
    pairs, mapping = _pairs(target, source, projections, rule, target_part, source_part)
    values = factor_list(factors, len(pairs))
    _write(pairs, values, projections)
    if hasattr(target, "_fingerprint"):  # a SpeechEncoder: its weights changed
        target._fingerprint = None
    return _report(pairs, mapping, values, projections, rule)


# ---------------------------------------------------------------------------------------------- learnable merge
class _Blend(nn.Module):
    """Parametrisation of one target tensor: lerp(original, source, a) with ``a`` read from the owner."""

    def __init__(self, source: torch.Tensor | None, like: torch.Tensor, factor: Callable[[], torch.Tensor]):
        super().__init__()
        src = torch.zeros_like(like) if source is None else source.to(like.device, like.dtype)
        self.register_buffer("source", src.detach().clone(), persistent=False)
        self._factor = factor  # a function, not a module: the factors stay outside the target

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        a = self._factor().to(original.device, original.dtype)
        return torch.lerp(original, self.source, a)


class LearnableMerge(nn.Module):
    """Learnable MAM: one trainable factor per target attention layer, everything else frozen.

    Built on ``target`` and ``source`` as :func:`merge_attention`; ``init`` gives the starting factors
    (kept inside [EPS, 1 - EPS], as ``a = sigmoid(logit)`` never reaches 0 or 1). Every parameter of
    ``target`` is set to ``requires_grad=False``; the source's tensors are copied into the
    parametrisations (the source model itself is not touched and may be freed). While the merge is
    live, any forward pass through ``target`` (directly, through :meth:`forward`, or inside a larger
    model holding it) uses the blended weights. The only parameter of this module is ``logits``.
    :meth:`bake` ends it: final weights written into the plain target.
    """

    def __init__(self, target: nn.Module, source: nn.Module, init: float | Sequence[float] = 0.1,
                 projections: Sequence[str] = ("q", "k", "v"), rule: str = "same", target_part: str = "auto",
                 source_part: str = "auto"):
        super().__init__()
        self.projections = _check_projections(projections)
        self.rule = rule
        pairs, self.mapping = _pairs(target, source, self.projections, rule, target_part, source_part)
        start = [min(max(f, EPS), 1.0 - EPS) for f in factor_list(init, len(pairs))]
        self.logits = nn.Parameter(torch.logit(torch.tensor(start, dtype=torch.float64)).float())
        self._target = [_unwrap(target)]  # a list: not registered, so parameters() is the logits alone
        self._outer = [target]  # what was given (a SpeechEncoder's fingerprint is reset on bake)
        self._pairs = pairs
        self._baked = False
        _unwrap(target).requires_grad_(False)
        for i, pair in enumerate(pairs):
            def factor(i: int = i) -> torch.Tensor:
                return torch.sigmoid(self.logits[i])

            for p in self.projections:
                lin = pair.target.projection(p)
                parametrize.register_parametrization(lin, "weight", _Blend(pair.weights[p], lin.weight, factor))
                if getattr(lin, "bias", None) is not None:
                    parametrize.register_parametrization(lin, "bias", _Blend(pair.biases[p], lin.bias, factor))
                for t in lin.parametrizations.parameters():  # the originals, moved under parametrizations
                    t.requires_grad_(False)

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def factors(self) -> torch.Tensor:
        """(L,) the current factors, differentiable."""
        return torch.sigmoid(self.logits)

    def factor_values(self) -> list[float]:
        return [float(a) for a in self.factors().detach().double()]

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)

    def report(self) -> dict:
        return _report(self._pairs, self.mapping, self.factor_values(), self.projections, self.rule)

    @torch.no_grad()
    def bake(self) -> nn.Module:
        """Write ``(1 - a) W_target + a W_source`` (the learned ``a``, exactly as :func:`interpolate`) into
        the target, remove the parametrisations and return the plain target. The merge is spent afterwards."""
        if self._baked:
            raise ModelError("LearnableMerge.bake: already baked")
        values = self.factor_values()
        for pair in self._pairs:
            for p in self.projections:
                lin = pair.target.projection(p)
                for name in ("weight", "bias"):
                    if parametrize.is_parametrized(lin, name):
                        parametrize.remove_parametrizations(lin, name, leave_parametrized=False)
        _write(self._pairs, values, self.projections)
        if hasattr(self._outer[0], "_fingerprint"):
            self._outer[0]._fingerprint = None
        self._baked = True
        return self.target


def train_merge_factors(merge: LearnableMerge, batches: Iterable, loss_fn: Callable[[object], torch.Tensor],
                        steps: int, lr: float = 0.05, log: Callable[[str], None] | None = None,
                        log_every: int = 10) -> dict:
    """Train only ``merge``'s factors: ``steps`` Adam steps, one batch of ``batches`` each (cycled).

    ``loss_fn(batch)`` runs the model that holds the merged target and returns a scalar loss. Returns
    ``{"losses": [...], "factors": [...]}`` (the factors after the last step; the merge is not baked).
    """
    if steps < 1:
        raise ConfigError(f"train_merge_factors: steps must be >= 1, not {steps}")
    opt = torch.optim.Adam([merge.logits], lr=lr)
    losses: list[float] = []
    it: Iterator = iter(batches)
    for step in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            try:
                batch = next(it)
            except StopIteration:
                raise ConfigError("train_merge_factors: no batches") from None
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(f"train_merge_factors: non-finite loss {value} at step {step}")
        loss.backward()
        opt.step()
        losses.append(value)
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"merge step {step + 1}/{steps}: loss {losses[-1]:.4f}, factors "
                + " ".join(f"{a:.3f}" for a in merge.factor_values()))
    return {"losses": losses, "factors": merge.factor_values()}


# ---------------------------------------------------------------------------------------------- Whisper ASR objective
def whisper_label_ids(tokenizer, text: str, language: str = "en", task: str = "transcribe") -> tuple[list[int], int]:
    """Whisper's decoder sequence for ``text``: <|startoftranscript|><|lang|><|task|><|notimestamps|> text
    <|endoftext|>, and the prefix length (4). The text gets Whisper's usual leading space."""
    prefix = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>",
                                              "<|notimestamps|>"])
    if any(i is None or i == tokenizer.unk_token_id for i in prefix):
        raise ModelError(f"tokenizer lacks Whisper's special tokens for language {language!r} / task {task!r}")
    body = tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
    return [*prefix, *body, tokenizer.eos_token_id], len(prefix)


def whisper_collate(features: torch.Tensor, sequences: Sequence[Sequence[int]], prefix_len: int,
                    pad_id: int) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: decoder inputs = sequence[:-1], labels = sequence[1:] with the forced prefix
    (language, task, no-timestamps) and the padding set to -100 (not scored)."""
    n = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), n), -100, dtype=torch.long)
    for b, s in enumerate(sequences):
        s = torch.as_tensor(list(s), dtype=torch.long)
        inputs[b, : len(s) - 1] = s[:-1]
        labels[b, : len(s) - 1] = s[1:]
        labels[b, : prefix_len - 1] = -100
    return {"input_features": features, "decoder_input_ids": inputs, "labels": labels}


def whisper_asr_loss(model: nn.Module) -> Callable[[dict], torch.Tensor]:
    """Teacher-forced cross-entropy of a ``WhisperForConditionalGeneration`` on a :func:`whisper_collate` batch."""
    def loss(batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        logits = model(input_features=batch["input_features"].to(device, next(model.parameters()).dtype),
                       decoder_input_ids=batch["decoder_input_ids"].to(device)).logits
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten(),
                                           ignore_index=-100)

    return loss
