"""Tiny models for the evaluation tests: a word-level tokenizer, a rigged unigram Llama, oracle speech, a fake
Whisper."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speechlm.eval.scoring import SpeechFrontEnd, SpeechInput, text_ids
from speechlm.models.connectors import build_connector
from speechlm.models.speechlm import SpeechLM, SpeechSegment

WORDS = (["tom", "was", "late", "he", "ran", "to", "the", "bus", "it", "had", "left", "walked", "home", "happy", "sad", "very", "and", "so", "a", "cat", "dog", "what", "is", "two", "plus", "four", "five", "three", "six", "seven", "answer", "question", "a", "b", "c", "d", "x", "y", "z", "repeat", "text", "sky", "blue", "green", "red", "color", "of"])
SPECIAL = ["<unk>", "<s>", "</s>"]
D_LLM = 32


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)) + list(".,:?\n") + ["A", "B", "C", "D"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llm(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=D_LLM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def unigram_llm(tokenizer, preferred: dict[str, float]) -> LlamaForCausalLM:
    """A Llama whose next-token distribution ignores its input: logits = bias, ``preferred`` words boosted.

    Layers are switched off (zero output projections), every embedding row is the same unit vector
    e_0, the final norm keeps dimension 0 only, and column 0 of the head is the bias: so every
    position, whatever came before, predicts the same distribution (also from embedding-like vectors).
    """
    llm = tiny_llm(len(tokenizer))
    bias = torch.linspace(-1.0, 1.0, len(tokenizer))  # distinct values: a log-prob identifies its token
    for word, boost in preferred.items():
        bias[tokenizer.convert_tokens_to_ids(word)] += boost
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight.zero_()
        llm.model.embed_tokens.weight[:, 0] = 1.0
        llm.model.norm.weight.zero_()
        llm.model.norm.weight[0] = 1.0
        llm.lm_head.weight.zero_()
        llm.lm_head.weight[:, 0] = bias
    return llm


def unigram_logprobs(llm) -> torch.Tensor:
    """The (V,) next-token log-distribution of a :func:`unigram_llm` (the same at every position)."""
    with torch.no_grad():
        return torch.log_softmax(llm(input_ids=torch.tensor([[1]])).logits[0, -1].float(), -1)


def bigram_llm(tokenizer, follows: dict[str, str | list[str]], hidden: int = 64) -> LlamaForCausalLM:
    """A Llama whose next token depends only on the current one: ``follows[w]`` (a word, or words best
    first) is what comes after ``w``; any other token is followed by the same fixed preference.

    As :func:`unigram_llm` the layers are switched off, but every token's embedding is its own unit
    vector (``hidden >= vocabulary``), so the head reads which token is at a position: ``lm_head[v, t]``
    is the score of ``t -> v`` (scaled by the final norm's ``sqrt(hidden)``).
    """
    v = len(tokenizer)
    if hidden < v:
        raise ValueError(f"hidden size {hidden} < vocabulary {v}")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=v, max_position_embeddings=512, tie_word_embeddings=False)
    llm = LlamaForCausalLM(cfg).eval()
    score = torch.linspace(-1.0, 1.0, v)[:, None].repeat(1, hidden)  # score[next, current]
    for word, nxt in follows.items():
        cur = tokenizer.convert_tokens_to_ids(word)
        for rank, w in enumerate([nxt] if isinstance(nxt, str) else nxt):
            score[tokenizer.convert_tokens_to_ids(w), cur] += 10.0 - rank
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight.zero_()
        llm.model.embed_tokens.weight[:, :v] = torch.eye(v)
        llm.model.norm.weight.fill_(1.0)
        llm.lm_head.weight.copy_(score / hidden ** 0.5)
    return llm


def speech_model(llm, tokenizer) -> SpeechLM:
    d_llm = llm.config.hidden_size
    conn = build_connector({"name": "ssr", "d_enc": 8, "d_llm": d_llm, "d_model": 16, "n_heads": 2, "n_layers": 1})
    return SpeechLM(conn, llm, tokenizer=tokenizer)


class OracleFrontEnd(SpeechFrontEnd):
    """Speech vectors = the LLM's own embeddings of the transcript tokens (a perfect stage-1 connector); the
    front end's own ``embed`` (and its ``memo``) around them. ``embedded`` lists every transcript it embedded."""

    uses_boundaries = True
    label = "oracle"

    def __init__(self, model: SpeechLM):  # no encoder, no aligner: the transcripts are the speech
        self.model = model
        self.memo = None
        self.embedded: list[str | None] = []

    def _embed(self, inputs: list[SpeechInput]) -> list[SpeechSegment]:
        out = []
        self.embedded += [x.text for x in inputs]
        for x in inputs:
            ids = text_ids(self.model.tokenizer, x.text)
            out.append(SpeechSegment(self.model.llm_embed(torch.tensor(ids)).detach(), ids=ids))
        return out


def fake_whisper(monkeypatch, hear) -> list[int]:
    """The Whisper cascade replaced by one that "hears" ``hear(waveform)``; returns the sizes of the batches it
    was asked to transcribe (appended as they come)."""
    from speechlm.eval import asr

    calls: list[int] = []

    class FakeWhisper:
        def __init__(self, folder, device, transcripts=None):
            pass

        def transcribe(self, waves, batch_size):
            calls.append(len(waves))
            return [hear(w) for w in waves]

    monkeypatch.setattr(asr, "WhisperCascade", FakeWhisper)
    return calls
