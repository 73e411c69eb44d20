r"""The reproduction report: every method's headline comparison, measured, with verdicts.

  python -m experiments.report --workdir=runs/report                  # `make demo`, small size
  python -m experiments.report --workdir=/tmp/r --config=experiments/configs/report.py:quick
  python -m experiments.report --workdir=runs/report --publish       # also refresh the README

Runs each method's experiment (``run(config, workdir)``) at the report's size
into ``workdir/<method>`` (resumable: finished arms and seeds are read back),
then writes ``report.md`` and ``report.html`` (figures inline) and prints the
verdict table. ``--publish`` copies each ``results.json`` to
``experiments/results/<method>.json`` and regenerates the README's result
blocks from those files (`readme_block`); the tests check that the README
matches them, so no number in it is typed by hand.
"""

from __future__ import annotations

import base64
import html
import importlib
import os
import re
import shutil
import time

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "experiments", "results")

# What each method's paper claims, in one sentence, and where it comes from.
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
    """Runs every method of ``config.methods`` at ``config.size``; writes the report files."""
    methods = _methods(config)
    os.makedirs(workdir, exist_ok=True)
    all_results, seconds = {}, {}
    for name in methods:
        method_config = importlib.import_module(f"experiments.configs.{name}").get_config(
            config.size
        )
        method_config.progress = config.progress
        t0 = time.time()
        all_results[name] = importlib.import_module(f"experiments.{name}").run(
            method_config, os.path.join(workdir, name)
        )
        seconds[name] = time.time() - t0
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    md = report_markdown(all_results, seconds)
    common.write_text(os.path.join(workdir, "report.md"), md)
    common.write_text(os.path.join(workdir, "report.html"), report_html(all_results, workdir))
    return {"size": config.size, "methods": all_results, "seconds": seconds}


def _methods(config) -> list[str]:
    names = [m.strip() for m in config.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"config.methods has {unknown or names}; choose from {sorted(METHODS)}")
    return names


def verdict_table(all_results: dict) -> str:
    """One row per claim of every method: the measured difference, its interval, the verdict."""
    lines = [
        "| method | claim | arm vs baseline | difference (95% CI) | verdict |",
        "|---|---|---|---|---|",
    ]
    fmt = common.format_number
    for name, results in all_results.items():
        for c in results["claims"]:
            lo, hi = c["ci95"]
            lines.append(
                f"| {name} | {c['claim']} | {c['arm']} vs {c['baseline']} ({c['metric']}) "
                f"| {fmt(c['diff_mean'])} [{fmt(lo)}, {fmt(hi)}] | **{c['verdict']}** |"
            )
    return "\n".join(lines)


def verdict_summary(all_results: dict) -> str:
    """One row per method: how many of its claims hold, do not hold, are inconclusive."""
    lines = [
        "| method | claims | holds | does not hold | inconclusive | first claim: verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in all_results.items():
        claims = results["claims"]
        if not claims:
            continue
        count = {v: sum(c["verdict"] == v for c in claims) for v in common.VERDICTS}
        first = f"{claims[0]['claim']}: **{claims[0]['verdict']}**"
        lines.append(
            f"| {METHODS[name][0]} | {len(claims)} | {count['holds']} "
            f"| {count['does not hold']} | {count['inconclusive']} | {first} |"
        )
    return "\n".join(lines)


def method_markdown(name: str, results: dict, figure_dir: str | None = None) -> str:
    """One method's section: the claim, the measured claims table, tables, notes, figures."""
    title, paper, claim = METHODS[name]
    parts = [f"**Paper:** {paper}. **Claim:** {claim}"]
    size = f"{results['size']} size, seeds {results['seeds']}, dataset {results['dataset']}"
    if results["smoke"]:
        size += f" — **{common.SMOKE_STAMP}**"
    parts.append(f"*Measured at {size}.*")
    if results["claims"]:
        parts.append(common.claims_markdown(results))
    for caption, table in results["tables"].items():
        caption = f"*{caption}* (mean ± 95% half-width over seeds)"
        parts.append(f"{caption}\n\n{common.table_markdown(table)}")
    parts += [f"- {n}" for n in results["notes"]]
    if figure_dir is not None:
        parts += [f"![{f}]({figure_dir}/{f})" for f in results["figures"]]
    return "\n\n".join(parts)


def report_markdown(all_results: dict, seconds: dict | None = None) -> str:
    """The whole report as markdown (figures linked relative to the report's folder)."""
    sizes = {r["size"] for r in all_results.values()}
    parts = ["# wspace reproduction report", f"Size: {', '.join(sorted(sizes))}."]
    if any(r["smoke"] for r in all_results.values()):
        stamp = common.SMOKE_STAMP.capitalize()
        parts.append(f"**{stamp}**: quick-size runs check the code paths only.")
    parts += ["## Verdicts", verdict_table(all_results)]
    for name, results in all_results.items():
        took = f" ({seconds[name]:.0f} s this run)" if seconds and name in seconds else ""
        parts += [f"## {METHODS[name][0]}{took}", method_markdown(name, results, name)]
    return "\n\n".join(parts) + "\n"


def report_html(all_results: dict, workdir: str) -> str:
    """A self-contained HTML rendering: the same content, figures embedded as data URIs."""
    body = ["<h1>wspace reproduction report</h1>", "<h2>Verdicts</h2>"]
    body.append(_html_table(verdict_table(all_results)))
    for name, results in all_results.items():
        title, paper, claim = METHODS[name]
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(f"<p><b>Paper:</b> {html.escape(paper)}. ")
        body.append(f"<b>Claim:</b> {html.escape(claim)}</p>")
        if results["smoke"]:
            body.append(f"<p style='color:red'><b>{common.SMOKE_STAMP}</b></p>")
        if results["claims"]:
            body.append(_html_table(common.claims_markdown(results)))
        for caption, table in results["tables"].items():
            body.append(f"<p><i>{html.escape(caption)}</i></p>")
            body.append(_html_table(common.table_markdown(table)))
        body += [f"<p>{html.escape(n)}</p>" for n in results["notes"]]
        for fig in results["figures"]:
            with open(os.path.join(workdir, name, fig), "rb") as f:
                data = base64.b64encode(f.read()).decode()
            body.append(f"<img alt='{html.escape(fig)}' src='data:image/png;base64,{data}'>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}"
    )
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>\n" + "\n".join(body)


def _html_table(markdown: str) -> str:
    rows = [r.strip().strip("|").split(" | ") for r in markdown.splitlines()]
    rows = [r for r in rows if not set("".join(r)) <= set("-|")]

    def cell(tag, text):
        bold = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(text))
        return f"<{tag}>{bold}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", s) for s in rows[0]) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", s) for s in r) + "</tr>" for r in rows[1:]]
    return "\n".join(out + ["</table>"])


# ----------------------------------------------------------------------------- README


def readme_block(name: str, results: dict) -> str:
    """The README's block of one method, from its results.json.

    Its claims with intervals and verdicts, its first (headline) table and its
    notes; the other tables and the figures are in the report (`make demo`).
    """
    size = f"{results['size']} size, seeds {results['seeds']}, dataset {results['dataset']}"
    parts = [f"*Measured at {size} (`make demo`).*", common.claims_markdown(results)]
    for caption, table in list(results["tables"].items())[:1]:
        caption = f"*{caption}* (mean ± 95% half-width over seeds)"
        parts.append(f"{caption}\n\n{common.table_markdown(table)}")
    parts += [f"- {n}" for n in results["notes"]]
    return "\n\n".join(parts)


def published_results() -> dict[str, dict]:
    """The results.json files committed under ``experiments/results/``."""
    if not os.path.isdir(RESULTS_DIR):
        return {}
    names = [f[: -len(".json")] for f in os.listdir(RESULTS_DIR) if f.endswith(".json")]
    order = list(METHODS) + sorted(set(names) - set(METHODS))  # the report's order
    return {
        n: common.read_json(os.path.join(RESULTS_DIR, f"{n}.json")) for n in order if n in names
    }


def render_readme(text: str, all_results: dict) -> str:
    """``text`` with every ``<!-- results:NAME -->...<!-- /results:NAME -->`` block regenerated."""

    def replace(match):
        name = match.group(1)
        if name == "verdicts":
            body = verdict_summary(all_results)
        elif name in all_results:
            body = readme_block(name, all_results[name])
        else:
            return match.group(0)
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", replace, text, flags=re.S)


def publish(workdir: str, readme: str = os.path.join(ROOT, "README.md")) -> None:
    """Copies ``workdir/<method>/results.json`` to experiments/results/ and refreshes the README."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for name in METHODS:
        src = os.path.join(workdir, name, "results.json")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(RESULTS_DIR, f"{name}.json"))
    with open(readme) as f:
        text = f.read()
    common.write_text(readme, render_readme(text, published_results()))


def main(argv):
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    report = run(FLAGS.config, FLAGS.workdir)
    print("\n" + verdict_table(report["methods"]))
    total = sum(report["seconds"].values())
    print(
        f"\nreport ({report['size']} size, {total / 60:.1f} min; stored arms are reused): "
        f"{os.path.join(FLAGS.workdir, 'report.md')} and report.html"
    )
    if FLAGS.publish:
        publish(FLAGS.workdir)
        print(f"published to {RESULTS_DIR} and README.md")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", "runs/report", "Output directory (resumes if it exists).")
    flags.DEFINE_bool("publish", False, "Copy results to experiments/results/ and refresh README.")
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(__file__), "configs", "report.py:small"),
        "Report config, with :quick | :small | :paper.",
    )
    app.run(main)
