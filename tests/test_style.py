"""The project's style and layout rules, checked by the README's test command
(and so by CI)."""

import subprocess
import sys

from helpers import ROOT, import_example

EXAMPLES = sorted(p for p in ROOT.glob("*/*.py") if p.parent.name != "tests")


def ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_the_code_is_formatted_by_ruff_at_line_length_88():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check_finds_nothing():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_example_module_takes_the_name_of_an_installed_package():
    """`python llama/llama.py` puts llama/ first on sys.path: a module there named
    like an installed package (gpt2/kernels.py once hid Hugging Face's `kernels` from
    transformers) breaks any library that imports that package."""
    names = sorted({p.stem for p in EXAMPLES})
    code = (
        "import importlib.util, sys\n"
        f"for name in {names!r}:\n"
        "    if name in sys.stdlib_module_names or importlib.util.find_spec(name):\n"
        "        print(name)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == []


def test_an_imported_example_module_is_not_left_under_its_bare_name():
    model = import_example("gpt2", "model")
    assert model.GPT is not None
    assert "model" not in sys.modules
    assert str(ROOT / "gpt2") not in sys.path
