"""Serving a trained SpeechLM: the local web demo (:mod:`speechlm.serving.demo`) and answering a batch of audio
files (:mod:`speechlm.serving.batch`), both over :class:`speechlm.inference.SpeechLMPipeline`."""
