"""Small builders the stage recipes share: config -> LLM, encoder facts, connector, batches, leakage check."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechlm.data.batching import (
    Batch,
    DistributedBucketSampler,
    ExampleReader,
    ShardedManifestStream,
    SpeechTextDataset,
    convert_boundaries,
    make_loader,
)
from speechlm.data.manifest import Utterance, read_manifest
from speechlm.errors import ConfigError, ModelError
from speechlm.models.connectors.base import (
    Connector,
    build_connector,
    llm_identity,
)
from speechlm.models.encoder_adapt import EncoderAdaptConfig, adapt_config_from_dict, resolve_adaptation
from speechlm.paths import SMOLLM2_135M, WHISPER_BASE, default_model
from speechlm.training.configs import DataConfig, ModelConfig
from speechlm.training.deepspeed_engine import Engine
from speechlm.training.distributed import DistInfo, all_sum

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- models
def _llm_folder(path: str) -> Path:
    folder = Path(path) if path else default_model(SMOLLM2_135M)
    if not folder.is_dir():
        raise ModelError(f"{folder}: LLM folder not found (run tools/prepare_models.py for the embedded models)")
    return folder


def eval_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The precision a frozen LLM scores in: "fp32", "bf16", "fp16", or "auto" (bf16 on a CUDA device
    that supports it, else fp32: on a CPU bf16 is fast only with AMX/AVX512-bf16 units, and it changes
    the scores)."""
    from speechlm.models.encoder import DTYPES

    if name == "auto":
        dev = torch.device(device)
        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_llm(path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(frozen causal LM in eval mode, its tokenizer) from a local folder ("" = embedded SmolLM2-135M).

    ``dtype``: the precision the LLM runs in (bf16 when training runs bf16, see engine.train_dtype);
    weights are read straight into it, shard by shard, so a rank never holds an fp32 copy of the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _llm_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    llm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, low_cpu_mem_usage=True)
    return llm.requires_grad_(False).eval(), tokenizer


class InputEmbeddingsOnly(nn.Module):
    """The LLM reduced to its config and input-embedding table (V, d): all stage 1 needs of it.

    Answers ``.config`` and ``get_input_embeddings()`` like the full model, so the connector
    builders (llm_identity, the mean-embedding init) take it in the model's place.
    """

    def __init__(self, config: Any, table: torch.Tensor):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


def _safetensors_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, or None when the folder has no safetensors weights."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _embedding_key_candidates(config: Any) -> list[str]:
    """Checkpoint names the input-embedding table may have, most likely first.

    The names come from the model class itself, built on the meta device (no memory): every name
    of the input table's parameter, which includes the output head's when the two are tied (a tied
    checkpoint may keep either). A checkpoint saved from the bare base model lacks the
    ``base_model_prefix.`` part of the names.
    """
    from transformers import AutoModelForCausalLM

    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = ["model.embed_tokens.weight"] + (["lm_head.weight"] if tied else [])  # the usual layout
    prefix = "model"
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        table = meta.get_input_embeddings().weight
        names = [n for n, p in meta.named_parameters(remove_duplicate=False) if p is table] or names
        prefix = str(getattr(meta, "base_model_prefix", "") or "")
    except (ValueError, KeyError, ImportError, RuntimeError, TypeError, AttributeError, NotImplementedError) as e:
        # e.g. an architecture this transformers does not know, or one that cannot be built on meta
        log.info("%s: no meta-device model (%s); trying the usual embedding names", config.model_type, e)
    out: list[str] = []
    for n in names:
        out += [n] + ([n[len(prefix) + 1:]] if prefix and n.startswith(prefix + ".") else [])
    return list(dict.fromkeys(out))


def load_llm_embeddings(path: str) -> tuple[InputEmbeddingsOnly, Any]:
    """(the LLM's config + input-embedding table only, its tokenizer), reading one tensor from safetensors.

    Stage 1 needs no more of the LLM: for Llama-3-8B this reads 1 GB instead of 32 GB per rank. The
    table is bit-identical to ``load_llm(path)[0].get_input_embeddings().weight``. A folder whose
    weights are not safetensors (.bin, GGUF) or whose table cannot be named falls back to the full load.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    folder = _llm_folder(path)
    config = AutoConfig.from_pretrained(str(folder))
    files = _safetensors_files(folder)
    if files is not None:
        for name in _embedding_key_candidates(config):
            if name in files:
                with safe_open(str(files[name]), framework="pt") as f:
                    table = f.get_tensor(name)  # (V, d) in the checkpoint's dtype
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
                log.info("%s: read only the input-embedding table %s %s from %s", folder, name,
                         tuple(table.shape), files[name].name)
                return InputEmbeddingsOnly(config, table), tokenizer
    why = "no safetensors weights" if files is None else "no input-embedding tensor name found in its safetensors"
    log.warning("%s: %s; loading the whole LLM just for its input-embedding table", folder, why)
    llm, tokenizer = load_llm(path)
    return InputEmbeddingsOnly(llm.config, llm.get_input_embeddings().weight.detach()), tokenizer


def load_encoder(cfg: ModelConfig, train_dtype: torch.dtype = torch.float32) -> Any:
    """The frozen encoder for on-the-fly features, in ``cfg.encoder_dtype`` ("auto" = ``train_dtype``), with the
    parameter-efficient adaptation of ``cfg.encoder_adapt`` / ``cfg.init_encoder_adapt`` installed when one is set."""
    from speechlm.models.encoder import SpeechEncoder

    folder = cfg.encoder or str(default_model(WHISPER_BASE))
    dtype = train_dtype if cfg.encoder_dtype == "auto" else cfg.encoder_dtype
    encoder = SpeechEncoder(folder, layers=tuple(cfg.encoder_layers), dtype=dtype)
    if encoder_adapt_config(cfg) is not None:
        encoder.adapt(adapt_config_from_dict(cfg.encoder_adapt, "model.encoder_adapt"),
                      folder=Path(cfg.init_encoder_adapt).expanduser() if cfg.init_encoder_adapt else None)
        log.info("%s: encoder adaptation %s, %d trainable parameters", folder, encoder.adaptation.cfg.method,
                 encoder.num_trainable_parameters())
    return encoder


def encoder_adapt_config(model: ModelConfig, data: DataConfig | None = None, engine: Any = None
                         ) -> EncoderAdaptConfig | None:
    """The encoder adaptation a run uses (``model.encoder_adapt``, or the one ``model.init_encoder_adapt`` holds),
    or None when the encoder stays frozen (the default).

    With ``data``/``engine``: a :class:`ConfigError` when the run cannot adapt the encoder: cached features
    (the adapted encoder must run on the fly) or ZeRO-3 (its partitioned weights are read outside their modules).
    """
    cfg = resolve_adaptation(model.encoder_adapt, model.init_encoder_adapt, prefix="model.")
    if not cfg.enabled:
        return None
    if data is not None:
        for key in ("feature_cache", "valid_feature_cache"):
            if getattr(data, key):
                raise ConfigError(f"model.encoder_adapt.method={cfg.method}: the adapted encoder runs on the fly, "
                                  f"but data.{key}={getattr(data, key)} is set (cached features come from the frozen "
                                  f"encoder); set data.{key}= (empty) or model.encoder_adapt.method=none")
    if engine is not None:
        from speechlm.training.deepspeed_engine import ds_config

        if int(ds_config(engine).get("zero_optimization", {}).get("stage", 0)) == 3:
            raise ConfigError(f"model.encoder_adapt.method={cfg.method}: not supported under ZeRO-3 (the encoder "
                              "reads some of its partitioned weights outside their modules); set engine.zero_stage "
                              "to 0 or 2")
    return cfg


def adapt_identity(model: ModelConfig, adapt: EncoderAdaptConfig | None) -> dict:
    """What a checkpoint records of the encoder adaptation (nothing when off, so default runs resume as before)."""
    if adapt is None:
        return {}
    return {"encoder_adapt": dataclasses.asdict(adapt), "init_encoder_adapt": str(model.init_encoder_adapt)}


@dataclass
class EncoderFacts:
    """What the connector and the data need to know about the encoder's frames."""

    name: str
    layers: list[int]
    hidden_size: int
    frame_rate_hz: float
    sample_rate: int
    cache_key: dict | None = None


def encoder_facts(model: ModelConfig, data: DataConfig, encoder: Any = None) -> EncoderFacts:
    """From the feature cache's index when there is one (no encoder load), else from the encoder."""
    if data.feature_cache:
        from speechlm.data.feature_cache import FeatureCache

        cache = FeatureCache.open(data.feature_cache)
        key = cache.encoder_key
        return EncoderFacts(Path(str(key["encoder"])).name, list(cache.layers), cache.hidden_size,
                            cache.frame_rate_hz, int(key["sample_rate"]), key)
    if encoder is None:
        raise ConfigError("no data.feature_cache: the encoder must be loaded to compute features on the fly")
    return EncoderFacts(Path(str(encoder.name)).name, list(encoder.layers), encoder.hidden_size,
                        float(encoder.frame_rate_hz), int(encoder.sample_rate))


def make_connector(model: ModelConfig, enc: EncoderFacts, llm: nn.Module) -> Connector:
    """A fresh connector sized for this encoder and LLM (the config's own sizes are overridden)."""
    name, d_llm, vocab = llm_identity(llm)
    cfg = dataclasses.replace(model.connector, d_enc=enc.hidden_size, n_enc_layers=len(enc.layers), d_llm=d_llm,
                              frame_rate_hz=enc.frame_rate_hz, encoder_name=enc.name,
                              encoder_layers=list(enc.layers), llm_name=name, llm_vocab_size=vocab)
    connector = build_connector(cfg)
    if model.init_output_mean and hasattr(connector, "init_output_bias"):
        connector.init_output_bias(llm.get_input_embeddings().weight.detach().float().mean(0))
    proj = getattr(connector, "proj", None)
    if model.init_output_scale != 1.0 and isinstance(proj, nn.Linear):
        with torch.no_grad():
            proj.weight.mul_(model.init_output_scale)
    return connector


def run_identity(stage: str, connector: Connector, data: DataConfig | None = None, **extra: Any) -> dict:
    """What a checkpoint must match to be resumed by this run: the stage, the connector's config, and
    (given ``data``) a fingerprint of the training data, so that a run on re-aligned or re-synthesized
    data never silently continues from weights trained on the old one."""
    identity = {"stage": stage, "connector": dataclasses.asdict(connector.cfg), **extra}
    if data is not None:
        identity["train_data"] = data_fingerprint(data)
    return identity


def data_fingerprint(data: DataConfig) -> str:
    """SHA-256 of what the training rows are: the train manifest's bytes (or, for sharded streams, each
    shard's path and size) and the split; short enough to compare in checkpoint metadata."""
    import glob
    import hashlib

    h = hashlib.sha256(f"split={data.train_split}\n".encode())
    if data.train_manifest:
        from speechlm.data.sources import is_source, source_fingerprint

        path = Path(data.train_manifest)
        if is_source(data.train_manifest):  # a datasets / Lhotse source: its files' names, sizes and mtimes
            h.update(source_fingerprint(data.train_manifest).encode())
        elif path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"missing:{path}".encode())
    for part in (p for spec in data.train_shards.split(",") if spec.strip() for p in sorted(glob.glob(spec.strip()))):
        h.update(f"{part}:{Path(part).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ data
def read_split(manifest: str, split: str, max_utts: int = 0) -> list[Utterance]:
    if not manifest:
        raise ConfigError("no manifest given (data.train_manifest / data.valid_manifest)")
    utts = [u for u in read_manifest(manifest) if not split or u.split == split]
    if not utts:
        raise ConfigError(f"{manifest}: no rows of split {split!r}")
    return utts[:max_utts] if max_utts else utts


def _in_cache(utts: list[Utterance], reader: ExampleReader, manifest: str, check_fresh: bool) -> list[Utterance]:
    """The rows the feature cache holds (rows it skipped as bad audio are left out, with a warning)."""
    if reader.cache is None:
        return utts
    kept = [u for u in utts if u.id in reader.cache]
    if len(kept) < len(utts):
        log.warning("%s: %d of %d rows are not in the feature cache %s (skipped when it was built): left out",
                    manifest, len(utts) - len(kept), len(utts), reader.feature_cache)
    if check_fresh:
        reader.cache.check_fresh(kept)
    return kept


def make_reader(data: DataConfig, enc: EncoderFacts, tokenizer: Any, valid: bool = False,
                need_boundaries: bool = True, tasks: Any = None) -> ExampleReader:
    """The reader of the train (or ``valid``) rows; ``tasks`` (SupervisedTasks) adds each row's task prompt."""
    cache = (data.valid_feature_cache or data.feature_cache) if valid else data.feature_cache
    return ExampleReader(tokenizer, enc.frame_rate_hz, cache or None, enc.cache_key if cache else None,
                         enc.sample_rate, need_boundaries, skip_bad=data.skip_bad, tasks=tasks)


def train_batches(data: DataConfig, reader: ExampleReader, info: DistInfo, seed: int,
                  position: tuple[int, int] = (0, 0)) -> Iterator[Batch]:
    """Endless training batches of this rank, starting at ``position`` (epoch, batch index)."""
    if data.train_shards:
        source: Any = ShardedManifestStream(data.train_shards, reader, info.world_size, info.rank, seed,
                                            data.max_frames, data.max_tokens, data.max_batch,
                                            data.shuffle_buffer, data.stream_window)
        source.set_position(*position)
        return iter(make_loader(source, None, data.num_workers, seed))
    utts = _in_cache(read_split(data.train_manifest, data.train_split), reader, data.train_manifest,
                     data.check_fresh)
    dataset = SpeechTextDataset(utts, reader)
    frames, tokens = dataset.lengths()
    sampler = DistributedBucketSampler(frames, tokens, data.max_frames, data.max_tokens, data.max_batch,
                                       info.world_size, info.rank, seed, shuffle=True, infinite=True,
                                       window=data.bucket_window)
    sampler.set_position(*position)
    return iter(make_loader(dataset, sampler, data.num_workers, seed))


def valid_batches(data: DataConfig, reader: ExampleReader, info: DistInfo) -> Callable[[], Iterable[Batch]]:
    """A function giving one pass over this rank's validation share (equal batch counts on all ranks)."""
    manifest = data.valid_manifest or data.train_manifest
    utts = _in_cache(read_split(manifest, data.valid_split, data.valid_max_utts), reader, manifest,
                     data.check_fresh)
    dataset = SpeechTextDataset(utts, reader)
    frames, tokens = dataset.lengths()

    def batches() -> Iterable[Batch]:
        sampler = DistributedBucketSampler(frames, tokens, data.max_frames, data.max_tokens, data.max_batch,
                                           info.world_size, info.rank, seed=0, shuffle=False, infinite=False)
        return make_loader(dataset, sampler, 0)

    return batches


# --------------------------------------------------------------------------------------- leakage
@torch.no_grad()
def leakage_check(engine: Engine, module: nn.Module, encoder: Any, utts: list[Utterance], reader: ExampleReader
                  ) -> dict[str, float]:
    """Speech NTP loss with each token's future audio removed vs with the full audio (same rows, on the fly).

    Every rank scores its share of ``utts`` one utterance at a time, padded to the same count so that
    ZeRO-3's collective parameter gathers line up. ``leakage_gap`` = cut loss - plain loss (nats).
    A row whose audio cannot be read (gone, damaged, another sample rate) still runs, on silence of its
    duration, so that every rank makes the same calls, and is not counted; afterwards every rank raises an
    AudioError naming the count (the failing rank names the rows), or, with the reader's ``skip_bad``, the
    rows are logged and counted in ``leakage_rows_skipped``.
    """
    from speechlm.data.audio import load_audio
    from speechlm.errors import AudioError
    from speechlm.training.stages import leakage_losses

    info = engine.info
    mine = utts[info.rank:: info.world_size]
    per_rank = -(-len(utts) // info.world_size)
    order = [(u, True) for u in mine] + [(utts[0], False)] * (per_rank - len(mine))
    sums = {"plain": 0.0, "cut": 0.0, "targets": 0.0, "bad": 0.0}
    bad: list[str] = []
    engine.ds.eval()
    for utt, counted in order:
        ids = reader.tokens(utt)
        if utt.token_boundaries is None:
            raise ConfigError(f"leakage check needs token_boundaries (row {utt.id!r})")
        bnd = convert_boundaries(utt.token_boundaries, utt.boundary_frame_rate_hz, reader.frame_rate_hz)
        try:
            wave = load_audio(utt.audio_path, target_sr=encoder.sample_rate, expected_sr=utt.sample_rate)
        except (AudioError, OSError) as e:
            if counted:
                bad.append(f"row {utt.id!r}: {e}")
                sums["bad"] += 1.0
            counted = False
            wave = torch.zeros(max(1, round(utt.duration_s * encoder.sample_rate)))
        r = leakage_losses(module, encoder, wave, ids, bnd)
        for k in ("plain", "cut", "targets"):
            sums[k] += r[k] * (1.0 if counted else 0.0)
    engine.ds.train()
    total = all_sum(sums)
    if total["bad"]:
        if not reader.skip_bad:
            raise AudioError(f"leakage check: {int(total['bad'])} validation row(s) could not be read"
                             + (f": {'; '.join(bad[:5])}" if bad else " (named in another rank's log)")
                             + " (data.skip_bad=true skips such rows)")
        for b in bad:
            log.warning("leakage check: skipping %s (data.skip_bad)", b)
    n = max(1.0, total["targets"])
    plain, cut = total["plain"] / n, total["cut"] / n
    return {"loss_speech_onfly": plain, "loss_speech_cut": cut, "leakage_gap": cut - plain,
            "leakage_rows_skipped": total["bad"],
            "leakage_targets": total["targets"]}
