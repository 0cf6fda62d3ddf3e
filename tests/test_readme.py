"""The READMEs as a user meets them: the top-level README's "MLX in five minutes" runs
and prints what it shows, its set-up block is what CI runs, and every command in every
README names a script that exists and flags that script defines.

In the tutorial, every ```python block runs in order, in one namespace. A ```text block
right after a ```python block is the exact output that block must print. A block marked
<!-- needs-gpu --> runs where MLX has a GPU backend; elsewhere it must fail the way the
README says it does.
"""

import contextlib
import io
import re
import shlex
import subprocess

import mlx.core as mx
import pytest
from helpers import ROOT

README = (ROOT / "README.md").read_text()
TUTORIAL = README.split("## MLX in five minutes", 1)[1].split("\n## ", 1)[0]
BLOCK = re.compile(
    r"(<!-- needs-gpu -->\n)?```python\n(.*?)```\n(?:```text\n(.*?)```\n)?", re.S
)
READMES = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md"))]
SCRIPT = re.compile(
    r"^[\w.-]+/[\w./-]+\.py$"
)  # a script named by its path from the repository root


def snippets():
    return [
        (m.group(2), m.group(3), bool(m.group(1))) for m in BLOCK.finditer(TUTORIAL)
    ]


def test_every_tutorial_section_has_code_and_every_shown_output_is_checked():
    sections = TUTORIAL.split("\n### ")[1:]
    assert len(sections) >= 5
    for section in sections:
        assert "```python\n" in section, (
            f"section without code: {section.splitlines()[0]}"
        )
    # A ```text block that does not follow its ```python block directly would be shown
    # but never checked.
    assert TUTORIAL.count("```text\n") == sum(
        expected is not None for _, expected, _ in snippets()
    )


def test_the_tutorial_code_calls_what_its_sections_teach():
    code = "\n".join(code for code, _, _ in snippets())
    for call in [
        "astype(",
        "mx.eval(",
        "mx.grad(mx.grad(",
        "mx.value_and_grad(",
        "mx.vmap(",
        "mx.vjp(",
        "mx.jvp(",
        "stream=mx.cpu",
        "stream=mx.gpu",
    ]:
        assert call in code, f"no snippet calls {call}"


def test_every_snippet_runs_and_prints_what_the_readme_shows():
    namespace = {}
    for code, expected, needs_gpu in snippets():
        if needs_gpu and not mx.is_available(mx.gpu):
            # What the README says happens without a GPU backend; checked, not skipped.
            with pytest.raises(
                ValueError, match="Cannot get gpu stream without gpu backend"
            ):
                exec(code, namespace)
            continue
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
        if expected is not None:
            assert stdout.getvalue() == expected, f"snippet:\n{code}"


def ci_setup_commands(readme_text, tmp_path):
    """The commands .ci/run would run for this README text: its own extraction, run on a
    copy."""
    ci = (ROOT / ".ci" / "run").read_text()
    extraction = re.search(r"^commands=\$\((.*?README\.md)\)$", ci, re.S | re.M)
    assert extraction, (
        ".ci/run no longer reads its commands with commands=$(... README.md)"
    )
    (tmp_path / "README.md").write_text(readme_text)
    result = subprocess.run(
        ["bash", "-c", extraction.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_ci_runs_exactly_the_two_setup_commands_of_the_readme(tmp_path):
    assert ci_setup_commands(README, tmp_path) == [
        "pip install -r requirements.txt",
        "python -m pytest",
    ]
    # It reads them from the README, not from a copy of its own: another block gives
    # other commands.
    other = README.replace("python -m pytest\n", "python -m pytest -x\n", 1)
    assert ci_setup_commands(other, tmp_path) == [
        "pip install -r requirements.txt",
        "python -m pytest -x",
    ]


def readme_commands(path):
    """(README, command) for each line of its ```bash blocks (continuations joined) and
    each inline `python ...`, `mlx.launch ...` or `torchrun ...`."""
    text = path.read_text()
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    lines += re.findall(r"`((?:python3?|mlx\.launch|torchrun) [^`\n]+)`", text)
    return [(path.relative_to(ROOT), line) for line in lines]


COMMANDS = [command for readme in READMES for command in readme_commands(readme)]


def split(command):
    """(launcher words, script, script arguments), or None for a command that runs no
    script of ours."""
    words = shlex.split(command, comments=True)
    scripts = [i for i, word in enumerate(words) if SCRIPT.match(word)]
    if not scripts:
        return None
    i = scripts[0]
    return words[:i], words[i], words[i + 1 :]


def test_the_readmes_have_commands_to_check():
    scripts = {parts[1] for _, command in COMMANDS if (parts := split(command))}
    for script in [
        "llama/llama.py",
        "llama/convert.py",
        "gpt2/main.py",
        "gpt2/benchmark_ddp.py",
        "bert/main.py",
    ]:
        assert script in scripts


@pytest.mark.parametrize(
    "readme, command", COMMANDS, ids=[f"{r}: {c[:60]}" for r, c in COMMANDS]
)
def test_a_readme_command_names_a_script_that_exists_and_only_flags_it_defines(
    readme, command
):
    parts = split(command)
    if parts is None:
        return  # pip, pytest, shell set-up: nothing of ours to check
    launcher, script, args = parts
    assert (ROOT / script).is_file(), (
        f"{readme}: {script} does not exist (commands run from the repository root)"
    )
    source = (ROOT / script).read_text()
    for flag in {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}:
        defined = flag.replace(
            "--no-", "--", 1
        )  # argparse.BooleanOptionalAction defines --no-X with --X
        assert re.search(rf"""["']{re.escape(defined)}["']""", source), (
            f"{readme}: {script} has no {flag}"
        )
    if launcher and launcher[0] == "mlx.launch":
        # Without --python, mlx.launch executes the script itself: "Permission denied",
        # and exit 0.
        assert "--python" in launcher, f"{readme}: mlx.launch needs --python: {command}"
