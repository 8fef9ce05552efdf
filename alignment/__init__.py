"""Speech-text alignment: one end frame per LLM token of a transcript (forced) or of the decoded speech (free).

Entry points: :class:`alignment.aligner.Aligner` (its kinds charCTC / subCTC / CIF in :mod:`alignment.kinds`), the
boundary rule in :mod:`alignment.tokens`, decoders in :mod:`alignment.decoders`, accuracy in
:mod:`alignment.metrics`; training in :mod:`alignment.training`, evaluation in :mod:`alignment.evaluation`,
manifests in :mod:`alignment.annotate`. Floor 5 of docs/ARCHITECTURE.md: it imports only speechlm.errors, atomic,
paths, config, models and data, never the trainer (``speechlm.training``) or anything above it.
"""
