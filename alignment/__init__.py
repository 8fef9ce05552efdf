"""Speech-text alignment: one end frame per LLM token of a transcript (forced) or of the decoded speech (free).

Entry points: :class:`alignment.aligner.Aligner` (charCTC / subCTC / CIF models), the boundary rule in
:mod:`alignment.tokens`, decoders in :mod:`alignment.decoders`, accuracy in :mod:`alignment.metrics`.
This package never imports the trainer (``speechlm.training``).
"""
