"""Serving a trained SpeechLM: the OpenAI-compatible server with its page (:mod:`speechlm.serving.server`,
batching in :mod:`~speechlm.serving.scheduler`, speech streamed in by :mod:`~speechlm.serving.streaming`) and
answering a batch of audio files (:mod:`speechlm.serving.batch`), all over
:class:`speechlm.inference.SpeechLMPipeline`."""
