r"""The reproduction report: every method's headline comparison, measured, with verdicts.

  python -m experiments.report --workdir=runs/report                  # `make demo`, small size
  python -m experiments.report --workdir=/tmp/r --config=experiments/configs/report.py:quick
  python -m experiments.report --workdir=runs/report --publish       # also refresh the README
  python -m experiments.report --verify [--results_dir=DIR]          # re-derive every verdict
  python -m experiments.report --compare=runs/other                  # a rerun's verdicts vs ours
  python -m experiments.report --workdir=runs/other --publish --rerun=NAME  # file the rerun

Runs each method's experiment (``run(config, workdir)``) at the report's size
into ``workdir/<method>`` (resumable: finished arms and seeds are read back),
then writes ``report.md`` and ``report.html`` (figures inline) and prints the
verdict table. ``--publish`` copies each ``results.json`` to
``experiments/results/<method>.json`` and regenerates the README's result
blocks from those files (`readme_block`); the tests check that the README
matches them, so no number in it is typed by hand. ``--verify`` runs nothing: it
re-derives every claim's interval, p-value, Holm adjustment and verdict from the
stored per-seed values (`experiments.claims.rejudge`) and checks the README blocks,
exiting non-zero with one line per mismatch; `make test` runs it. A rerun of the demo on
another machine (or floating-point path) is compared claim by claim with ``--compare``
(`compare`: same verdict, to or from inconclusive, flipped) and, with ``--rerun=NAME``,
published under ``experiments/results/reruns/NAME/``, where ``--verify`` checks it too and
the README's ``reruns`` block shows it (`rerun_markdown`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import html
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from experiments import claims as claims_lib
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "experiments", "results")
RERUNS_DIR = os.path.join(RESULTS_DIR, "reruns")  # reruns/<name>/<method>.json: the demo rerun
README = os.path.join(ROOT, "README.md")

# What each method's paper claims, in one sentence, and where it comes from.
# Which verdict every table shows, and why (the report and the README say it).
VERDICT_RULE = (
    "Verdicts are Holm-adjusted within each method: a method makes several claims, and "
    "testing each at 5% alone would let about one in twenty claims without a real effect look "
    "decisive. A claim *holds* (or *does not hold*) when its Holm-adjusted p-value `p_holm` "
    "is below 0.05 and the mean paired difference is on the claimed (other) side, and is "
    "*inconclusive* otherwise; the unadjusted verdict is kept as `verdict_unadjusted`. "
    "p-values are paired t-tests over seeds; accuracy claims with per-example results also "
    "resample the test set (a seeds x test-examples bootstrap) and keep the larger p-value "
    "and the wider interval. `python -m experiments.report --verify` re-derives them all."
)

METHODS = {
    "late_phase": (
        "Late-phase weights",
        "von Oswald et al., ICLR 2021, arXiv 2007.12927",
        "Training a small subset of weights (BatchNorm affine, classifier) as a K-member "
        "ensemble late in training, then averaging the members in weight space, gives a "
        "better single network than plain SGD at the same cost.",
    ),
    "likelihood_ratio": (
        "Likelihood-ratio gradients (ULR)",
        "Jiang et al., ICLR 2024, arXiv 2305.08960",
        "Gradients from noise-injected forward passes alone train networks close to "
        "backprop's accuracy, and the trained networks are more robust to adversarial attacks.",
    ),
    "straight_through": (
        "Straight-through estimators for stochastic binary networks",
        "Shekhovtsov & Yanush, GCPR 2021, arXiv 2006.06880",
        "The principled straight-through estimator has far less bias than the identity ST "
        "estimator for stochastic binary networks and trains them better.",
    ),
    "lottery": (
        "Lottery tickets and iterative magnitude pruning",
        "Frankle & Carbin 2019, arXiv 1803.03635; Saleem et al. 2024, arXiv 2403.15022",
        "Iterative magnitude pruning with rewinding finds sparse subnetworks that train to "
        "the dense network's accuracy, where random re-initialisation and random pruning fail.",
    ),
    "invariant_path": (
        "Functionally invariant paths",
        "Raghavan & Thomson 2022, arXiv 2205.00334",
        "Moving weights along paths that keep the network's function while pursuing a "
        "second goal learns a new task with less forgetting, or sparsifies a network with "
        "less loss of accuracy, than naive fine-tuning or one-shot pruning.",
    ),
    "compose": (
        "Composing methods",
        "combinations no single paper made",
        "Late-phase members help a lottery ticket retrain, and forward-only ULR can retrain "
        "a pruned network, keeping pruned weights exactly zero throughout.",
    ),
    "train": (
        "Baseline training",
        "—",
        "Plain supervised training, the baseline every method is compared with.",
    ),
}


def run(config, workdir: str) -> dict:
    """Runs every method of ``config.methods`` at ``config.size``; writes the report files.

    ``config.jobs`` methods run at once, each as ``python -m experiments.<name>`` in its
    own process (its output in ``workdir/<name>.log``); with ``jobs=1`` they run here, in
    turn. A line on stderr tells when each starts and ends.
    """
    methods = _methods(config)
    if not (isinstance(config.jobs, int) and config.jobs >= 1):
        raise ValueError(f"config.jobs={config.jobs!r}; must be an int >= 1")
    if not (isinstance(config.seed, int) and config.seed >= 0):
        raise ValueError(f"config.seed={config.seed!r}; must be an int >= 0")
    os.makedirs(workdir, exist_ok=True)
    run_one = functools.partial(_run_method, config, workdir)
    if config.jobs == 1:
        all_results = {name: run_one(name) for name in methods}
    else:
        # the two longest first, so the short ones fill the other process's time
        first = sorted(methods, key=lambda n: n not in ("lottery", "late_phase"))
        with concurrent.futures.ThreadPoolExecutor(config.jobs) as pool:
            futures = {name: pool.submit(run_one, name) for name in first}
        all_results = {name: futures[name].result() for name in methods}
    seconds = {n: r["compute_seconds"] for n, r in all_results.items()}
    md = report_markdown(all_results, seconds)
    common.write_text(os.path.join(workdir, "report.md"), md)
    common.write_text(os.path.join(workdir, "report.html"), report_html(all_results, workdir))
    return {"size": config.size, "methods": all_results, "seconds": seconds}


def _run_method(config, workdir: str, name: str) -> dict:
    """One method's results: run here (``jobs=1``) or in a child process."""
    method_workdir, t = os.path.join(workdir, name), time.perf_counter()
    _say(f"[report] {name}: started")
    if config.jobs == 1:
        method_config = importlib.import_module(f"experiments.configs.{name}").get_config(
            config.size
        )
        method_config.progress, method_config.seed = config.progress, config.seed
        results = importlib.import_module(f"experiments.{name}").run(method_config, method_workdir)
    else:
        log = os.path.join(workdir, f"{name}.log")
        config_file = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
        cmd = [sys.executable, "-m", f"experiments.{name}", f"--workdir={method_workdir}",
               f"--config={config_file}:{config.size}",
               f"--config.progress={config.progress}", f"--config.seed={config.seed}"]  # fmt: skip
        with open(log, "w") as out:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        if code:
            with open(log) as f:
                last = (f.read().strip().splitlines() or [""])[-1]
            raise RuntimeError(f"{name} exited with {code} ({log}): {last}")
        results = common.read_json(os.path.join(method_workdir, "results.json"))
    _say(f"[report] {name}: done in {time.perf_counter() - t:.0f} s")
    return results


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: lines of two threads stay apart
    sys.stderr.flush()


def _methods(config) -> list[str]:
    names = [m.strip() for m in config.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"config.methods has {unknown or names}; choose from {sorted(METHODS)}")
    return names


def format_number(x: float) -> str:
    """Compact: 0.973, 0.0051, 12.3, 5.1e-05."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–" if x is None else str(x)
    if x != 0 and (abs(x) < 1e-4 or abs(x) >= 1e4):
        return f"{x:.2e}"
    if abs(x) < 1e-2:
        return f"{x:.4f}"
    return f"{x:.3g}" if abs(x) >= 1 else f"{x:.3f}"


def claims_markdown(results: Mapping) -> str:
    """The claims of one results.json as a markdown table (Holm-adjusted p and verdict)."""
    columns = ["claim", "metric", "arm", "baseline", "difference (95% CI)", "n", "p (Holm)"]
    rows = [
        [c["claim"], c["metric"], format_number(c["arm_mean"]),
         format_number(c["baseline_mean"]), _difference(c), c["n"], _p_holm(c),
         f"**{c['verdict']}**"]
        for c in results["claims"]
    ]  # fmt: skip
    return markdown_table([*columns, "verdict"], rows)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _difference(claim: Mapping) -> str:
    """The mean paired difference and its 95% interval: ``0.012 [0.004, 0.02]``."""
    lo, hi = claim["ci95"]
    return f"{format_number(claim['diff_mean'])} [{format_number(lo)}, {format_number(hi)}]"


def _p_holm(claim: Mapping) -> str:
    return format_number(claim["p_holm"]) if "p_holm" in claim else "–"  # old files: no p


def table_markdown(table: Mapping) -> str:
    """A `summarize`-style table (cells may be [mean, half-width] or scalars) as markdown."""

    def cell(v):
        if isinstance(v, list | tuple) and len(v) == 2:
            return f"{format_number(v[0])} ± {format_number(v[1])}"
        return format_number(v) if isinstance(v, float) else v

    return markdown_table(table["columns"], [[cell(v) for v in row] for row in table["rows"]])


def verdict_table(all_results: dict) -> str:
    """One row per claim of every method: the difference, its interval, p_holm, the verdict."""
    columns = ["method", "claim", "arm vs baseline", "difference (95% CI)", "p (Holm)", "verdict"]
    rows = [
        [name, c["claim"], f"{c['arm']} vs {c['baseline']} ({c['metric']})", _difference(c),
         _p_holm(c), f"**{c['verdict']}**"]
        for name, results in all_results.items()
        for c in results["claims"]
    ]  # fmt: skip
    return markdown_table(columns, rows)


def verdict_summary(all_results: dict) -> str:
    """One row per method: how many of its claims hold, do not hold, are inconclusive."""
    rows = []
    for name, results in all_results.items():
        claims = results["claims"]
        if claims:
            count = [sum(c["verdict"] == v for c in claims) for v in common.VERDICTS]
            first = f"{claims[0]['claim']}: **{claims[0]['verdict']}**"
            rows.append([METHODS[name][0], len(claims), *count, first])
    columns = ["method", "claims", *common.VERDICTS, "first claim: verdict"]
    return markdown_table(columns, rows)


def method_markdown(name: str, results: dict, figure_dir: str | None = None) -> str:
    """One method's section: the claim, the measured claims table, tables, notes, figures."""
    title, paper, claim = METHODS[name]
    parts = [f"**Paper:** {paper}. **Claim:** {claim}"]
    size = f"{results['size']} size, seeds {results['seeds']}, dataset {results['dataset']}"
    if results["smoke"]:
        size += f" — **{common.SMOKE_STAMP}**"
    parts.append(f"*Measured at {size}.*")
    if results["claims"]:
        parts.append(claims_markdown(results))
    for caption, table in results["tables"].items():
        caption = f"*{caption}* (mean ± 95% half-width over seeds)"
        parts.append(f"{caption}\n\n{table_markdown(table)}")
    parts += [f"- {n}" for n in results["notes"]]
    if figure_dir is not None:
        parts += [f"![{f}]({figure_dir}/{f})" for f in results["figures"]]
    return "\n\n".join(parts)


def report_markdown(all_results: dict, seconds: dict | None = None) -> str:
    """The whole report as markdown (figures linked relative to the report's folder).

    ``seconds``: per method, the compute time stored with its arms (None: not recorded).
    """
    sizes = {r["size"] for r in all_results.values()}
    parts = ["# wspace reproduction report", f"Size: {', '.join(sorted(sizes))}."]
    if any(r["smoke"] for r in all_results.values()):
        stamp = common.SMOKE_STAMP.capitalize()
        parts.append(f"**{stamp}**: quick-size runs check the code paths only.")
    parts += ["## Summary", VERDICT_RULE, verdict_summary(all_results)]
    parts += ["## Verdicts", verdict_table(all_results)]
    for name, results in all_results.items():
        took = (seconds or {}).get(name)
        took = f" ({took:.0f} s of compute, timed when its arms ran)" if took else ""
        parts += [f"## {METHODS[name][0]}{took}", method_markdown(name, results, name)]
    parts += ["## Provenance", provenance_markdown(all_results)]
    return "\n\n".join(parts) + "\n"


def provenance_markdown(all_results: dict) -> str:
    """One row per method: commit, versions, backend and machine, date (from results.json)."""
    rows = []
    for name, results in all_results.items():
        p = results.get("provenance")
        if p is None:
            rows.append([name, "not recorded (an older results file)", "", "", "", "", ""])
            continue
        commit = (p["commit"] or "no git")[:10] + (" (dirty)" if p["dirty"] else "")
        versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)
        backend = f"{p['backend']}, {p['device_kind']}"
        rows.append([name, commit, versions, backend, p["cpu"], p["python"], p["date"]])
    columns = ["method", "commit", "versions", "backend, device", "CPU", "Python", "date"]
    return markdown_table(columns, rows)


def report_html(all_results: dict, workdir: str) -> str:
    """The report as one self-contained HTML file: `report_markdown`'s content, figures
    embedded as data URIs."""
    body = [_html_block(b, workdir) for b in report_markdown(all_results).split("\n\n")]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}"
    )
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>\n" + "\n".join(body)


def _html_block(block: str, workdir: str) -> str:
    """One markdown block of the report (heading, table, figure or paragraph) as HTML."""
    if block.startswith("#"):
        level = len(block) - len(block.lstrip("#"))
        return f"<h{level}>{_inline(block.lstrip('# '))}</h{level}>"
    if block.startswith("|"):
        return _html_table(block)
    figure = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", block)
    if figure:
        with open(os.path.join(workdir, figure.group(2)), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        return f"<img alt='{html.escape(figure.group(1))}' src='data:image/png;base64,{data}'>"
    return "\n".join(f"<p>{_inline(line)}</p>" for line in block.split("\n"))


def _inline(text: str) -> str:
    """Markdown emphasis and code spans as HTML (the text escaped)."""
    text = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(text))
    text = re.sub(r"[*](.+?)[*]", r"<i>\1</i>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html_table(markdown: str) -> str:
    rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in markdown.splitlines()]
    rows = [r for r in rows if not set("".join(r)) <= set("-|")]
    header = "".join(f"<th>{_inline(s)}</th>" for s in rows[0])
    out = ["<table>", f"<tr>{header}</tr>"]
    out += ["<tr>" + "".join(f"<td>{_inline(s)}</td>" for s in r) + "</tr>" for r in rows[1:]]
    return "\n".join(out + ["</table>"])


# ----------------------------------------------------------------------------- README


def readme_block(name: str, results: dict) -> str:
    """The README's block of one method, from its results.json.

    Its claims with intervals and verdicts, its first (headline) table and its
    notes; the other tables and the figures are in the report (`make demo`).
    """
    size = f"{results['size']} size, seeds {results['seeds']}, dataset {results['dataset']}"
    parts = [f"*Measured at {size} (`make demo`).*", claims_markdown(results)]
    for caption, table in list(results["tables"].items())[:1]:
        caption = f"*{caption}* (mean ± 95% half-width over seeds)"
        parts.append(f"{caption}\n\n{table_markdown(table)}")
    parts += [f"- {n}" for n in results["notes"]]
    return "\n\n".join(parts)


def published_results() -> dict[str, dict]:
    """The results.json files committed under ``experiments/results/``."""
    return _read_dir(RESULTS_DIR)


def _read_dir(directory: str) -> dict[str, dict]:
    """Results by method, in the report's order: ``directory/<method>.json`` (published) or
    ``directory/<method>/results.json`` (a report's workdir)."""
    if not os.path.isdir(directory):
        return {}
    paths = {f[: -len(".json")]: os.path.join(directory, f)
             for f in os.listdir(directory) if f.endswith(".json")}  # fmt: skip
    paths |= {n: os.path.join(directory, n, "results.json") for n in METHODS
              if os.path.exists(os.path.join(directory, n, "results.json"))}  # fmt: skip
    order = list(METHODS) + sorted(set(paths) - set(METHODS))
    return {n: common.read_json(paths[n]) for n in order if n in paths}


def _read_reruns() -> dict[str, dict[str, dict]]:
    """Each published rerun (``experiments/results/reruns/<name>/``) by name: its results
    by method."""
    names = sorted(os.listdir(RERUNS_DIR)) if os.path.isdir(RERUNS_DIR) else []
    return {n: _read_dir(os.path.join(RERUNS_DIR, n)) for n in names}


# ----------------------------------------------------------------------------- reruns

# how a claim's verdict in a rerun relates to the published one (see `compare`)
CHANGES = ("same", "inconclusive", "flipped", "missing")


def compare(published: Mapping[str, dict], rerun: Mapping[str, dict]) -> list[dict]:
    """Each published claim beside the same claim of a rerun (same method, text, arms and
    metric): ``{"method", "published", "rerun", "change"}``, where ``change`` is "same"
    (the same verdict), "inconclusive" (one of the two verdicts is inconclusive), "flipped"
    (holds against does not hold) or "missing" (the rerun lacks the claim)."""
    key = lambda c: (c["claim"], c["arm"], c["baseline"], c["metric"])  # noqa: E731
    rows = []
    for name, results in published.items():
        others = {key(c): c for c in rerun.get(name, {}).get("claims", [])}
        for claim in results["claims"]:
            other = others.get(key(claim))
            verdicts = {claim["verdict"], other["verdict"]} if other else set()
            change = ("missing" if other is None else "same" if len(verdicts) == 1
                      else "inconclusive" if "inconclusive" in verdicts else "flipped")  # fmt: skip
            rows.append({"method": name, "published": claim, "rerun": other, "change": change})
    return rows


def rerun_markdown(name: str, published: Mapping[str, dict], rerun: Mapping[str, dict]) -> str:
    """A rerun against the published results: where and how it ran, how many verdicts
    stayed, and every claim whose verdict changed."""
    rows = compare(published, rerun)
    counts = {k: sum(r["change"] == k for r in rows) for k in CHANGES}
    first = next(iter(rerun.values()), {})  # every method of a rerun ran at one commit
    p, seeds = first.get("provenance") or {}, first.get("seeds") or []
    where = (f"seeds {seeds[0]}-{seeds[-1]}, " if seeds else "") + (
             f"commit {(p.get('commit') or 'no git')[:10]}, {p.get('backend')} "
             f"({p.get('cpu')}), XLA_FLAGS={p.get('xla_flags') or 'unset'}")  # fmt: skip
    values = lambda c: c["arm_values"] + c["baseline_values"]  # noqa: E731
    moved = [r for r in rows if r["rerun"] and values(r["rerun"]) != values(r["published"])]
    summary = (f"**{name}** ({where}): of {len(rows)} published claims, {counts['same']} keep "
               f"their verdict, {counts['inconclusive']} move between a decisive verdict and "
               f"inconclusive, {counts['flipped']} flip between holds and does not hold, "
               f"{counts['missing']} are missing; the per-seed values differ from the "
               f"published ones in {len(moved)} claims (methods: "
               f"{', '.join(dict.fromkeys(r['method'] for r in moved)) or 'none'}).")  # fmt: skip
    changed = [
        [r["method"], r["published"]["claim"], *(f"{_difference(c)}, p {_p_holm(c)}: "
         f"**{c['verdict']}**" for c in (r["published"], r["rerun"]))]
        for r in rows if r["change"] in ("inconclusive", "flipped")
    ]  # fmt: skip
    if not changed:
        return summary
    return summary + "\n\n" + markdown_table(["method", "claim", "published", name], changed)


def render_readme(text: str, all_results: dict, reruns: dict | None = None) -> str:
    """``text`` with every ``<!-- results:NAME -->...<!-- /results:NAME -->`` block regenerated
    (``reruns``: the ``reruns`` block's `rerun_markdown` of each, by name)."""

    def replace(match):
        name = match.group(1)
        if name == "verdicts":
            body = f"{VERDICT_RULE}\n\n{verdict_summary(all_results)}"
        elif name == "reruns" and reruns:
            body = "\n\n".join(rerun_markdown(n, all_results, r) for n, r in reruns.items())
        elif name in all_results:
            body = readme_block(name, all_results[name])
        else:
            return match.group(0)
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", replace, text, flags=re.S)


def publish(workdir: str, readme: str = README, rerun: str | None = None) -> None:
    """Copies ``workdir/<method>/results.json`` to experiments/results/ (or, for a ``rerun``
    of the published demo on another machine, to ``experiments/results/reruns/<rerun>/``)
    and refreshes the README."""
    _check_rerun_name(rerun)
    dest = RESULTS_DIR if rerun is None else os.path.join(RERUNS_DIR, rerun)
    os.makedirs(dest, exist_ok=True)
    for name in METHODS:
        src = os.path.join(workdir, name, "results.json")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest, f"{name}.json"))
    with open(readme) as f:
        text = f.read()
    common.write_text(readme, render_readme(text, published_results(), _read_reruns()))


def verify(results_dir: str = RESULTS_DIR, readme: str | None = README) -> list[str]:
    """Re-derives every claim of ``results_dir/*.json`` and checks the README's blocks.

    Returns one line per mismatch (empty: all verified): a claim field that the stored
    per-seed values do not give (`experiments.claims.rejudge`), a file without
    provenance, or a README result block that differs from the files.
    """
    all_results = _read_dir(results_dir)
    if not all_results:
        return [f"{results_dir}: no results files"]
    problems = _verify_files(results_dir, all_results)
    if readme is not None:  # the published results: their reruns too
        reruns = _read_reruns()
        for name, rerun in reruns.items():
            problems += _verify_files(os.path.join(RERUNS_DIR, name), rerun)
        with open(readme) as f:
            text = f.read()
        if render_readme(text, all_results, reruns) != text:
            problems.append(f"{readme}: result blocks differ from {results_dir} (--publish)")
        problems += [
            f"{readme}: no block <!-- results:{n} -->"
            for n in all_results
            if f"<!-- results:{n} -->" not in text
        ]
    return problems


def _check_rerun_name(rerun: str | None) -> None:
    if rerun is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", rerun):
        raise ValueError(f"rerun name {rerun!r}: use letters, digits, '_' and '-'")


def _verify_files(directory: str, all_results: dict) -> list[str]:
    """Each file's claims re-derived from its stored values, and its provenance."""
    problems = []
    for name, results in all_results.items():
        where = os.path.join(directory, f"{name}.json")
        problems += [f"{where}: {p}" for p in claims_lib.rejudge(results["claims"])]
        if not results.get("provenance"):
            problems.append(f"{where}: no provenance")
    return problems


def main(argv):
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    if FLAGS.compare:
        rerun = _read_dir(FLAGS.compare)
        if not rerun:
            raise SystemExit(f"--compare={FLAGS.compare}: no results files there")
        published = _read_dir(FLAGS.results_dir)
        name = os.path.basename(os.path.normpath(FLAGS.compare))
        print(rerun_markdown(name, published, rerun))
        changes = compare(published, rerun)
        raise SystemExit(1 if any(r["change"] == "flipped" for r in changes) else 0)
    if FLAGS.verify:
        same = os.path.realpath(FLAGS.results_dir) == os.path.realpath(RESULTS_DIR)
        readme = README if same else None
        problems = verify(FLAGS.results_dir, readme)
        print("\n".join(problems) or f"verified: every claim in {FLAGS.results_dir}")
        raise SystemExit(1 if problems else 0)
    if FLAGS.rerun is not None and not FLAGS.publish:
        raise SystemExit("--rerun=NAME names what --publish files: add --publish")
    try:
        _check_rerun_name(FLAGS.rerun)  # before any training
    except ValueError as e:
        raise SystemExit(f"report: {e}") from None
    report = run(FLAGS.config, FLAGS.workdir)
    print("\n" + verdict_table(report["methods"]))
    total = sum(s for s in report["seconds"].values() if s)
    print(
        f"\nreport ({report['size']} size, {total / 60:.1f} min of stored compute): "
        f"{os.path.join(FLAGS.workdir, 'report.md')} and report.html"
    )
    if FLAGS.publish:
        publish(FLAGS.workdir, rerun=FLAGS.rerun)
        where = RESULTS_DIR if FLAGS.rerun is None else os.path.join(RERUNS_DIR, FLAGS.rerun)
        print(f"published to {where} and README.md")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", "runs/report", "Output directory (resumes if it exists).")
    flags.DEFINE_bool("publish", False, "Copy results to experiments/results/ and refresh README.")
    flags.DEFINE_bool("verify", False, "Re-derive every verdict of --results_dir; run nothing.")
    flags.DEFINE_string("results_dir", RESULTS_DIR, "The results --verify and --compare read.")
    flags.DEFINE_string("rerun", None, "With --publish: publish as a rerun of that name.")
    flags.DEFINE_string("compare", None, "A rerun's workdir: compare its verdicts with "
                        "--results_dir's; exit 1 if any flips.")  # fmt: skip
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(__file__), "configs", "report.py:small"),
        "Report config, with :quick | :small | :paper.",
    )
    app.run(main)
