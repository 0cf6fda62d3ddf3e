"""The README's "MLX in five minutes" is executed: every ```python block in order, in one namespace.

A ```text block right after a ```python block is the exact output that block must print. A block
marked <!-- needs-gpu --> runs where MLX has a GPU backend; elsewhere it must fail the way the README
says it does.
"""

import contextlib
import io
import re

import mlx.core as mx
import pytest

from helpers import ROOT

README = (ROOT / "README.md").read_text()
TUTORIAL = README.split("## MLX in five minutes", 1)[1].split("\n## ", 1)[0]
BLOCK = re.compile(r"(<!-- needs-gpu -->\n)?```python\n(.*?)```\n(?:```text\n(.*?)```\n)?", re.S)


def snippets():
    return [(m.group(2), m.group(3), bool(m.group(1))) for m in BLOCK.finditer(TUTORIAL)]


def test_the_tutorial_has_the_promised_sections():
    for topic in ["dtypes", "Lazy evaluation", "grad", "vmap", "value_and_grad", "vjp", "jvp", "streams"]:
        assert topic in TUTORIAL
    assert len(snippets()) >= 6
    assert sum(expected is not None for _, expected, _ in snippets()) >= 4


def test_every_snippet_runs_and_prints_what_the_readme_shows():
    namespace = {}
    for code, expected, needs_gpu in snippets():
        if needs_gpu and not mx.is_available(mx.gpu):
            # What the README says happens without a GPU backend; checked, not skipped.
            with pytest.raises(ValueError, match="Cannot get gpu stream without gpu backend"):
                exec(code, namespace)
            continue
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
        if expected is not None:
            assert stdout.getvalue() == expected, f"snippet:\n{code}"


def test_the_setup_is_two_commands_and_ci_runs_them():
    setup = README.split("<!-- setup -->\n```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert setup == ["pip install -r requirements.txt", "python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- setup -->" in ci  # .ci/run reads its commands from that block, not from a copy
