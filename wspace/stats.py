"""Paired comparisons over seeds: t intervals, the seeds x test-examples crossed bootstrap, Holm.

Compare two arms run on the same seeds by their paired differences ``d_s = arm_s -
baseline_s``: `paired_t` gives the 95% t interval of ``mean(d)`` and the two-sided p-value
against a null ``m0``; `mean_ci` the mean over seeds and its t half-width (the interval of
a table or a figure). When each seed's result is an accuracy on one shared test set, the
test set is a sample too: store each seed's per-example correctness (`pack_correct`) and
`crossed_bootstrap` resamples seeds *and* test examples. `holm` adjusts the p-values of a
family of comparisons. Only numpy and scipy: usable in a notebook on any list of numbers.

    import wspace as ws
    ci, p = ws.stats.paired_t(np.subtract(arm_accuracies, baseline_accuracies), 0.0)

References: Holm, "A simple sequentially rejective multiple test procedure", Scand. J.
Statist. 1979; Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 2007 (arXiv 0712.1111);
Agarwal, Schwarzer, Castro, Courville, Bellemare, "Deep reinforcement learning at the edge
of the statistical precipice" (rliable), NeurIPS 2021, arXiv 2108.13264.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

BOOTSTRAP_SEED = 20211206  # fixed: a stored bootstrap re-derives bit for bit
BOOTSTRAP_SAMPLES = 10_000


def paired_t(d: ArrayLike, null: float) -> tuple[list[float], float]:
    """95% t interval of ``mean(d)`` and the two-sided p-value of ``mean(d) = null``.

    ``t = (mean(d) - null) / (sd(d) / sqrt(S))`` with S - 1 degrees of freedom
    (`scipy.stats.ttest_1samp`; with ``d = arm - baseline`` the same as `ttest_rel` of the
    arm shifted by ``-null``); interval ``mean(d) ± t_{0.975, S-1} sd(d) / sqrt(S)``.

    Args:
      d: the S paired differences, one per seed (1-D).
      null: the mean under the null hypothesis (``-margin`` for "no worse by more than
        margin" when higher is better).

    Returns:
      ``([lo, hi], p)``. Fewer than two values: ``([-inf, inf], 1.0)``; identical values: a
      point interval and p = 0 (1 when they equal ``null``), the limit of the t-test as the
      spread vanishes.

    Reference: Student 1908; the paired test of Agarwal et al. 2021 (rliable) over runs.
    """
    from scipy import stats

    d = np.asarray(d, np.float64)
    if d.ndim != 1:
        raise ValueError(f"paired_t needs 1-D differences (one per seed), got shape {d.shape}")
    if len(d) < 2:
        return [-math.inf, math.inf], 1.0
    if np.all(d == d[0]):
        return [float(d[0])] * 2, float(d[0] == null)
    test = stats.ttest_1samp(d, null)
    ci = test.confidence_interval(0.95)
    return [float(ci.low), float(ci.high)], float(test.pvalue)


def mean_ci(values: ArrayLike, axis: int = 0) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Mean over seeds (``axis``) and the half-width of its 95% t interval.

    ``mean ± t_{0.975, S-1} sd / sqrt(S)``: the one interval of every table and figure.

    Args:
      values: numbers with seeds along ``axis``.
      axis: the seed axis.

    Returns:
      ``(mean, half_width)``, floats for 1-D ``values``, else arrays of the other axes;
      the half-width is NaN for one seed.

    Reference: Agarwal et al. 2021 (rliable), arXiv 2108.13264: report intervals over runs.
    """
    v = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    return v.mean(0), np.apply_along_axis(_t_half_width, 0, v) if v.ndim > 1 else _t_half_width(v)


def _t_half_width(values: np.ndarray, level: float = 0.95) -> float:
    """Half-width of the two-sided t interval of the mean of ``values`` (NaN for fewer than 2)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of m tests.

    With the p-values sorted ascending, ``p_holm_(i) = min(1, max_{j<=i} (m - j + 1) p_(j))``
    (i, j from 1); rejecting where ``p_holm <= alpha`` is Holm's procedure, which keeps the
    family-wise error rate at alpha under any dependence. The same as statsmodels
    ``multipletests(method="holm")``.

    Args:
      p_values: the m p-values, each in [0, 1] (may be empty).

    Returns:
      the adjusted p-values, in the order given.

    Reference: Holm, Scand. J. Statist. 6(2), 1979.
    """
    p = np.asarray(p_values, np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"holm needs a list of p-values in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted.tolist()


def pack_correct(correct: ArrayLike) -> dict:
    """Per-example correctness (bools, one per test example) as compact JSON.

    Args:
      correct: 1-D bool array, e.g. ``predictions == labels``.

    Returns:
      ``{"n": N, "bits": base64 of numpy.packbits(correct)}`` (N/8 bytes), to store in a
      seed's result (``result["test_correct"] = pack_correct(pred == y)``) for
      `crossed_bootstrap`; `unpack_correct` reads it back.

    Reference: Owen 2007, "The pigeonhole bootstrap": what a crossed bootstrap resamples.
    """
    bits = np.asarray(correct)
    if bits.ndim != 1 or bits.dtype != bool:
        raise ValueError(f"pack_correct needs a 1-D bool array, got {bits.dtype} {bits.shape}")
    return {"n": len(bits), "bits": base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")}


def unpack_correct(packed: Mapping) -> np.ndarray:
    """The bool array `pack_correct` stored.

    Args:
      packed: ``{"n": N, "bits": ...}`` as `pack_correct` returned it (or read from JSON).

    Returns:
      the N bools.

    Reference: Owen 2007, "The pigeonhole bootstrap".
    """
    raw = np.frombuffer(base64.b64decode(packed["bits"]), np.uint8)
    return np.unpackbits(raw, count=packed["n"]).astype(bool)


def crossed_bootstrap(examples: Mapping, null: float) -> tuple[list[float], float]:
    """95% percentile interval and two-sided p-value of the mean of D over seeds x examples.

    ``D[s, i] = correct_arm[s, i] - correct_baseline[s, i]`` on one test set shared by all
    seeds is a crossed design, so seeds and examples are resampled independently (Owen
    2007; rliable resamples runs the same way): B = `BOOTSTRAP_SAMPLES` replicates
    ``theta_b = w_b' D v_b / (S N)``, seed counts ``w_b ~ Multinomial(S)``, example counts
    ``v_b ~ Multinomial(N)``, from ``numpy.random.default_rng(BOOTSTRAP_SEED)`` in integer
    arithmetic (bit-exact on every machine with the same numpy). The p-value is
    ``min(1, 2 min(#{theta_b <= null} + 1, #{theta_b >= null} + 1) / (B + 1))``. Only the k
    examples where some seed disagrees carry weight, so example counts are drawn on them
    plus one bucket for the other N - k (the same multinomial).

    Args:
      examples: ``{"n": N, "wins": [[i, ...] per seed], "losses": [...]}``: the examples
        where only the arm is right (D = +1) and only the baseline (D = -1), per seed.
      null: the mean of D under the null hypothesis.

    Returns:
      ``([lo, hi], p)``: the 2.5% and 97.5% quantiles of ``theta_b`` and the p-value.

    Reference: Owen, Ann. Appl. Stat. 2007 (arXiv 0712.1111); Agarwal et al. 2021,
    arXiv 2108.13264.
    """
    n, seeds = examples["n"], len(examples["wins"])
    if seeds == 0 or len(examples["losses"]) != seeds:
        raise ValueError(f"crossed_bootstrap needs wins and losses for the same seeds (>= 1), "
                         f"got {seeds} and {len(examples['losses'])}")  # fmt: skip
    cols = sorted({i for s in (*examples["wins"], *examples["losses"]) for i in s})
    if not n >= 1 or (cols and not 0 <= cols[0] <= cols[-1] < n):
        raise ValueError(f"crossed_bootstrap: n={n} examples, indices {cols[:1]}..{cols[-1:]}; "
                         "indices must lie in [0, n)")  # fmt: skip
    index = {c: j for j, c in enumerate(cols)}
    d = np.zeros((seeds, len(cols)), np.int64)
    for s, (wins, losses) in enumerate(zip(examples["wins"], examples["losses"], strict=True)):
        d[s, [index[i] for i in wins]] = 1
        d[s, [index[i] for i in losses]] = -1
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    w = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=BOOTSTRAP_SAMPLES)
    pvals = [1 / n] * len(cols) + [(n - len(cols)) / n]
    chunk = max(1, 2**22 // (len(cols) + 1))  # bounded memory; fixed, so the stream is too
    totals = []
    for start in range(0, BOOTSTRAP_SAMPLES, chunk):
        rows = min(chunk, BOOTSTRAP_SAMPLES - start)
        v = rng.multinomial(n, pvals, size=rows)[:, : len(cols)]
        totals.append(np.einsum("bk,bk->b", w[start : start + rows] @ d, v))
    theta = np.concatenate(totals) / (seeds * n)
    below, above = np.sum(theta <= null), np.sum(theta >= null)
    p = min(1.0, 2 * (min(below, above) + 1) / (BOOTSTRAP_SAMPLES + 1))
    return [float(x) for x in np.quantile(theta, [0.025, 0.975])], float(p)
