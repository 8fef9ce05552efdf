"""Randomly initialised models of the real architectures (Llama-3-8B / 3.2-1B, w2v-BERT 2.0, Whisper large-v3)
built in code, no weights read, and synthetic inputs of their shapes; ``tiny`` gives CPU-sized stand-ins."""

from __future__ import annotations

import contextlib
from pathlib import Path


def llama_config(size: str, vocab: int | None = None, layers: int | None = None) -> dict:
    """Keyword arguments of transformers.LlamaConfig for Meta-Llama-3-8B / Llama-3.2-1B / a tiny stand-in."""
    if size == "8b":
        cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
    elif size == "1b":
        cfg = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 128000,
               "eos_token_id": 128001,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    elif size == "tiny":
        cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    else:
        raise ValueError(f"unknown LLM size {size!r} (8b | 1b | tiny)")
    if vocab is not None:
        cfg["vocab_size"] = vocab
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


ENCODERS = {  # kind -> (folder name, frame rate Hz, hidden size real, hidden size tiny)
    "w2v-bert": ("w2v-bert-2.0-random", 50.0, 1024, 32),
    "whisper": ("whisper-large-v3-random", 50.0, 1280, 32),
}


def encoder_model(kind: str, tiny: bool):
    """(random model, feature extractor) of facebook/w2v-bert-2.0 or openai/whisper-large-v3's architecture."""
    if kind == "w2v-bert":
        from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

        if tiny:
            cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     output_hidden_size=32, feature_projection_input_dim=160,
                                     conv_depthwise_kernel_size=5, position_embeddings_type="relative_key",
                                     left_max_position_embeddings=16, right_max_position_embeddings=4,
                                     add_adapter=False)
        else:  # facebook/w2v-bert-2.0's config.json (600M parameters)
            cfg = Wav2Vec2BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, output_hidden_size=1024, feature_projection_input_dim=160,
                                     conv_depthwise_kernel_size=31, position_embeddings_type="relative_key",
                                     left_max_position_embeddings=64, right_max_position_embeddings=8,
                                     add_adapter=False, layerdrop=0.0, hidden_act="swish")
        return Wav2Vec2BertModel(cfg), SeamlessM4TFeatureExtractor()
    if kind == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

        common = {"num_mel_bins": 128, "max_source_positions": 1500, "pad_token_id": 50256, "bos_token_id": 50257,
                  "eos_token_id": 50257, "decoder_start_token_id": 50258, "suppress_tokens": None,
                  "begin_suppress_tokens": None}
        if tiny:
            cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=51866,
                                max_target_positions=32, **common)
        else:  # openai/whisper-large-v3's encoder; the decoder (dropped by SpeechEncoder) cut to 2 layers
            cfg = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                decoder_layers=2, decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51866,
                                max_target_positions=448, **common)
        return WhisperForConditionalGeneration(cfg), WhisperFeatureExtractor(feature_size=128)
    raise ValueError(f"unknown encoder {kind!r} (w2v-bert | whisper)")


@contextlib.contextmanager
def building(device: str, dtype):
    """Create modules directly on ``device`` in ``dtype`` (an 8B model initialises in seconds on a GPU)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_encoder_folder(kind: str, folder: str | Path, tiny: bool, device: str = "cpu") -> Path:
    """A random encoder of the real architecture saved as a Hugging Face folder (bf16 weights at real size),
    built once: a folder holding READY is reused."""
    import shutil

    import torch

    folder = Path(folder)
    if (folder / "READY").is_file():
        return folder
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with building(device, dtype):
        model, fe = encoder_model(kind, tiny)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fe.save_pretrained(tmp)
    (tmp / "READY").write_text("random weights, built by tools/gpu_check.py\n")
    del model
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_llama(size: str, device: str, dtype, vocab: int | None = None, layers: int | None = None):
    """A random, frozen, eval-mode Llama of ``size`` created directly on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**llama_config(size, vocab, layers))
    with building(device, dtype):
        llm = LlamaForCausalLM(cfg)
    return llm.requires_grad_(False).eval()


def synthetic_batch(clips: int, frames: int, tokens: int, d_enc: int, vocab: int, seed: int = 0):
    """A Batch as the cached-feature loader gives it: features (B, 1, T, D) fp32, evenly spread boundaries."""
    import torch

    from speechlm.data.batching import Batch

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(clips, 1, frames, d_enc, generator=g)
    base = torch.linspace(0, frames - 1, tokens + 1)[1:].round().long()
    bnd = base[None].expand(clips, tokens).clone()
    ids = torch.randint(3, vocab, (clips, tokens), generator=g)
    return Batch(utt_ids=[f"synthetic-{i}" for i in range(clips)], token_ids=ids,
                 token_mask=torch.ones(clips, tokens, dtype=torch.bool), boundaries=bnd, features=feats,
                 frame_lengths=torch.full((clips,), frames, dtype=torch.long))


def random_clips(n: int, seconds: float, seed: int = 0):
    """``n`` clips of quiet white noise at 16 kHz (what the random encoders are timed on)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(seconds * 16000), generator=g) for _ in range(n)]


def word_tokenizer(words: list[str], folder: str | Path):
    """A word-level fast tokenizer: <pad> <s> </s> <unk> (ids 0..3), then ``words`` in their order (distinct);
    saved into ``folder`` and returned."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast
