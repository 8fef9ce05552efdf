"""Add per-token boundaries (one inclusive end frame per LLM token) to the rows of a manifest: the logic behind
``tools/align.py``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tqdm import tqdm

from alignment.aligner import Aligner
from alignment.features import by_length, iter_feature_batches, open_frame_source
from speechlm.data.manifest import Utterance, read_manifest, write_manifest
from speechlm.errors import AlignmentError


@dataclass
class AlignedManifest:
    """What :func:`align_manifest` wrote."""

    rows: int                                      # rows written
    frame_rate_hz: float                           # rate of their ``token_boundaries``
    bad: list[str] = field(default_factory=list)   # "id: why" of the rows left out (``skip_bad``)


def align_manifest(manifest: str, aligner_folder: str, tokenizer: str, out: str, *, encoder: str = "",
                   feature_cache: str = "", decoder: str = "ctc_segmentation", target_frame_rate: float = 0.0,
                   free: bool = False, beam_size: int = 0, batch_size: int = 8, skip_bad: bool = False
                   ) -> AlignedManifest:
    """Write ``out``: the rows of ``manifest`` with ``token_boundaries`` (for ``tokenizer(text,
    add_special_tokens=False)``) and ``boundary_frame_rate_hz`` (``target_frame_rate``, default the aligner's).

    Forced mode aligns each row's transcript; ``free`` decodes the speech and replaces ``text`` by what was
    decoded (its reference word timings are dropped). The output is written atomically; with ``skip_bad`` rows
    that cannot be read or aligned are left out and listed in the result, else the first one raises.
    Rows are batched shortest first (little padding for the aligner to attend over) and written in the
    manifest's order.
    """
    from transformers import AutoTokenizer

    llm_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    aligner = Aligner.from_pretrained(aligner_folder, llm_tokenizer, decoder=decoder, beam_size=beam_size)
    enc, cache = open_frame_source(aligner, encoder, feature_cache)
    bad: list[str] = []
    utts = read_manifest(manifest, skip_bad=skip_bad, bad_rows=bad)
    to_hz = target_frame_rate or aligner.frame_rate_hz
    position = {id(u): k for k, u in enumerate(utts)}
    rows: dict[int, Utterance] = {}
    with tqdm(total=len(utts), desc="align", unit="utt") as bar:
        for fb in iter_feature_batches([utts[i] for i in by_length(utts)], batch_size, encoder=enc, cache=cache,
                                       skip_bad=skip_bad, bad_rows=bad):
            lp = aligner.frame_outputs(fb.features, fb.lengths)
            for k, utt in enumerate(fb.utts):
                try:
                    res = aligner.align_posteriors(lp[k, : int(fb.lengths[k])], None if free else utt.text,
                                                   utt.id, to_hz)
                except AlignmentError as e:
                    if not skip_bad:
                        raise
                    bad.append(f"{utt.id}: {e}")
                    continue
                # free mode replaces the text, so the reference word timings no longer describe it
                rows[position[id(utt)]] = replace(utt, text=res.text, token_boundaries=res.token_boundaries,
                                    boundary_frame_rate_hz=res.frame_rate_hz, words=None if free else utt.words)
            bar.update(len(fb.utts))
    return AlignedManifest(write_manifest(out, [rows[k] for k in sorted(rows)]), to_hz, bad)
