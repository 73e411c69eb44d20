"""Notebooks: a Colab badge, then the install cell; a stored figure and no stored warnings."""

import json
import os

import pytest

from tests.helpers import ROOT, colab_badge, colab_cell, notebook_names, source_url


def _cells(name):
    with open(os.path.join(ROOT, "notebooks", f"{name}.ipynb")) as f:
        return json.load(f)["cells"]


def _text(cell):
    return "".join(cell["source"]).strip()


def test_colab_cell_installs_from_the_source_url():
    cell = colab_cell()
    assert f'source = "{source_url()}"' in cell and 'f"wspace @ git+{source}"' in cell
    assert "pip install -e" in cell  # the one-line fallback: install from a local checkout
    assert not any(line.lstrip().startswith("#") for line in cell.splitlines())


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_has_badge_install_cell_figure_and_no_warnings(name):
    cells = _cells(name)
    assert cells[0]["cell_type"] == "markdown" and _text(cells[0]) == colab_badge(name), (
        f"{name}: the first cell is not its Colab badge; `make notebooks` writes it"
    )
    code = [c for c in cells if c["cell_type"] == "code"]
    assert _text(code[0]) == colab_cell(), f"{name}: first code cell is not the install cell"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no stored figure"
    stderr = [
        "".join(o["text"])
        for o in outputs
        if o["output_type"] == "stream" and o["name"] == "stderr"
    ]
    assert not [t for t in stderr if "Warning" in t], f"{name} stores a warning: {stderr}"


def test_install_cell_in_colab_installs_from_source_or_says_how_from_a_checkout(monkeypatch):
    import subprocess
    import sys
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    calls = []

    def fake_run(cmd, returncode):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode)

    monkeypatch.setattr(subprocess, "run", lambda cmd: fake_run(cmd, 0))
    exec(colab_cell(), {})
    assert calls[-1][1:] == ["-m", "pip", "install", "-q", f"wspace @ git+{source_url()}"]
    monkeypatch.setattr(subprocess, "run", lambda cmd: fake_run(cmd, 1))  # URL not reachable
    with pytest.raises(RuntimeError) as err:
        exec(colab_cell(), {})
    message = str(err.value)
    assert source_url() in message and "pip install -e" in message and "\n" not in message
