"""Stage-1 error analysis by token class: where does the connector miss the LLM's input embeddings?
(The command line: tools/analyze_tokens.py.)

For every token of every (aligned) manifest row: the SSR connector's vector, computed from the cached
encoder features exactly as the stage-1 validation does, its cosine with the token's row of the LLM's
input-embedding table, and whether the table row nearest to it by cosine is the token itself (token
accuracy, as ``speechlm.training.losses.nearest_token_accuracy``). Reported per class (a token can be
in several; the first five partition all tokens):

* ``all``;
* ``word_initial``: starts a word: its decoded text starts with whitespace, or the row's text before
  it is empty (the first token; SentencePiece may give a row-initial bare-space token "") or ends
  with whitespace (after a bare-space token);
* ``continuation``: a later piece of a word: no leading whitespace, letters only;
* ``punctuation``: no letter and no digit (whitespace-only tokens included);
* ``other``: the rest (e.g. digit pieces, "'s");
* ``shares_frame_with_previous``: its boundary at the connector's read-out rate (``boundary // stack``)
  equals the previous token's, so both are read from one compressor frame;
* ``followed_by_sharer``: the next token shares its read-out frame (e.g. the word before a full stop);
* ``seen_in_training`` / ``unseen_in_training``: whether the token id occurs in ``--train-manifest``'s
  transcripts (same tokenizer); left out without a train manifest.

``by_engine`` gives the ``all`` figures per synthesis condition of the row's ``speaker``
(``speechlm.data.tts.engine_of``: the engine, or "espeak-hard" for a held-out eSpeak voice;
"unknown" for rows without a speaker). Each entry: ``tokens``, ``share`` (of all tokens),
``token_acc`` and ``cosine`` (mean; both null for an empty class). :func:`markdown_table` renders it.

With a speller and its charCTC aligner (the spelling path, ``speechlm.eval.spelling``) every entry also has
``speller_acc``/``speller_cosine`` (the speller's vector; a token with nothing heard falls back to SSR's),
``mix_acc``/``mix_cosine`` (the two combined with weight ``mix``) and ``spelled`` (share of tokens with a heard
spelling); the report adds ``items_speller`` and ``items_mix`` (keyed like ``items``), ``mix`` (the weight and,
with ``choose_mix_on``, the grid it was chosen from on those rows) and ``paired`` (mix and speller against SSR
per class: ``speechlm.eval.paired``, utterances resampled).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from speechlm.data.batching import Batch, ExampleReader, collate
from speechlm.data.manifest import Utterance, iter_manifest, read_manifest
from speechlm.data.tts import UNKNOWN_ENGINE, engine_of
from speechlm.errors import ConfigError, FeatureCacheError, ManifestError, ModelError

#: The partition of all tokens by their text (every token is in exactly one).
TEXT_CLASSES = ("word_initial", "continuation", "punctuation", "other")
FRAME_CLASSES = ("shares_frame_with_previous", "followed_by_sharer")
TRAIN_CLASSES = ("seen_in_training", "unseen_in_training")
#: Report order; the training classes only when a train manifest was given.
CLASSES = ("all", *TEXT_CLASSES, *FRAME_CLASSES, *TRAIN_CLASSES)


# ------------------------------------------------------------------------------------- pure parts
def text_class(piece: str, word_start: bool) -> str:
    """The text class of one token's decoded string: one of :data:`TEXT_CLASSES`.

    ``word_start``: the text before the token is empty or ends with whitespace (row start, or after a
    bare-space token).
    """
    if not any(c.isalnum() for c in piece):
        return "punctuation"
    if word_start or piece[:1].isspace():
        return "word_initial"
    if piece.isalpha():
        return "continuation"
    return "other"


def token_classes(token_strings: Sequence[str], boundaries: Sequence[int], stack: int,
                  train_ids: set[int] | None = None, token_ids: Sequence[int] | None = None) -> list[set[str]]:
    """The classes of each token of one row.

    ``token_strings``: each token's decoded text (with its leading space, see :func:`token_pieces`);
    ``boundaries``: each token's inclusive end frame at the ENCODER rate; ``stack``: the SSR config's k
    (read-out frame = boundary // k); ``train_ids``: token ids seen in training (None = no seen/unseen
    classes), which needs the row's ``token_ids``.
    """
    n = len(token_strings)
    if len(boundaries) != n:
        raise ValueError(f"{n} token strings but {len(boundaries)} boundaries")
    if train_ids is not None and (token_ids is None or len(token_ids) != n):
        raise ValueError("train_ids needs the row's token_ids (one per token)")
    k = max(1, int(stack))
    frame = [int(b) // k for b in boundaries]
    out: list[set[str]] = []
    before = ""  # the row's text before token i (its last character is all that matters)
    for i, piece in enumerate(token_strings):
        classes = {"all", text_class(piece, not before or before[-1].isspace())}
        before = (before + piece)[-1:]
        if i > 0 and frame[i] == frame[i - 1]:
            classes.add("shares_frame_with_previous")
        if i + 1 < n and frame[i + 1] == frame[i]:
            classes.add("followed_by_sharer")
        if train_ids is not None:
            classes.add("seen_in_training" if int(token_ids[i]) in train_ids else "unseen_in_training")
        out.append(classes)
    return out


@dataclass
class TokenRecord:
    """What the analysis keeps of one token."""

    classes: set[str]
    correct: bool  # the nearest embedding-table row (cosine) is the token
    cosine: float  # cosine of the connector's vector with the token's embedding
    engine: str = UNKNOWN_ENGINE
    item: str = ""  # "<utterance id>/<token index>": pairs the tokens of two connectors (speechlm.eval.paired)
    #: Other read-outs of the same token: {name: (correct, cosine)} (the spelling path: "speller", "mix").
    variants: dict[str, tuple[bool, float]] = field(default_factory=dict)
    spelled: bool | None = None  # the spelling path heard characters (None: no spelling path)


def _figures(records: list[TokenRecord], total: int, variants: Sequence[str] = ()) -> dict[str, Any]:
    n = len(records)
    out = {"tokens": n, "share": n / total if total else 0.0,
           "token_acc": sum(r.correct for r in records) / n if n else None,
           "cosine": sum(r.cosine for r in records) / n if n else None}
    for v in variants:
        out[f"{v}_acc"] = sum(r.variants[v][0] for r in records) / n if n else None
        out[f"{v}_cosine"] = sum(r.variants[v][1] for r in records) / n if n else None
    if variants:
        out["spelled"] = sum(bool(r.spelled) for r in records) / n if n else None
    return out


def summarize(records: Sequence[TokenRecord]) -> dict[str, dict[str, dict[str, Any]]]:
    """{"classes": {class: figures}, "by_engine": {engine: figures}}; figures = tokens, share, token_acc, cosine.

    Every class of :data:`CLASSES` is reported (empty ones with null accuracy and cosine), except the
    training classes when no record has one (no train manifest).
    """
    total = len(records)
    variants = list(records[0].variants) if records else []
    with_train = any(c in r.classes for r in records for c in TRAIN_CLASSES)
    names = [c for c in CLASSES if with_train or c not in TRAIN_CLASSES]
    classes = {c: _figures([r for r in records if c in r.classes], total, variants) for c in names}
    engines = sorted({r.engine for r in records})
    by_engine = {e: _figures([r for r in records if r.engine == e], total, variants) for e in engines}
    return {"classes": classes, "by_engine": by_engine}


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's decoded text in context, with the leading space a lone decode may drop.

    Piece i is decode(ids[:i+1]) minus decode(ids[:i]) (SentencePiece drops a row-initial space only);
    where that is not a prefix (a split multi-byte character) it falls back to decode([id]).
    """
    def dec(x: Sequence[int]) -> str:
        return tokenizer.decode(list(x), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, prev = [], ""
    for i in range(len(ids)):
        cur = dec(ids[: i + 1])
        out.append(cur[len(prev):] if cur.startswith(prev) else dec(ids[i: i + 1]))
        prev = cur
    return out


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    def fmt(x: float | None, digits: int = 4) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    rows = list(summary["classes"].items()) + [(f"engine: {e}", f) for e, f in summary["by_engine"].items()]
    variants = [k[:-4] for k in (rows[0][1] if rows else {}) if k.endswith("_acc") and k != "token_acc"]
    head = "| class | tokens | share | token acc | cosine |" + "".join(f" {v} acc | {v} cosine |" for v in variants)
    lines = [head + (" spelled |" if variants else ""),
             "|---|---:|---:|---:|---:|" + "---:|---:|" * len(variants) + ("---:|" if variants else "")]
    for name, f in rows:
        cells = [f"{f['tokens']}", fmt(f["share"], 3), fmt(f["token_acc"]), fmt(f["cosine"])]
        cells += [x for v in variants for x in (fmt(f[f"{v}_acc"]), fmt(f[f"{v}_cosine"]))]
        cells += [fmt(f["spelled"], 3)] if variants else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- model side
def connector_vectors(connector: torch.nn.Module, reader: ExampleReader, utts: Sequence[Utterance],
                      batch_size: int = 8, device: str | torch.device = "cpu") -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, connector vectors (B, N, d_llm) float32) for ``utts`` in order, ``batch_size`` rows at a time."""
    dtype = next(connector.parameters()).dtype
    connector.eval()
    with torch.no_grad():
        for s in range(0, len(utts), max(1, batch_size)):
            batch = collate([reader.read(u) for u in utts[s: s + max(1, batch_size)]]).to(device, dtype)
            out = connector(batch.features, batch.frame_lengths, batch.boundaries, batch.token_mask)
            yield batch, out.embeds.float()


def nearest_rows(vectors: torch.Tensor, table_unit: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(n,) index of the row of ``table_unit`` (V, d), unit rows, nearest by cosine to each of ``vectors`` (n, d)."""
    q = F.normalize(vectors.float(), dim=-1)
    if q.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=q.device)
    return torch.cat([(q[i:i + chunk] @ table_unit.T).argmax(-1) for i in range(0, q.shape[0], chunk)])


def train_token_ids(manifest: str | Path, tokenizer: Any, chunk: int = 1000) -> set[int]:
    """Every token id in the transcripts of ``manifest`` (all its rows)."""
    seen: set[int] = set()
    texts: list[str] = []

    def flush() -> None:
        if texts:
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                seen.update(ids)
            texts.clear()

    for utt in iter_manifest(manifest):
        texts.append(utt.text)
        if len(texts) >= chunk:
            flush()
    flush()
    return seen


def _named(ids: list[str], limit: int = 5) -> str:
    more = f" (and {len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in ids[:limit]) + more


def _aligned_rows(manifest: str | Path, feature_cache: str | Path, split: str = "", limit: int = 0
                  ) -> list[Utterance]:
    """The rows of ``manifest`` (of ``split``; the first ``limit``), all with token boundaries and in the cache."""
    from speechlm.data.feature_cache import FeatureCache

    utts = [u for u in read_manifest(manifest) if not split or u.split == split]
    if limit:
        utts = utts[: limit]
    if not utts:
        raise ManifestError(f"{manifest}: no rows" + (f" of split {split!r}" if split else ""))
    unaligned = [u.id for u in utts if u.token_boundaries is None]
    if unaligned:
        raise ManifestError(f"{manifest}: {len(unaligned)} row(s) have no token_boundaries (run the aligner "
                            f"first): {_named(unaligned)}")
    cache = FeatureCache.open(feature_cache)
    missing = [u.id for u in utts if u.id not in cache]
    if missing:
        raise FeatureCacheError(f"{feature_cache}: {len(missing)} row(s) of {manifest} are not in the "
                                f"feature cache: {_named(missing)}")
    return utts


def _score(vectors: torch.Tensor, table: torch.Tensor, table_unit: torch.Tensor, targets: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nearest row, right?, cosine with the target row) of each of ``vectors`` (n, d)."""
    pred = nearest_rows(vectors, table_unit)
    cos = F.cosine_similarity(vectors, table[targets], dim=-1, eps=1e-8)
    return pred.cpu(), (pred == targets).cpu(), cos.cpu()


def analyze(connector: str | Path, manifest: str | Path, feature_cache: str | Path, llm: str = "",
            train_manifest: str | Path | None = None, split: str = "", limit: int = 0, batch_size: int = 8,
            device: str = "cpu", check_fresh: bool = True, progress: bool = True,
            speller: str | Path | None = None, aligner: str | Path | None = None, mix: float | None = None,
            choose_mix_on: str | Path | None = None, choose_mix_cache: str | Path | None = None,
            choose_mix_rows: int = 300) -> dict[str, Any]:
    """The report of one connector on one aligned manifest (see the module docstring): run facts, ``classes``
    and ``by_engine``. Refuses (SpeechLMError) a folder that is no connector, a non-SSR connector, rows without
    token boundaries and rows missing from the feature cache, naming them.

    ``speller`` + ``aligner`` (folders) add the spelling path; its mix weight is ``mix`` (default 0.5) or the
    best of ``speechlm.eval.spelling.MIX_GRID`` on the first ``choose_mix_rows`` rows of ``choose_mix_on`` (a
    manifest of training rows, with its feature cache ``choose_mix_cache``): never the rows reported."""
    from tqdm import tqdm

    from speechlm.eval.paired import compare
    from speechlm.eval.spelling import SpellingPath, mix_vectors
    from speechlm.models.connectors.base import CONFIG_FILE, check_encoder, load_connector
    from speechlm.training import build
    from speechlm.training.configs import DataConfig, ModelConfig

    folder = Path(connector)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelError(f"{folder}: no connector folder (no {CONFIG_FILE}); give the stage-1 run's connector/ "
                         "folder")
    if bool(speller) != bool(aligner):
        raise ConfigError("the spelling path needs both a speller folder and its charCTC aligner folder")
    if mix is not None and (choose_mix_on or not 0.0 <= mix <= 1.0):
        raise ConfigError(f"mix weight {mix}: give a weight in [0, 1] or rows to choose it on, not both")
    if choose_mix_on and not (speller and choose_mix_cache):
        raise ConfigError("choosing the mix weight needs the speller and the feature cache of its rows")
    utts = _aligned_rows(manifest, feature_cache, split, limit)

    lm, tokenizer = build.load_llm_embeddings(llm)
    model = load_connector(folder, llm=lm)
    if model.cfg.name != "ssr":
        raise ModelError(f"{folder}: a {model.cfg.name!r} connector; token analysis needs an SSR connector "
                         "(one vector per token)")
    device = torch.device(device)
    model.to(device)
    table = lm.get_input_embeddings().weight.detach().float().to(device)  # (V, d)
    table_unit = F.normalize(table, dim=-1)
    del lm
    spelling = SpellingPath.load(speller, aligner, feature_cache, int(table.shape[1])) if speller else None

    def reader_of(cache_dir: str | Path, rows: list[Utterance]):
        data = DataConfig(feature_cache=str(cache_dir))
        enc = build.encoder_facts(ModelConfig(), data)
        check_encoder(model.cfg, SimpleNamespace(name=enc.name, hidden_size=enc.hidden_size, layers=enc.layers,
                                                 frame_rate_hz=enc.frame_rate_hz), str(folder))
        reader = build.make_reader(data, enc, tokenizer)
        if check_fresh:
            reader.cache.check_fresh(rows)
        return reader, enc

    def batches(reader, rows: list[Utterance], rate: float, what: str):
        """(batch, SSR vectors (n, d), speller vectors (n, d) or None, spelled (n,), heard) per batch, masked."""
        with tqdm(total=len(rows), desc=what, unit="utt", disable=not progress) as bar:
            for batch, vectors in connector_vectors(model, reader, rows, batch_size, device):
                m = batch.token_mask
                sv, spelled, heard = (None, torch.zeros_like(m), None) if spelling is None else \
                    spelling.batch_vectors(batch.features, batch.frame_lengths, batch.boundaries, m, rate)
                yield batch, vectors[m], None if sv is None else sv.to(device)[m], spelled.to(device)[m], heard
                bar.update(len(batch.utt_ids))

    reader, enc = reader_of(feature_cache, utts)
    mix_info: dict[str, Any] | None = None
    if spelling is not None:
        mix_info = {"weight": 0.5 if mix is None else float(mix), "chosen_on": None}
        if choose_mix_on:
            mix_info = _choose_mix(spelling, choose_mix_on, choose_mix_cache, choose_mix_rows, reader_of, batches,
                                   table_unit, {u.id for u in utts})
    train_ids = train_token_ids(train_manifest, tokenizer) if train_manifest else None
    stack = int(model.cfg.stack)

    records: list[TokenRecord] = []
    examples: list[dict[str, str]] = []
    by_id = {u.id: u for u in utts}
    for batch, vectors, sv, spelled, heard in batches(reader, utts, enc.frame_rate_hz, "token analysis"):
        targets = batch.token_ids[batch.token_mask].to(device)
        pred, right, cos = _score(vectors, table, table_unit, targets)
        variants: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if sv is not None:
            variants["speller"] = _score(torch.where(spelled.unsqueeze(-1), sv, vectors), table, table_unit, targets)
            variants["mix"] = _score(mix_vectors(vectors, sv, mix_info["weight"], spelled), table, table_unit, targets)
        pos = 0
        for i, utt_id in enumerate(batch.utt_ids):
            n = int(batch.token_mask[i].sum())
            ids = batch.token_ids[i, :n].tolist()
            pieces = token_pieces(tokenizer, ids)
            classes = token_classes(pieces, batch.boundaries[i, :n].tolist(), stack, train_ids, ids)
            engine = engine_of(by_id[utt_id].speaker)
            for j in range(n):
                k = pos + j
                rec = TokenRecord(classes[j], bool(right[k]), float(cos[k]), engine, f"{utt_id}/{j}",
                                  {v: (bool(r[1][k]), float(r[2][k])) for v, r in variants.items()},
                                  bool(spelled[k]) if variants else None)
                records.append(rec)
                if variants and len(examples) < 40:
                    examples.append({"item": rec.item, "token": pieces[j], "heard": heard[i][j],
                                     **{v: tokenizer.decode([int(r[0][k])]) for v, r in
                                        {"ssr": (pred, right, cos), **variants}.items()}})
            pos += n

    summary = summarize(records)
    report = {"connector": str(folder), "llm": str(llm), "manifest": str(manifest),
              "feature_cache": str(feature_cache), "train_manifest": str(train_manifest) if train_manifest else None,
              "rows": len(utts), "stack": stack, "frame_rate_hz": enc.frame_rate_hz,
              "train_token_types": len(train_ids) if train_ids is not None else None, **summary,
              "items": {r.item: int(r.correct) for r in records}}
    if spelling is not None:
        report.update({"speller": str(speller), "aligner": str(aligner), "mix": mix_info,
                       "items_speller": {r.item: int(r.variants["speller"][0]) for r in records},
                       "items_mix": {r.item: int(r.variants["mix"][0]) for r in records},
                       "items_spelled": {r.item: int(bool(r.spelled)) for r in records},
                       "spelling_examples": examples, "paired": {}})
        ssr_items = report["items"]
        for c in summary["classes"]:
            keys = [r.item for r in records if c in r.classes]
            if keys:
                report["paired"][c] = {}
                for v in ("mix", "speller"):
                    pair = compare({k: bool(report[f"items_{v}"][k]) for k in keys},
                                   {k: bool(ssr_items[k]) for k in keys}, cluster=True)
                    report["paired"][c][f"{v}_vs_ssr"] = {**pair.to_json(), "line": pair.fmt(v, "SSR")}
    return report


def _choose_mix(spelling: Any, manifest: str | Path, cache_dir: str | Path, rows: int, reader_of: Any,
                batches: Any, table_unit: torch.Tensor, analysed: set[str]) -> dict[str, Any]:
    """The mix weight with the best token accuracy on the first ``rows`` rows of ``manifest`` (training rows; a
    row also ``analysed`` is refused)."""
    from speechlm.eval.spelling import choose_mix

    utts = _aligned_rows(manifest, cache_dir, limit=rows)
    shared = [u.id for u in utts if u.id in analysed]
    if shared:
        raise ConfigError(f"{manifest}: {len(shared)} row(s) to choose the mix weight on are also analysed: "
                          f"{_named(shared)}; choose it on training rows")
    spelling.check_cache(cache_dir)
    reader, enc = reader_of(cache_dir, utts)
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch, vectors, sv, spelled, _ in batches(reader, utts, enc.frame_rate_hz, "choose mix"):
        parts.append((vectors, sv, spelled, batch.token_ids[batch.token_mask].to(vectors.device)))
    ssr, sv, spelled, targets = (torch.cat([p[k] for p in parts]) for k in range(4))
    weight, grid = choose_mix(ssr, sv, spelled, targets, table_unit)
    return {"weight": weight, "chosen_on": str(manifest), "rows": len(utts), "tokens": int(targets.numel()),
            "grid": {str(w): round(a, 4) for w, a in grid.items()}}
