"""The package's structure: import layering (tools/check_imports.py) and a fast command line."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_layering():
    """No import cycle, no upward or sideways import, even inside functions."""
    problems = _checker().check(ROOT / "src" / "scverse_nullfit")
    assert not problems, "\n".join(problems)


def test_checker_finds_cycles_and_upward_imports(tmp_path):
    pkg = tmp_path / "scverse_nullfit"
    for sub in ("_core", "io", "tl"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "_core" / "_a.py").write_text("def f():\n    from ..io import _b\n")
    (pkg / "io" / "_b.py").write_text("from .._core import _a\n")
    (pkg / "tl" / "_x.py").write_text("from . import _y\n")
    (pkg / "tl" / "_y.py").write_text("from ._x import thing\n")
    text = "\n".join(_checker().check(pkg))
    assert "_core may not import io" in text
    assert "io may not import _core" in text
    assert "import cycle among scverse_nullfit.tl._x, scverse_nullfit.tl._y" in text


def test_command_line_starts_without_scanpy():
    """``--help`` and ``--version`` import neither scanpy nor anndata."""
    code = (
        "import sys\nfrom scverse_nullfit._cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('scanpy', 'anndata', 'pandas') if m in sys.modules))"
    )
    src = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src},
                         check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]"
