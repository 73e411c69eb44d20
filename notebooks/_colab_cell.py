# The first code cell of every notebook, below these comment lines (`make notebooks` copies it
# there, tests/test_notebooks.py checks it). In Colab it installs wspace from the Source URL in
# pyproject.toml; elsewhere it does nothing: run the notebook where wspace is installed (the
# repository's .venv after `make setup`).
import subprocess
import sys

if "google.colab" in sys.modules:
    source = "https://github.com/wspace-research/wspace"
    pip = [sys.executable, "-m", "pip", "install", "-q", f"wspace @ git+{source}"]
    if subprocess.run(pip).returncode:
        raise RuntimeError(f"cannot install from {source}; from a checkout: pip install -e PATH")
