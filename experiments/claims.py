"""Claims as data, judged over seeds with the paired tests of `wspace.stats`.

A claim is "``arm`` beats ``baseline`` on ``metric``" (or "is no worse by more than
``margin``"), declared as a frozen `Claim`. `judge` turns a list of them and the
per-seed results of `experiments.common.run_arms` into JSON-able dicts that store
the per-seed values and everything derived from them; `rejudge` re-derives the
derived fields from the stored values alone (``python -m experiments.report --verify``).

The test of one claim, with ``d_s = arm_s - baseline_s`` over the S seeds and
``m0 = -margin`` (``+margin`` when lower is better):

* ``paired t``: `wspace.stats.paired_t` of ``d`` against ``m0``; ``ci95`` its 95% interval.
* ``paired t + crossed bootstrap``, when each seed's result also stores per-example
  correctness on one shared test set (`wspace.stats.pack_correct`): the seeds x test-examples
  bootstrap `wspace.stats.crossed_bootstrap` of the per-example differences. The claim's
  ``p_value`` is the larger of the bootstrap and t p-values and ``ci95`` the hull of both
  intervals: test-set sampling can only widen the seed-level interval, and the t-test keeps
  the small-sample correction a bootstrap over ~10 seeds lacks.

`wspace.stats.holm` adjusts the p-values of all claims of one results file (`adjust`);
``verdict`` is "holds" / "does not hold" when ``p_holm < 0.05`` (by the side of
``diff_mean`` against ``m0``), else "inconclusive"; ``verdict_unadjusted`` uses ``p_value``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from wspace.stats import crossed_bootstrap, holm, paired_t, unpack_correct

ALPHA = 0.05
TOLERANCE = 1e-9  # relative; --verify tolerates last-digit libm differences only
_DERIVED = ("n", "arm_mean", "baseline_mean", "diff_mean", "ci95", "p_value", "p_holm")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim: ``arm`` beats ``baseline`` on ``metric`` (by more than ``-margin``).

    Attributes:
      text: the claim in one sentence, as the paper makes it.
      metric: a key (dotted path) into each seed's result, or ``fn(result) -> float``.
      arm, baseline: arm names in ``per_arm`` (paired by seed).
      higher_is_better: the direction of "better" for this metric.
      margin: for "no worse than" claims, the tolerated shortfall (>= 0).
      metric_name: display name (default: ``metric`` when it is a string).
      per_example: key of each seed's packed per-example correctness
        (`wspace.stats.pack_correct`)
        behind an accuracy ``metric``; the claim then also resamples test examples.
    """

    text: str
    metric: str | Callable[[dict], float]
    arm: str
    baseline: str
    higher_is_better: bool = True
    margin: float = 0.0
    metric_name: str | None = None
    per_example: str | None = None

    def __post_init__(self):
        if not self.margin >= 0 or math.isinf(self.margin):
            raise ValueError(f"Claim {self.text!r}: margin={self.margin}; must be finite and >= 0")
        if self.arm == self.baseline:
            raise ValueError(f"Claim {self.text!r}: arm and baseline are both {self.arm!r}")


# ----------------------------------------------------------------------------- statistics


def _differences(arm: list[dict], base: list[dict], key: str, values) -> dict:
    """Sparse per-seed D: where the arm alone is right (wins) and the baseline alone (losses)."""
    if any(key not in r for r in (*arm, *base)):
        raise ValueError(f"per_example {key!r} is missing from some seeds' results (stored by "
                         "an older run? delete those arms/ files and rerun)")  # fmt: skip
    a = np.stack([unpack_correct(r[key]) for r in arm])
    b = np.stack([unpack_correct(r[key]) for r in base])
    if a.shape != b.shape:
        raise ValueError(f"per_example {key!r}: arm has {a.shape}, baseline {b.shape} examples")
    for name, bits, v in (("arm", a, values[0]), ("baseline", b, values[1])):
        worst = np.max(np.abs(bits.mean(1) - np.asarray(v)))
        if worst > 0.5 / a.shape[1]:
            raise ValueError(f"per_example {key!r} of the {name} is {worst} off its metric")
    return {
        "n": a.shape[1],
        "wins": [np.flatnonzero(s).tolist() for s in a & ~b],
        "losses": [np.flatnonzero(s).tolist() for s in b & ~a],
    }


def _side(diff: float, null: float, higher_is_better: bool, p: float) -> str:
    if not p < ALPHA:
        return "inconclusive"
    return "holds" if (diff > null) == higher_is_better else "does not hold"


def statistics(claim: Mapping) -> dict:
    """The fields derived from a claim dict's stored values (all but the Holm ones)."""
    a = np.asarray(claim["arm_values"], np.float64)
    b = np.asarray(claim["baseline_values"], np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"claim {claim['claim']!r}: {len(a)} arm and {len(b)} baseline values")
    null = -claim["margin"] if claim["higher_is_better"] else claim["margin"]
    diff = a - b
    ci, p = paired_t(diff, null)
    out = {"n": len(a), "arm_mean": float(a.mean()), "baseline_mean": float(b.mean())}
    out.update(diff_mean=float(diff.mean()), ci95_t=ci, p_t=p)
    if "examples" in claim:
        ex = claim["examples"]
        pairs = zip(ex["wins"], ex["losses"], strict=True)
        counted = np.array([len(w) - len(lo) for w, lo in pairs]) / ex["n"]
        if counted.shape != diff.shape or np.max(np.abs(counted - diff)) > 1 / ex["n"]:
            raise ValueError(f"claim {claim['claim']!r}: its examples do not give its values")
        boot_ci, boot_p = crossed_bootstrap(ex, null)
        disagree = [len(w) + len(lo) for w, lo in zip(ex["wins"], ex["losses"], strict=True)]
        out.update(ci95_bootstrap=boot_ci, p_bootstrap=boot_p, disagreements=disagree)
        ci, p = [min(ci[0], boot_ci[0]), max(ci[1], boot_ci[1])], max(p, boot_p)
    out.update(ci95=ci, p_value=p)
    out["verdict_unadjusted"] = _side(out["diff_mean"], null, claim["higher_is_better"], p)
    return out


def adjust(claims: list[dict]) -> list[dict]:
    """Sets ``p_holm`` and ``verdict`` of every claim (in place) over the list; returns it."""
    for c, p in zip(claims, holm([c["p_value"] for c in claims]), strict=True):
        null = -c["margin"] if c["higher_is_better"] else c["margin"]
        c["p_holm"], c["verdict"] = p, _side(c["diff_mean"], null, c["higher_is_better"], p)
    return claims


# ----------------------------------------------------------------------------- judging


def metric_values(results: list[dict], metric) -> list[float]:
    """``metric`` of each seed's result: a key, a dotted path into it, or ``fn(result)``."""
    if callable(metric):
        return [float(metric(r)) for r in results]
    values = []
    for r in results:
        for part in metric.split("."):
            r = r[part]
        values.append(float(r))
    return values


def judge(
    claims: Sequence[Claim], per_arm: Mapping[str, list[dict]], *, skip_missing: bool = False
) -> list[dict]:
    """Judges ``claims`` over the seeds of ``per_arm`` (what `run_arms` returned), Holm included.

    Args:
      claims: the claims, in the order the results file lists them.
      per_arm: ``{arm: [result per seed, in seed order]}``.
      skip_missing: drop claims whose arm or baseline did not run (arms chosen by config);
        otherwise a missing arm is a ValueError naming it and the arms that ran.

    Returns:
      one JSON-able dict per claim: ``claim, metric, arm, baseline, higher_is_better,
      margin, arm_values, baseline_values`` (+ ``per_example, examples`` with per-example
      correctness), then `statistics` and the Holm fields of `adjust` over these claims
      (`experiments.common.save_results` re-adjusts over all claims of the file).
    """
    out = []
    for c in claims:
        missing = [a for a in (c.arm, c.baseline) if a not in per_arm]
        if missing and skip_missing:
            continue
        if missing:
            raise ValueError(f"claim {c.text!r}: no arm {missing}; arms run: {sorted(per_arm)}")
        a = metric_values(per_arm[c.arm], c.metric)
        b = metric_values(per_arm[c.baseline], c.metric)
        name = c.metric_name or (c.metric if isinstance(c.metric, str) else "metric")
        d = {"claim": c.text, "metric": name, "arm": c.arm, "baseline": c.baseline}
        d.update(higher_is_better=bool(c.higher_is_better), margin=float(c.margin))
        d.update(arm_values=a, baseline_values=b)
        if c.per_example is not None:
            d["per_example"] = c.per_example
            d["examples"] = _differences(per_arm[c.arm], per_arm[c.baseline], c.per_example, (a, b))
        out.append({**d, **statistics(d)})
    return adjust(out)


def rejudge(claims: Sequence[Mapping]) -> list[str]:
    """Re-derives every stored claim field from its stored values; returns the mismatches."""
    problems = []
    try:
        fresh = adjust([{**c, **statistics(c)} for c in claims])
    except (KeyError, ValueError) as e:
        return [f"cannot re-derive the claims: {type(e).__name__} {e} (an old-format file?)"]
    for i, (old, new) in enumerate(zip(claims, fresh, strict=True)):
        keys = [k for k in new if k in _DERIVED or k.startswith(("p_", "ci95", "verdict"))]
        keys += ["disagreements"] if "examples" in new else []
        for k in keys:
            if not _same(old.get(k), new[k]):
                problems.append(f"claim {i} ({old['claim']!r}): {k} stored {old.get(k)!r}, "
                                f"re-derived {new[k]!r}")  # fmt: skip
    return problems


def _same(a, b) -> bool:
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(b, float) and isinstance(a, int | float):
        return a == b or math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-15)
    return a == b
