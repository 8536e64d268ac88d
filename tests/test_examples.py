"""The examples and the package's identity as a user meets them: ``rmsprop --version`` prints the
one version the package declares, and an example whose framework is missing says in one line
what to install (not a ``ModuleNotFoundError`` traceback)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rmsprop

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once_and_declared_by_the_package():
    """pyproject.toml has no version of its own: setuptools reads ``rmsprop.__version__``, so
    the installed metadata and the attribute cannot disagree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rmsprop.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", rmsprop.__version__)
    assert importlib.metadata.version("rmsprop") == rmsprop.__version__


def test_changelog_has_a_section_for_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(rmsprop.__version__)}\b", text, re.M), rmsprop.__version__


def test_license_is_the_declared_apache_2_0():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert "Apache-2.0" in str(declared)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def test_cli_version_prints_the_package_version():
    proc = subprocess.run([sys.executable, "-m", "rmsprop.cli", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"rmsprop {rmsprop.__version__}\n" and not proc.stderr


def test_import_rmsprop_does_not_import_torch():
    """The NumPy core stays light: the tools (``rmsprop.compare``) load on first use."""
    code = "import sys, rmsprop; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "False"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rmsprop.nope  # noqa: B018


def _run_without(example: str, missing: str) -> subprocess.CompletedProcess:
    """Run ``examples/<example>`` as ``python examples/<example>`` would, with ``missing``
    unimportable (a ``None`` entry in ``sys.modules`` makes ``import`` raise
    ``ModuleNotFoundError``, as a package that is not installed does)."""
    code = ("import runpy, sys\n"
            f"sys.modules[{missing!r}] = None\n"
            f"sys.argv = [{example!r}]\n"
            f"runpy.run_path({str(ROOT / 'examples' / example)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("example, missing, install", [
    ("lightning_rmsprop.py", "lightning", "pip install lightning"),
    ("hf_trainer_rmsprop.py", "transformers", "pip install transformers accelerate"),
    ("hf_trainer_rmsprop.py", "accelerate", "pip install transformers accelerate"),
])
def test_example_without_its_framework_says_what_to_install(example, missing, install):
    proc = _run_without(example, missing)
    assert proc.returncode == 1 and not proc.stdout
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert install in proc.stderr and example in proc.stderr
