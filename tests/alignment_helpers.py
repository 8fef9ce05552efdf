"""Tiny offline tokenizers of both families (byte-level BPE, SentencePiece) and posteriors for alignment tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CORPUS = [
    "The cat sat on the mat.", "Hello, world! It's 1984 and I'm here.",
    "Don't stop: 3 apples, 42 pears; naive cafe.", "Repeated letters: bookkeeper, committee, aaa.",
    "Supercalifragilistic words tokenize into many pieces!", "the quick brown fox jumps over the lazy dog",
] * 10


def byte_level_bpe(vocab_size: int = 300):
    """A GPT-2/SmolLM2-style tokenizer ('Ġ' = leading space), trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def sentencepiece_llama(tmp_dir: Path, vocab_size: int = 360):
    """A Llama-2-style SentencePiece BPE tokenizer ('▁' = leading space, byte fallback), slow class."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, minloglevel=2)
    path = Path(tmp_dir) / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return LlamaTokenizer(vocab_file=str(path), legacy=False, add_bos_token=False, add_eos_token=False)


def peaky_posteriors(path: list[int], vocab: int, p: float = 0.9) -> np.ndarray:
    """(T, V) log-posteriors whose best path is exactly ``path`` (one label per frame)."""
    lp = np.full((len(path), vocab), np.log((1 - p) / (vocab - 1)), dtype=np.float32)
    for t, c in enumerate(path):
        lp[t, c] = np.log(p)
    return lp
