"""The docs build without warnings, executing the tutorial notebook and the command-line page on the way."""

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-q",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "html" / "tutorials" / "tutorial.html").exists()


def test_every_public_name_is_on_the_api_page():
    import importlib

    text = (DOCS / "api.md").read_text()
    missing = []
    for sub in ("tl", "get", "pl", "io", "datasets"):
        module = importlib.import_module(f"scverse_nullfit.{sub}")
        missing += [f"{sub}.{name}" for name in module.__all__ if f"   {sub}.{name}\n" not in text]
    assert not missing, f"public names without an entry in docs/api.md: {missing}"
