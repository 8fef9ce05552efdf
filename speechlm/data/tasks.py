"""Task prompts of the supervised mid-training stage: each row becomes transcription or translation.

A prompt template holds one ``{speech}`` placeholder (where the connector's vectors go) and, for translation,
``{lang}`` (the target language's name)::

    transcribe: "Transcribe the speech.\\nSpeech: {speech}\\nText:"
    translate:  "Translate the speech into {lang}.\\nSpeech: {speech}\\n{lang}:"

The answer follows the prompt after one space and ends with the LLM's EOS token (a newline when it has none),
so a model trained on it stops by itself. A row with a ``translation`` is a translation example with
probability ``translate_ratio``, decided by a hash of (seed, row id, epoch): the same every time the batch is
read (an exact resume), different across epochs, and the same on every DataLoader worker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from speechlm.data.manifest import Utterance
from speechlm.errors import ConfigError

TASKS = ("transcribe", "translate")


@dataclass
class TaskExample:
    """One row's supervised example: ``before [speech] after`` as context, ``target`` scored."""

    task: str  # transcribe | translate
    before: list[int]  # prompt tokens before the speech
    after: list[int]  # prompt tokens after the speech
    target: list[int]  # the answer's tokens, EOS (or newline) included


def split_template(template: str, what: str) -> tuple[str, str]:
    """``template`` -> (text before ``{speech}``, text after it); exactly one placeholder."""
    if template.count("{speech}") != 1:
        raise ConfigError(f"the {what} prompt needs exactly one {{speech}} placeholder: {template!r}")
    before, after = template.split("{speech}")
    return before, after


def task_draw(seed: int, utt_id: str, epoch: int) -> float:
    """A number in [0, 1) fixed by (seed, row id, epoch): no RNG state, so resumes and workers agree."""
    digest = hashlib.blake2b(f"{seed}\0{utt_id}\0{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SupervisedTasks:
    """Builds :class:`TaskExample` s for manifest rows with a tokenizer and the stage's prompt settings."""

    def __init__(self, tokenizer: Any, transcribe_prompt: str, translate_prompt: str, language: str = "French",
                 translate_ratio: float = 0.5, seed: int = 0):
        if not 0.0 <= translate_ratio <= 1.0:
            raise ConfigError(f"supervised.translate_ratio must be in [0, 1], not {translate_ratio}")
        self.tokenizer = tokenizer
        self.templates = {"transcribe": split_template(transcribe_prompt, "transcribe"),
                          "translate": split_template(translate_prompt, "translate")}
        if "{lang}" in transcribe_prompt:
            raise ConfigError("the transcribe prompt has no target language: remove {lang}")
        self.language, self.translate_ratio, self.seed = language, float(translate_ratio), int(seed)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.end = [int(eos)] if eos is not None else self._ids("\n")
        self._prompts: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt(self, task: str, lang: str = "") -> tuple[list[int], list[int]]:
        """Token ids before and after the speech for ``task`` (and target language ``lang``)."""
        key = (task, lang)
        if key not in self._prompts:
            before, after = self.templates[task]
            self._prompts[key] = (self._ids(before.replace("{lang}", lang)), self._ids(after.replace("{lang}", lang)))
        return self._prompts[key]

    def choose(self, utt: Utterance, epoch: int = 0) -> str:
        if utt.translation is None or self.translate_ratio == 0.0:
            return "transcribe"
        return "translate" if task_draw(self.seed, utt.id, epoch) < self.translate_ratio else "transcribe"

    def example(self, utt: Utterance, epoch: int = 0) -> TaskExample:
        task = self.choose(utt, epoch)
        if task == "translate":
            lang = utt.translation_lang or self.language
            before, after = self.prompt(task, lang)
            answer = utt.translation or ""
        else:
            before, after = self.prompt(task)
            answer = utt.text
        return TaskExample(task, before, after, self._ids(" " + answer.strip()) + self.end)
