"""Paired comparisons of two systems on the same items: accuracy difference, its interval, McNemar's test.

Two accuracies measured on the same stories or questions are not independent: most items are right (or
wrong) for both, and only the discordant items carry the difference. Comparing two separate Wilson
intervals wastes that and calls real gaps noise; these functions use the pairing.

* :func:`mcnemar_p`: exact two-sided McNemar test on the discordant counts ``b`` (A right, B wrong) and ``c``
  (A wrong, B right): under "no difference" each discordant item is a fair coin, so the p-value is a binomial
  tail (exact at any size; no continuity correction needed).
* :func:`paired_bootstrap`: percentile interval of ``mean(A) - mean(B)`` and of the ratio ``mean(A) / mean(B)``
  (speech/text parity), resampling *items* (both outcomes of an item stay together), seeded.
* :func:`compare`: both, on two ``{item id: right?}`` maps, over the items they share (an item missing from
  either side is dropped and counted, never imputed); for tokens of utterances, whole utterances are resampled
  (``cluster=True``), since the tokens of one utterance are not independent.

A difference whose interval contains 0 is inside the noise at 95% and is reported as such (``significant``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from speechlm.errors import ConfigError


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant items (1.0 when there are none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # P(X <= k) for X ~ Binomial(n, 1/2), doubled (the distribution is symmetric), capped at 1. In integers: 2.0**n
    # overflows a float past n = 1023 (token-level comparisons have thousands of discordant tokens), and an int
    # divided by an int is rounded once, correctly, even when the quotient underflows.
    term = total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1)
        total += term
    return min(1.0, 2 * total / (1 << n))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0,
                     level: float = 0.95, groups: np.ndarray | None = None) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of ``mean(a) - mean(b)`` and ``mean(a) / mean(b)`` over item resamples.

    ``a``, ``b``: (n,) outcomes (0/1 or any per-item score) of the same n items in the same order. ``groups``
    (n,) (optional) names each item's cluster, e.g. the utterance of a token: then whole clusters are resampled
    (a cluster bootstrap), since items of one cluster are not independent and resampling them one by one would
    make the interval too narrow. The ratio's interval is None when some resample has ``mean(b) == 0``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n == 0:
        return {"diff": None, "ratio": None}
    if groups is not None:  # sums and sizes per cluster; a resample's mean = its summed outcomes / its items
        _, gi = np.unique(np.asarray(groups), return_inverse=True)
        size = np.bincount(gi).astype(np.float64)
        a, b, weight = np.bincount(gi, a), np.bincount(gi, b), size
    else:
        weight = np.ones(n)
    k = a.shape[0]
    rng = np.random.default_rng(seed)
    alpha = (1.0 - level) / 2.0
    ma, mb = np.zeros(resamples), np.zeros(resamples)
    for start in range(0, resamples, 1000):  # chunks bound the index matrix to 1000 x k
        idx = rng.integers(0, k, size=(min(1000, resamples - start), k))
        w = weight[idx].sum(1)
        ma[start:start + len(idx)], mb[start:start + len(idx)] = a[idx].sum(1) / w, b[idx].sum(1) / w
    diff = ma - mb
    out: dict[str, tuple[float, float] | None] = {
        "diff": (float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha)))}
    if np.all(mb > 0):
        ratio = ma / mb
        out["ratio"] = (float(np.quantile(ratio, alpha)), float(np.quantile(ratio, 1 - alpha)))
    else:
        out["ratio"] = None
    return out


@dataclass
class PairedComparison:
    """A against B on ``n`` shared items (accuracies as fractions)."""

    n: int
    acc_a: float
    acc_b: float
    diff: float  # acc_a - acc_b
    diff_ci95: tuple[float, float] | None
    ratio: float | None  # acc_a / acc_b (parity when B is the text condition)
    ratio_ci95: tuple[float, float] | None
    a_only: int  # items A gets right and B wrong (McNemar's b)
    b_only: int  # items B gets right and A wrong (c)
    p_mcnemar: float
    dropped: int = 0  # items present on one side only

    @property
    def significant(self) -> bool:
        """The 95% interval of the difference excludes 0."""
        lo_hi = self.diff_ci95
        return lo_hi is not None and (lo_hi[0] > 0 or lo_hi[1] < 0)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("acc_a", "acc_b", "diff", "ratio", "p_mcnemar"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        for k in ("diff_ci95", "ratio_ci95"):
            if d[k] is not None:
                d[k] = [round(x, 4) for x in d[k]]
        d["significant"] = self.significant
        return d

    def fmt(self, a: str = "A", b: str = "B") -> str:
        """One line: ``A - B = +3.1 points [-1.2, +7.4] (n=300, 25 vs 16 discordant, McNemar p=0.21)``."""
        ci = self.diff_ci95
        ci_s = f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "[n/a]"
        verdict = "" if self.significant else "; inside the noise"
        return (f"{a} - {b} = {100 * self.diff:+.1f} points {ci_s} (n={self.n}, {self.a_only} vs {self.b_only} "
                f"discordant, McNemar p={self.p_mcnemar:.3g}{verdict})")


def compare(a: Mapping[str, bool], b: Mapping[str, bool], resamples: int = 10000, seed: int = 0,
            cluster: bool = False) -> PairedComparison:
    """Paired comparison of two ``{item id: right?}`` maps over their shared items (in ``a``'s order).

    ``cluster``: item ids are ``"<cluster>/<index>"`` (e.g. tokens of an utterance) and the interval resamples
    whole clusters (see :func:`paired_bootstrap`); McNemar's test still counts items."""
    shared = [k for k in a if k in b]
    dropped = len(set(a) ^ set(b))
    if not shared:
        raise ConfigError(f"no item in common between the two result sets ({len(a)} and {len(b)} items): "
                          "a paired comparison needs the same items scored by both systems")
    x = np.array([bool(a[k]) for k in shared], dtype=np.float64)
    y = np.array([bool(b[k]) for k in shared], dtype=np.float64)
    groups = np.array([k.rsplit("/", 1)[0] for k in shared]) if cluster else None
    boot = paired_bootstrap(x, y, resamples, seed, groups=groups)
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    acc_a, acc_b = float(x.mean()), float(y.mean())
    return PairedComparison(
        n=len(shared), acc_a=acc_a, acc_b=acc_b, diff=acc_a - acc_b, diff_ci95=boot["diff"],
        ratio=acc_a / acc_b if acc_b > 0 else None, ratio_ci95=boot["ratio"], a_only=a_only, b_only=b_only,
        p_mcnemar=mcnemar_p(a_only, b_only), dropped=dropped)


# ------------------------------------------------------------------------------------- two reports
def _row_key(row: Mapping) -> tuple[str, str, str, str, str]:
    return (row["task"], row["condition"], row["connector"], row["boundaries"], row["scoring"])


def compare_reports(a: Mapping, b: Mapping, task: str = "", condition: str = "", scoring: str = "",
                    same_connector: bool = False, resamples: int = 10000, items_a: str = "items",
                    items_b: str = "items", condition_b: str = "") -> list[tuple[str, PairedComparison]]:
    """Rows of two evaluation reports (the JSON of :func:`speechlm.eval.report.write_report`) compared item by item.

    Rows are matched on task, condition, boundaries and scoring (and the connector too with ``same_connector``;
    by default the two reports' connectors may differ, as in an A/B of two runs); ``task``, ``condition`` and
    ``scoring`` filter them (a prefix of the task, e.g. ``storycloze/adversarial``). Rows without per-item
    outcomes (reports written before they were recorded) are skipped. Two stage-1 token analyses
    (speechlm.eval.token_analysis: a top-level ``items`` map, one entry per validation token) are compared token by
    token; ``items_a`` / ``items_b`` name another of their item maps (``items_mix``, ``items_speller``: the
    spelling path's read-outs), so that one analysis can be compared with itself (the mix against SSR).
    ``condition_b`` compares A's ``condition`` with another condition of B's, matched on task and scoring only
    (e.g. a connector's ``s2t`` against the LLM's ``endings`` alone: what the spoken context adds over none).
    Returns ``[(label, comparison)]``.
    """
    if isinstance(a.get(items_a), Mapping) and isinstance(b.get(items_b), Mapping):
        name_a = a.get("connector", "A") + ("" if items_a == "items" else f" [{items_a}]")
        name_b = b.get("connector", "B") + ("" if items_b == "items" else f" [{items_b}]")
        label = f"nearest-token accuracy: {name_a} vs {name_b} (interval: utterances resampled)"
        return [(label, compare({k: bool(v) for k, v in a[items_a].items()},
                                {k: bool(v) for k, v in b[items_b].items()}, resamples, cluster=True))]
    if items_a != "items" or items_b != "items":
        raise ConfigError(f"item maps {items_a!r} / {items_b!r}: not in both reports (token analyses only)")
    across = bool(condition_b) and condition_b != condition
    if across and not condition:
        raise ConfigError(f"condition_b {condition_b!r} needs A's condition too")

    def wanted(r: Mapping, cond: str = condition) -> bool:
        return (r.get("items") is not None and r["task"].startswith(task)
                and (not cond or r["condition"] == cond) and (not scoring or r["scoring"] == scoring))

    def key(r: Mapping) -> tuple:
        k = _row_key(r)
        if across:  # two conditions: the same task and scoring; any connector and boundaries
            return k[0], k[4]
        return k if same_connector else k[:2] + k[3:]

    rows_b: dict[tuple, list[Mapping]] = {}
    for r in b.get("results", []):
        if wanted(r, condition_b or condition):
            rows_b.setdefault(key(r), []).append(r)
    out = []
    for r in a.get("results", []):
        if not wanted(r):
            continue
        for other in rows_b.get(key(r), []):
            if across and same_connector and r["connector"] != other["connector"]:
                continue
            if not across and not same_connector and (r["connector"] == "llm") != (other["connector"] == "llm"):
                continue  # the LLM alone is compared with the LLM alone, a connector with a connector
            label = f"{r['task']} {r['condition']} {r['scoring']}: {r['connector']} vs {other['connector']}"
            if across:
                label = f"{r['task']} {r['scoring']}: {r['connector']} {r['condition']} vs {other['connector']} " \
                        f"{other['condition']}"
            items_a = {k: bool(v) for k, v in r["items"].items()}
            items_b = {k: bool(v) for k, v in other["items"].items()}
            out.append((label, compare(items_a, items_b, resamples)))
    return out
