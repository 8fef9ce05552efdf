"""Parameter-efficient adaptation of the frozen speech encoder (Cappellazzo et al., 2023): bottleneck adapters,
LoRA on the self-attention projections, or prompt tuning; the encoder's own weights stay frozen and in eval mode.

Methods (one config class each, in speechlm.models.encoder_adapt_config; config key ``model.encoder_adapt``):

* ``adapter``: a bottleneck ``up(act(down(x))) * scale`` per transformer layer, after the self-attention
  and/or the feed-forward sublayer (``where``). ``placement=sequential`` adapts the sublayer's output
  (``z -> z + A(z)``, Houlsby-style); ``parallel`` adds ``A(x)`` of the sublayer's input to its output (He et
  al.). ``up`` starts at zero, so the adapted encoder starts exactly as the frozen one.
* ``lora``: ``W x + (alpha / r) * B A x`` on the chosen attention projections (q, k, v, o; found by
  :func:`speechlm.models.attention.find_attention_layers`); ``B`` starts at zero: identity at init too.
* ``prompt``: ``n_prompts`` learned vectors put before the hidden sequence at the input of the first
  transformer layer (every layer's attention mask is widened for them) and cut from every layer's output, so
  the frame count is exactly the frozen encoder's. Prompts change every frame from the start: prompt tuning is
  NOT the identity at init.

Everything is installed with forward hooks on the Hugging Face modules (nothing in the encoder is replaced or
renamed), so the frozen weights' names, values and fingerprint are unchanged; the new parameters live in one
:class:`EncoderAdaptation` module. Supported: Whisper and the waveform encoders (wav2vec2, HuBERT, WavLM, ...);
w2v-BERT 2.0 with adapters and LoRA (not prompts). A site whose hook never runs (WavLM's attention calls torch's
fused attention with the projection weights, so LoRA cannot reach them) is an error at install time, never a
silent no-op.

Saved as a folder: ``config.json`` (format, the method's config, the encoder it belongs to) and
``model.safetensors`` (the adaptation's tensors only). Loading reads safetensors only (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechlm.errors import ConfigError, ModelError
from speechlm.models.attention import find_attention_layers
from speechlm.models.encoder_adapt_config import (  # noqa: F401 -- re-exported: the configs' historic home
    AdapterConfig,
    EncoderAdaptConfig,
    EncoderLoRAConfig,
    PromptTuningConfig,
    adapt_config_from_dict,
)

FORMAT = "speechlm-encoder-adapt-1"
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": nn.functional.gelu,
                                                                   "relu": nn.functional.relu}
#: Names of a transformer layer's feed-forward sublayer modules (wav2vec2/HuBERT/WavLM, w2v-BERT's two halves).
FFN_NAMES = ("feed_forward", "ffn", "mlp", "ffn1", "ffn2")


# ---------------------------------------------------------------------------------------------- modules
class BottleneckAdapter(nn.Module):
    """``scale * up(act(down(x)))``: the delta a bottleneck adapter adds; ``up`` starts at zero (delta 0)."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 1.0, activation: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


class LoRADelta(nn.Module):
    """``(alpha / r) * B(A(dropout(x)))``: the update LoRA adds to a linear layer's output; ``B`` starts at zero."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.scaling = float(alpha) / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scaling


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers: ``model.layers`` (Whisper's encoder) or ``model.encoder.layers``
    (wav2vec2, HuBERT, WavLM, w2v-BERT)."""
    for owner in (model, getattr(model, "encoder", None)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ModelError(f"{type(model).__name__}: no transformer layer stack found (looked for .layers and "
                     ".encoder.layers)")


def _ffn_sites(layer: nn.Module, i: int) -> list[tuple[str, nn.Module, nn.Module]]:
    """(key, entry, exit) of a layer's feed-forward sublayers: the sublayer's input is ``entry``'s input, its
    output ``exit``'s output (one module, or Whisper's fc1 .. fc2)."""
    children = dict(layer.named_children())
    named = [n for n in FFN_NAMES if n in children]
    if named:
        return [("ffn" if len(named) == 1 else n, children[n], children[n]) for n in named]
    if "fc1" in children and "fc2" in children:
        return [("ffn", children["fc1"], children["fc2"])]
    raise ModelError(f"encoder layer {i} ({type(layer).__name__}): no feed-forward sublayer found (looked for "
                     f"{'/'.join(FFN_NAMES)} or fc1+fc2; children: {', '.join(children)})")


def _attention_module(layer: nn.Module, i: int) -> Any:
    found = find_attention_layers(layer, part="all")
    direct = [a for a in found if "." not in a.name] or found
    if not direct:
        raise ModelError(f"encoder layer {i} ({type(layer).__name__}): no self-attention found")
    return direct[0]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _widen_mask(mask: Any, total: int) -> Any:
    """An attention mask over T keys -> over ``total`` = P + T keys, the P prompts first and always visible.

    2-D (B, T) masks (1/True = attend) get ones in front; 4-D (B, 1, T, T) additive or boolean masks, which
    depend on the key only, get their key row widened and repeated for every query (prompts included)."""
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] == total:
        return mask
    p = total - mask.shape[-1]
    if mask.dim() == 2:
        front = torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device)
        return torch.cat([front, mask], dim=1)
    if mask.dim() == 4:
        keys = mask[:, :, -1:, :]  # the last query's row: every row is the same key mask
        visible = True if mask.dtype == torch.bool else 0
        front = torch.full((*keys.shape[:3], p), visible, dtype=mask.dtype, device=mask.device)
        return torch.cat([front, keys], dim=-1).expand(-1, -1, total, -1)
    raise ModelError(f"prompt tuning: cannot widen an attention mask of shape {tuple(mask.shape)}")


class EncoderAdaptation(nn.Module):
    """The adaptation's parameters, and the hooks that apply them to one encoder (see the module docstring).

    ``adapters[i][key]`` (key: attn, ffn, or ffn1/ffn2), ``lora[i][proj]`` and ``prompts`` (P, D) hold every
    trainable tensor; :meth:`install` registers the hooks on the encoder's modules, :meth:`remove` takes them
    off. ``fired`` collects the sites whose hooks ran (checked after a probe pass by the SpeechEncoder).
    """

    def __init__(self, cfg: EncoderAdaptConfig, model: nn.Module, hidden_size: int, model_type: str = ""):
        super().__init__()
        self.cfg = cfg.check()
        self.hidden_size = int(hidden_size)
        self.model_type = model_type
        # a plain attribute, not a submodule: the encoder's own layers must not join this module's parameters
        object.__setattr__(self, "_layer_stack", transformer_layers(model))
        self.adapters = nn.ModuleList()
        self.lora = nn.ModuleList()
        self.prompts: nn.Parameter | None = None
        self._handles: list[Any] = []
        self._sites: list[str] = []
        self.fired: set[str] = set()
        self._stash: dict[str, torch.Tensor] = {}
        if cfg.method == "adapter":
            self._build_adapters()
        elif cfg.method == "lora":
            self._build_lora()
        elif cfg.method == "prompt":
            if model_type == "wav2vec2-bert":
                raise ModelError("encoder_adapt.method=prompt: not supported for w2v-BERT (its conformer layers "
                                 "carry per-frame convolution masks); use adapter or lora")
            self.prompts = nn.Parameter(torch.randn(cfg.n_prompts, self.hidden_size) * cfg.prompt_init_std)
        elif cfg.method != "none":
            raise ConfigError(f"encoder_adapt.method: {cfg.method!r}")

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers this adaptation hooks into (not part of its parameters)."""
        return self._layer_stack

    # ------------------------------------------------------------------------------------------- building
    def _build_adapters(self) -> None:
        c = self.cfg
        for i, layer in enumerate(self.layers):
            mods = nn.ModuleDict()
            if c.where in ("attn", "both"):
                mods["attn"] = BottleneckAdapter(self.hidden_size, c.bottleneck, c.scale, c.activation)
            if c.where in ("ffn", "both"):
                for key, _, _ in _ffn_sites(layer, i):
                    mods[key] = BottleneckAdapter(self.hidden_size, c.bottleneck, c.scale, c.activation)
            self.adapters.append(mods)

    def _build_lora(self) -> None:
        c = self.cfg
        for i, layer in enumerate(self.layers):
            att = _attention_module(layer, i)
            mods = nn.ModuleDict()
            for p in c.projections:
                lin = att.projection(p)
                mods[p] = LoRADelta(lin.in_features, lin.out_features, c.r, c.alpha, c.dropout)
            self.lora.append(mods)

    # ------------------------------------------------------------------------------------------ hooks
    @property
    def sites(self) -> list[str]:
        """Every hook site installed (e.g. ``layer0.attn``): each must run in a forward pass."""
        return list(self._sites)

    def install(self) -> None:
        """Register the hooks on the encoder's modules (once)."""
        if self._handles:
            return
        if self.cfg.method == "adapter":
            for i, layer in enumerate(self.layers):
                mods = self.adapters[i]
                if "attn" in mods:
                    att = _attention_module(layer, i).module
                    self._adapter_site(f"layer{i}.attn", att, att, mods["attn"])
                for key, entry, exit_ in _ffn_sites(layer, i) if any(k != "attn" for k in mods) else []:
                    self._adapter_site(f"layer{i}.{key}", entry, exit_, mods[key])
        elif self.cfg.method == "lora":
            for i, layer in enumerate(self.layers):
                att = _attention_module(layer, i)
                for p, delta in self.lora[i].items():
                    self._lora_site(f"layer{i}.{p}", att.projection(p), delta)
        elif self.cfg.method == "prompt":
            for i, layer in enumerate(self.layers):
                self._prompt_site(f"layer{i}.prompt", layer, first=i == 0)

    def remove(self) -> None:
        """Take the hooks off: the encoder computes exactly what it did before :meth:`install`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._sites.clear()

    def _adapter_site(self, name: str, entry: nn.Module, exit_: nn.Module, adapter: BottleneckAdapter) -> None:
        parallel = self.cfg.placement == "parallel"
        self._sites.append(name)
        if parallel and entry is not exit_:
            def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
                self._stash[name] = _hidden_arg(args, kwargs)

            self._handles.append(entry.register_forward_pre_hook(keep_input, with_kwargs=True))

        def add(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            self.fired.add(name)
            z = _first(output)
            if not parallel:
                return _replace_first(output, z + adapter(z))
            x = self._stash.pop(name) if entry is not exit_ else _hidden_arg(args, kwargs)
            return _replace_first(output, z + adapter(x))

        self._handles.append(exit_.register_forward_hook(add, with_kwargs=True))

    def _lora_site(self, name: str, linear: nn.Module, delta: LoRADelta) -> None:
        self._sites.append(name)

        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self.fired.add(name)
            return output + delta(args[0])

        self._handles.append(linear.register_forward_hook(add))

    def _prompt_site(self, name: str, layer: nn.Module, first: bool) -> None:
        self._sites.append(name)

        def widen(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self.fired.add(name)
            h = _hidden_arg(args, kwargs)
            if first:
                prompts = self.prompts.to(h.dtype)[None].expand(h.shape[0], -1, -1)
                h = torch.cat([prompts, h], dim=1)
            args, kwargs = list(args), dict(kwargs)
            if args:
                args[0] = h
            else:
                kwargs["hidden_states"] = h
            if len(args) > 1:
                args[1] = _widen_mask(args[1], h.shape[1])
            elif "attention_mask" in kwargs:
                kwargs["attention_mask"] = _widen_mask(kwargs["attention_mask"], h.shape[1])
            return tuple(args), kwargs

        self._handles.append(layer.register_forward_pre_hook(widen, with_kwargs=True))

    @property
    def n_prompts(self) -> int:
        """Positions the prompts add in front of every layer's output (0 unless method=prompt)."""
        return 0 if self.prompts is None else int(self.prompts.shape[0])

    def strip(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Hidden state ``index`` (0 = the layers' input) without the prompt positions: frames as the frozen encoder's."""
        return hidden[:, self.n_prompts:] if index > 0 and self.n_prompts else hidden


# ---------------------------------------------------------------------------------------------- counting
def expected_parameters(cfg: EncoderAdaptConfig, num_layers: int, hidden_size: int, ffn_sites: int = 1,
                        projection_dims: dict[str, tuple[int, int]] | None = None) -> int:
    """How many parameters ``cfg`` adds to an encoder of ``num_layers`` x ``hidden_size`` (``ffn_sites``:
    feed-forward sublayers per layer, 2 in w2v-BERT; ``projection_dims``: (in, out) per projection, default
    square). The tests check the built modules against it; the benchmark reports it."""
    d = hidden_size
    if cfg.method == "adapter":
        per = 2 * d * cfg.bottleneck + cfg.bottleneck + d  # down (weight + bias) + up (weight + bias)
        sites = (1 if cfg.where in ("attn", "both") else 0) + (ffn_sites if cfg.where in ("ffn", "both") else 0)
        return num_layers * sites * per
    if cfg.method == "lora":
        dims = projection_dims or {}
        return num_layers * sum(cfg.r * sum(dims.get(p, (d, d))) for p in cfg.projections)
    if cfg.method == "prompt":
        return cfg.n_prompts * d
    return 0


# ---------------------------------------------------------------------------------------------- folders
def encoder_identity(encoder: Any) -> dict[str, Any]:
    """What an adaptation folder records of the encoder it was trained on (checked when it is loaded)."""
    return {"name": Path(str(encoder.name)).name, "model_type": encoder.model_type,
            "hidden_size": int(encoder.hidden_size), "num_hidden_layers": int(encoder.num_hidden_layers),
            "weights_sha256": encoder.weights_fingerprint(), "dtype": str(encoder.dtype).removeprefix("torch.")}


def save_adaptation(encoder: Any, folder: str | Path) -> Path:
    """Write ``encoder``'s adaptation to ``folder`` atomically: config.json + model.safetensors (fp32)."""
    from safetensors.torch import save_file

    from speechlm.atomic import atomic_path

    adaptation = getattr(encoder, "adaptation", None)
    if adaptation is None:
        raise ModelError(f"{folder}: the encoder has no adaptation to save")
    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in adaptation.state_dict().items()}
    meta = {"format": FORMAT, "config": dataclasses.asdict(adaptation.cfg), "encoder": encoder_identity(encoder),
            "layers": list(encoder.layers), "trainable_parameters": sum(t.numel() for t in state.values())}
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    return folder


def read_adaptation_config(folder: str | Path) -> tuple[EncoderAdaptConfig, dict[str, Any]]:
    """(the adaptation's config, the whole config.json) of an exported folder; ModelError naming it otherwise."""
    folder = Path(folder).expanduser()
    path = folder / "config.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder}: not an encoder adaptation folder (config.json and model.safetensors needed; "
                         "stage 1 exports one as <out_dir>/encoder_adapt)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path}: not a {FORMAT} folder (format {meta.get('format')!r})")
    try:
        cfg = adapt_config_from_dict(meta.get("config"), where=f"{path} config", strict=False)
    except ConfigError as e:
        raise ModelError(str(e)) from None
    return cfg, meta


def resolve_adaptation(adapt: dict[str, Any] | EncoderAdaptConfig | None, init_folder: str | Path,
                       prefix: str = "") -> EncoderAdaptConfig:
    """The adaptation a run uses: ``adapt`` (its config's ``<prefix>encoder_adapt``), or, with ``init_folder``
    (``<prefix>init_encoder_adapt``), the one that exported folder holds, keeping ``adapt``'s ``train``;
    :class:`ConfigError` when ``adapt`` sets another adaptation than the folder's."""
    cfg = adapt_config_from_dict(adapt, prefix + "encoder_adapt")
    if init_folder:
        saved, _ = read_adaptation_config(init_folder)
        if cfg.enabled and cfg.essentials() != saved.essentials():
            raise ConfigError(f"{prefix}init_encoder_adapt={init_folder}: its adaptation {saved.essentials()} "
                              f"differs from {prefix}encoder_adapt {cfg.essentials()}; drop {prefix}encoder_adapt "
                              "(the folder's config is used) or use a matching folder")
        cfg = dataclasses.replace(saved, train=cfg.train)
    return cfg


def check_folder_matches(folder: str | Path, meta: dict[str, Any], encoder: Any) -> None:
    """Raise :class:`ModelError` naming ``folder`` unless it was trained on an encoder like ``encoder``."""
    saved = meta.get("encoder", {})
    mine = encoder_identity(encoder)
    problems = [f"{k}: folder has {saved.get(k)!r}, this encoder {mine[k]!r}"
                for k in ("model_type", "hidden_size", "num_hidden_layers") if saved.get(k) != mine[k]]
    if not problems and saved.get("dtype") == mine["dtype"] and saved.get("weights_sha256") != mine["weights_sha256"]:
        problems.append(f"weights differ (sha256 {str(saved.get('weights_sha256'))[:12]}... vs "
                        f"{mine['weights_sha256'][:12]}...; folder trained on {saved.get('name')!r}, this encoder is "
                        f"{mine['name']!r})")
    if problems:
        raise ModelError(f"{folder}: encoder adaptation does not belong to this encoder: " + "; ".join(problems))


def load_state(folder: str | Path, adaptation: EncoderAdaptation) -> None:
    """Copy ``folder``/model.safetensors into ``adaptation`` (names and shapes must match exactly)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    try:
        state = load_file(str(folder / "model.safetensors"), device="cpu")
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types on damaged files
        raise ModelError(f"{folder}/model.safetensors: unreadable ({e})") from None
    own = adaptation.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or shapes:
        raise ModelError(f"{folder}: adaptation tensors do not match this encoder and config (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}, other shapes {shapes[:3]})")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))
