"""Config dataclasses of the two training stages (filled by speechlm.config.load_config from YAML + overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from speechlm.config import from_dict
from speechlm.errors import ConfigError
from speechlm.models.connectors.base import ConnectorConfig, SSRConfig
from speechlm.models.encoder_adapt_config import EncoderAdaptConfig, adapt_config_field
from speechlm.training.deepspeed_engine import EngineConfig
from speechlm.training.loop import LoopConfig


@dataclass
class ModelConfig:
    llm: str = ""  # LLM folder; "" = the embedded SmolLM2-135M (speechlm.paths)
    encoder: str = ""  # encoder folder; "" = the embedded Whisper base. Loaded only when needed
    encoder_layers: list[int] = field(default_factory=lambda: [-1])
    # Precision of the on-the-fly encoder: auto (the training precision: bf16 on a bf16 GPU, else fp32)
    # | fp32 | fp16 | bf16. Cached features were computed in the precision tools/cache_features.py used.
    encoder_dtype: str = "auto"
    # The connector's config (speechlm.models.connectors.base): name ssr | stack | conv | qformer picks the
    # dataclass (SSRConfig, ...), whose fields are checked when the config loads; encoder/LLM sizes are filled in.
    connector: ConnectorConfig = field(default_factory=SSRConfig)
    init_output_mean: bool = True  # start the SSR output bias at the LLM's mean token embedding
    # Multiply the output projection's initial weights: small = start near that mean embedding instead of
    # at random vectors far larger than the LLM's embeddings (1.0 = the connector's own init). A 60-step
    # trial (Whisper-base -> SmolLM2, 2 ranks): 0.1 gave valid cosine 0.42 vs 0.31 with 1.0.
    init_output_scale: float = 0.1
    init_connector: str = ""  # stage 2: the connector folder exported by stage 1 (or by the mid-training stage)
    # stage 2: a LoRA adapter folder to start from (the mid-training stage's <out_dir>/lora): trained on with
    # variant=lora|multitask, kept frozen with variant=frozen
    init_lora: str = ""
    gradient_checkpointing: bool = False  # stage 2: activation checkpointing inside the LLM
    # Parameter-efficient encoder adaptation (speechlm.models.encoder_adapt_config: one dataclass per method):
    # method none (default: the frozen encoder, nothing changes) | adapter | lora | prompt. On, the encoder runs on
    # the fly inside the trained module (no data.feature_cache), its adaptation trains with the connector, is
    # checkpointed, and is exported beside the connector as <out_dir>/encoder_adapt (safetensors + config.json).
    encoder_adapt: EncoderAdaptConfig = field(default_factory=EncoderAdaptConfig)
    # An exported encoder_adapt folder (e.g. stage 1's <out_dir>/encoder_adapt) to start from: its config is used
    # (model.encoder_adapt may only repeat it, or set train: false to keep it frozen)
    init_encoder_adapt: str = ""

    def __post_init__(self) -> None:
        # Plain mappings (ModelConfig(connector={...}) from code) become their typed configs here, and every
        # value is checked now: a bad key fails before any model is read.
        if isinstance(self.connector, dict):
            self.connector = from_dict(ConnectorConfig, self.connector, "model.connector.", default=SSRConfig)
        if not isinstance(self.connector, ConnectorConfig):
            raise ConfigError(f"model.connector: expected a mapping with a name (ssr, ...), got {self.connector!r}")
        self.encoder_adapt = adapt_config_field(self.encoder_adapt, "model.encoder_adapt")


@dataclass
class DataConfig:
    train_manifest: str = ""  # one JSONL manifest, held in memory
    train_shards: str = ""  # OR a glob / comma list of manifest shards streamed per rank (huge corpora)
    valid_manifest: str = ""
    train_split: str = "train"  # rows of this split only ("" = all rows)
    valid_split: str = "valid"
    feature_cache: str = ""  # cached encoder features of the train manifest; "" = run the encoder on the fly
    valid_feature_cache: str = ""  # "" = feature_cache
    check_fresh: bool = True  # refuse cached features whose audio changed since caching (one stat per file)
    max_frames: int = 12_000  # budget per batch: batch size x longest clip, in encoder frames (0 = none)
    max_tokens: int = 512  # budget per batch: batch size x longest transcript, in LLM tokens (0 = none)
    max_batch: int = 0  # cap on utterances per batch (0 = none)
    bucket_window: int = 0  # sort into length buckets within windows of this many rows (0 = whole set)
    shuffle_buffer: int = 10_000  # streaming: rows in the shuffle buffer
    stream_window: int = 2_000  # streaming: rows sorted into buckets together
    num_workers: int = 0  # DataLoader worker processes per rank
    valid_max_utts: int = 0  # validate on the first n rows only (0 = all)
    # A row whose audio or cached features cannot be read at training time (deleted, damaged) is skipped,
    # logged and counted (metrics rows_skipped); false = the run stops on every rank, naming the file.
    skip_bad: bool = False


@dataclass
class ContrastiveSettings:
    """Stage 1's discriminative term (:func:`speechlm.training.losses.sampled_softmax_loss`): each vector must pick
    its own token's embedding row out of the batch's tokens plus ``negatives`` random rows (cosine / temperature).
    ``weight`` 0 (default) turns it off."""

    weight: float = 0.0
    temperature: float = 0.05
    negatives: int = 4096

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0 or self.negatives < 0:
            raise ConfigError(f"contrastive: need weight >= 0, temperature > 0 and negatives >= 0, got weight="
                              f"{self.weight}, temperature={self.temperature}, negatives={self.negatives}")


@dataclass
class BehaviourKLSettings:
    """Stage 2's behaviour distillation (:func:`speechlm.training.losses.behaviour_kl`): the LLM's next-token
    distributions given the speech vectors pulled towards those given the transcript's own embeddings (one vector
    per token, so the positions line up: SSR only). ``weight`` 0 (default) turns it off."""

    weight: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ConfigError(f"kl: need weight >= 0 and temperature > 0, got weight={self.weight}, "
                              f"temperature={self.temperature}")


@dataclass
class Stage1Config:
    out_dir: str = "runs/stage1"
    seed: int = 0
    mse_weight: float = 1.0
    cosine_weight: float = 5.0
    contrastive: ContrastiveSettings = field(default_factory=ContrastiveSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0


@dataclass
class SupervisedSettings:
    """The supervised objective's task prompts (speechlm.data.tasks): ``{speech}`` = the connector's vectors."""

    transcribe_prompt: str = "Transcribe the speech.\nSpeech: {speech}\nText:"
    translate_prompt: str = "Translate the speech into {lang}.\nSpeech: {speech}\n{lang}:"
    language: str = "French"  # the target language of rows whose manifest gives no translation_lang
    translate_ratio: float = 0.5  # rows with a translation: the fraction of epochs they are a translation example


@dataclass
class Stage2Config:
    out_dir: str = "runs/stage2"
    seed: int = 0
    # frozen: connector only | lora: + LoRA on the LLM | multitask: LoRA + text-only LM batches mixed in
    variant: str = "frozen"
    # ntp: speech in, next text token out (stage 2) | supervised: task prompt + speech -> answer (transcription,
    # or translation where the manifest has a translation), only the answer scored (the mid-training stage)
    objective: str = "ntp"
    supervised: SupervisedSettings = field(default_factory=SupervisedSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    text_corpus: str = ""  # multitask: text file (one sentence a line) or .jsonl manifest
    text_ratio: float = 0.5  # multitask: fraction of steps that add a text-only batch
    text_weight: float = 1.0
    text_max_tokens: int = 512
    distill_weight: float = 0.0  # weight of the stage-1 loss mixed into stage 2
    mse_weight: float = 1.0
    cosine_weight: float = 5.0
    kl: BehaviourKLSettings = field(default_factory=BehaviourKLSettings)
    bos: bool = True  # put the LLM's BOS embedding before every sequence (context only, not scored)
    leakage_utts: int = 16  # validation rows re-encoded with audio cut at each boundary (0 = skip)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class StageMidConfig(Stage2Config):
    """The supervised mid-training stage (recipes/stage_mid_supervised.py): stage 2's settings, the supervised
    objective. Its connector (and LoRA) start stage 2 (``model.init_connector`` / ``model.init_lora``)."""

    out_dir: str = "runs/mid"
    objective: str = "supervised"
    leakage_utts: int = 0  # the leakage check measures next-token prediction (stage 2), not this objective
