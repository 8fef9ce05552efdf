"""Inference with a trained SpeechLM: audio (+ a prompt) in, an answer out. The CLI and the web demo call this.

The pipeline lives in :mod:`speechlm.inference.pipeline`; its names are re-exported here.
"""

from speechlm.eval.asr import DEFAULT_PROMPT
from speechlm.inference.pipeline import (
    AUDIO_EXTENSIONS,
    DEFAULT_STOP,
    NO_SPEECH_POLICIES,
    RUN_CONNECTORS,
    SPEECH,
    GenerationStream,
    InferenceResult,
    NoSpeechError,
    RunFolders,
    Speech,
    SpeechLMPipeline,
    TextAssembler,
    TokenSpan,
    pick_token,
    prompt_from_instruction,
    resolve_run,
    sample_tokens,
    split_prompt,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEFAULT_PROMPT",
    "DEFAULT_STOP",
    "NO_SPEECH_POLICIES",
    "RUN_CONNECTORS",
    "SPEECH",
    "GenerationStream",
    "InferenceResult",
    "NoSpeechError",
    "RunFolders",
    "Speech",
    "SpeechLMPipeline",
    "TextAssembler",
    "TokenSpan",
    "pick_token",
    "prompt_from_instruction",
    "resolve_run",
    "sample_tokens",
    "split_prompt",
]
