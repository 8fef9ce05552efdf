"""The spelling path on speech: what the charCTC aligner heard inside each token's span, read by the speller.

For one utterance, the aligner's per-frame CTC log-posteriors and the tokens' boundaries (inclusive end frames
at the connector encoder's rate, converted to the aligner's rate with ``speechlm.data.boundaries``):

* token i's span is ``[boundary[i-1] + 1, boundary[i]]`` (the first token's starts at frame 0); a token that
  shares its boundary with the previous one (punctuation, a bare space) has an empty span;
* inside the span, the greedy CTC path (argmax per frame); every run of one non-blank label is one heard
  character, and its distribution is the mean posterior over the run's frames with the blank's mass removed
  and the rest renormalised: the token's soft spelling ``(c, V)``, label 0 (blank) always 0;
* an empty span or an all-blank one gives an empty spelling (``c = 0``): the speller has nothing to read and the
  token falls back to the SSR connector's vector (marked ``spelled = False``).

The combination of the two read-outs is ``unit(v_ssr) * (1 - w) + unit(v_spell) * w``, rescaled to the SSR
vector's norm; :func:`choose_mix` picks ``w`` from a grid by nearest-row accuracy on rows given to it (training
rows: never the rows being reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from speechlm.data.boundaries import convert_boundaries
from speechlm.errors import ModelError
from speechlm.models.speller import Speller, load_speller, pad_spellings

BLANK = 0
#: The default grid of mix weights :func:`choose_mix` tries.
MIX_GRID = tuple(round(0.1 * k, 1) for k in range(11))


def token_spans(boundaries: Sequence[int], boundary_rate_hz: float, aligner_rate_hz: float, num_frames: int
                ) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` aligner frames of each token (``start > end``: an empty span)."""
    if num_frames <= 0:
        return [(0, -1) for _ in boundaries]
    ends = convert_boundaries(boundaries, boundary_rate_hz, aligner_rate_hz, num_frames)
    out, prev = [], -1
    for e in ends:
        out.append((prev + 1, e))
        prev = max(prev, e)
    return out


def soft_spelling(log_probs: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The soft characters heard in frames ``[start, end]`` of ``log_probs`` (T, V): ``(c, V)``, c = 0 when the
    span is empty or its greedy path is all blank (see the module docstring)."""
    v = log_probs.shape[-1]
    if end < start:
        return log_probs.new_zeros(0, v)
    seg = log_probs[start: end + 1].float()
    best = seg.argmax(-1).tolist()
    chars = []
    t = 0
    while t < len(best):
        u = t
        while u + 1 < len(best) and best[u + 1] == best[t]:
            u += 1
        if best[t] != BLANK:
            p = seg[t: u + 1].exp().mean(0)
            p[BLANK] = 0.0
            chars.append(p / p.sum().clamp(min=1e-12))
        t = u + 1
    return torch.stack(chars) if chars else log_probs.new_zeros(0, v)


def heard_text(spelling: torch.Tensor, alphabet: Sequence[str]) -> str:
    """The most likely character of each heard position (for reading reports)."""
    return "".join(alphabet[i - 1] for i in spelling.argmax(-1).tolist() if 0 < i <= len(alphabet))


def mix_vectors(ssr: torch.Tensor, spell: torch.Tensor, w: float, spelled: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``unit(ssr) * (1 - w) + unit(spell) * w`` scaled to ``ssr``'s norm, row by row; rows not ``spelled`` keep
    ``ssr``."""
    mixed = F.normalize(ssr.float(), dim=-1) * (1.0 - w) + F.normalize(spell.float(), dim=-1) * w
    out = F.normalize(mixed, dim=-1) * ssr.float().norm(dim=-1, keepdim=True)
    if spelled is not None:
        out = torch.where(spelled.unsqueeze(-1), out, ssr.float())
    return out


def choose_mix(ssr: torch.Tensor, spell: torch.Tensor, spelled: torch.Tensor, targets: torch.Tensor,
               table_unit: torch.Tensor, grid: Sequence[float] = MIX_GRID, chunk: int = 1024
               ) -> tuple[float, dict[float, float]]:
    """(the weight of ``grid`` with the best nearest-row accuracy of the mixed vectors (the smallest on ties),
    {weight: accuracy}). ``ssr``, ``spell``: (n, d); ``spelled``, ``targets``: (n,). The cosine of a mixture
    with a unit row is a mix of the two cosines (up to the mixture's norm), so two products cover the grid."""
    n = ssr.shape[0]
    if n == 0:
        raise ModelError("no tokens to choose the mix weight on")
    correct = torch.zeros(len(grid))
    a_all, b_all = F.normalize(ssr.float(), dim=-1), F.normalize(spell.float(), dim=-1)
    for s in range(0, n, chunk):
        a = a_all[s: s + chunk] @ table_unit.T
        b = b_all[s: s + chunk] @ table_unit.T
        sp, tg = spelled[s: s + chunk], targets[s: s + chunk]
        for k, w in enumerate(grid):
            pred = torch.where(sp, (a * (1 - w) + b * w).argmax(-1), a.argmax(-1))
            correct[k] += (pred == tg).sum()
    acc = {float(w): float(c) / n for w, c in zip(grid, correct, strict=True)}
    best = max(acc.values())
    return min(w for w, a in acc.items() if a == best), acc


@dataclass
class SpellingPath:
    """A trained speller + the charCTC aligner whose characters it reads (``alignment.aligner.Aligner``)."""

    speller: Speller
    aligner: object

    @classmethod
    def load(cls, speller: str | Path, aligner: str | Path, feature_cache: str | Path, d_llm: int) -> SpellingPath:
        """Load both; refuses a non-charCTC aligner, a speller of another alphabet or LLM size, and a feature
        cache whose frames the aligner cannot read (ModelError naming the folder)."""
        from alignment.aligner import Aligner

        al = Aligner.from_pretrained(aligner, None)
        if al.kind.name != "charCTC":
            raise ModelError(f"{aligner}: a {al.kind.name} aligner; the spelling path reads a charCTC aligner")
        path = cls(load_speller(speller, alphabet=al.model.config.vocab, d_llm=d_llm), al)
        path.check_cache(feature_cache)
        return path

    def check_cache(self, feature_cache: str | Path) -> None:
        """Raise ModelError unless the aligner can read the frames cached in ``feature_cache``."""
        from alignment.features import open_frame_source

        open_frame_source(self.aligner, "", str(feature_cache))

    @property
    def alphabet(self) -> list[str]:
        return list(self.speller.config.alphabet)

    @torch.no_grad()
    def batch_vectors(self, features: torch.Tensor, frame_lengths: torch.Tensor, boundaries: torch.Tensor,
                      token_mask: torch.Tensor, boundary_rate_hz: float
                      ) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """Speller vectors ``(B, N, d_llm)`` (zeros where nothing was heard), ``spelled`` ``(B, N)`` bool and the
        heard text of each token, for a padded batch (``boundaries`` at ``boundary_rate_hz``)."""
        lp = self.aligner.frame_outputs(features.float(), frame_lengths)        # (B, T, V) CPU
        rate = float(self.aligner.frame_rate_hz)
        seqs: list[torch.Tensor] = []
        where: list[tuple[int, int]] = []
        heard: list[list[str]] = []
        for i in range(token_mask.shape[0]):
            n, t = int(token_mask[i].sum()), int(frame_lengths[i])
            t_al = max(1, round(t * rate / boundary_rate_hz)) if abs(rate - boundary_rate_hz) > 1e-9 else t
            row = []
            for j, (a, b) in enumerate(token_spans(boundaries[i, :n].tolist(), boundary_rate_hz, rate, t_al)):
                s = soft_spelling(lp[i, :t_al], a, b)
                row.append(heard_text(s, self.alphabet))
                if s.shape[0]:
                    seqs.append(s)
                    where.append((i, j))
            heard.append(row)
        b, n = token_mask.shape
        out = torch.zeros(b, n, self.speller.config.d_llm)
        spelled = torch.zeros(b, n, dtype=torch.bool)
        if seqs:
            chars, mask = pad_spellings(seqs, self.speller.config.num_labels, self.speller.config.max_chars)
            vec = self.speller.eval()(chars, mask).float()
            idx_i = torch.tensor([w[0] for w in where])
            idx_j = torch.tensor([w[1] for w in where])
            out[idx_i, idx_j] = vec
            spelled[idx_i, idx_j] = True
        return out, spelled, heard
