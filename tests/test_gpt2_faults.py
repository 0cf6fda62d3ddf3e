"""gpt2/: what happens to bad input and faults. Each mistake a user can make gets one
line on stderr and a non-zero exit before any work; an interrupt saves exactly the step
it stopped at; nothing half written or non-finite is left behind. (Distributed faults:
test_gpt2_distributed.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import ROOT, import_example, run_script, tiny_gpt2

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
) * 40
TINY_RUN = [
    "--ctx-len",
    "32",
    "--n-emb",
    "32",
    "--n-heads",
    "2",
    "--n-layers",
    "2",
    "--batch-size",
    "16",
    "--dropout",
    "0.2",
    "--max-tokens",
    "5",
    "--dtype",
    "float32",
]  # 11 steps per epoch on TEXT


def one_line_error(result):
    """The failure's single stderr line (the BLAS warning of a Linux CPU aside)."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if not line.startswith("warning: ")
    ]
    assert len(lines) == 1, result.stderr
    return lines[0]


def checkpoint_arrays(folder):
    return {
        k: np.array(v)
        for k, v in mx.load(str(folder / "checkpoint.safetensors")).items()
    }


def interrupt_after(command, line_start, **popen):
    """Start `command`, send SIGINT to its process group once a stdout line starts with
    `line_start`; the CompletedProcess-like (returncode, stdout, stderr)."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        **popen,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            os.killpg(process.pid, signal.SIGINT)
            break
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(
        command, process.returncode, "".join(seen) + out, err
    )


def test_ctrl_c_stops_at_a_step_boundary_and_resume_equals_the_uninterrupted_run(
    tmp_path,
):
    (tmp_path / "text.txt").write_text(TEXT * 3)  # 33 steps per epoch
    common = [
        sys.executable,
        str(ROOT / "gpt2/main.py"),
        "--data",
        str(tmp_path / "text.txt"),
        *TINY_RUN,
        "--log-every",
        "1",
        "--epochs",
        "2",
    ]
    stopped = interrupt_after([*common, "--out", str(tmp_path / "resumed")], "Step 3/")
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, (
        stopped.stderr
    )
    line = stopped.stderr.strip().splitlines()[-1]
    step = int(line.split("Interrupted at step ")[1].split(";")[0])
    assert (
        line == f"Interrupted at step {step}; saved "
        f"{tmp_path / 'resumed' / 'checkpoint.safetensors'}; continue with --resume"
    )
    assert (
        3 <= step < 72
        and f"Step {step}/72 |" in stopped.stdout
        and f"Step {step + 1}/" not in stopped.stdout
    )
    assert (
        json.loads(checkpoint_arrays(tmp_path / "resumed")["meta"].tobytes())["step"]
        == step
    )
    resumed = subprocess.run(
        [*common, "--out", str(tmp_path / "resumed"), "--resume"],
        capture_output=True,
        text=True,
    )
    full = subprocess.run(
        [*common, "--out", str(tmp_path / "full")], capture_output=True, text=True
    )
    assert resumed.returncode == full.returncode == 0, resumed.stderr + full.stderr
    a, b = checkpoint_arrays(tmp_path / "full"), checkpoint_arrays(tmp_path / "resumed")
    names = sorted(a.keys() - {"meta"})
    if (
        mx.default_device() == mx.cpu
    ):  # exactly: the same weights, moments and dropout masks
        for name in names:
            assert np.array_equal(a[name], b[name]), name
    # GPU kernels that sum with atomics make two full runs differ too: within 4x that
    # noise (see test_gpt2.py)
    else:
        again = subprocess.run(
            [*common, "--out", str(tmp_path / "again")], capture_output=True, text=True
        )
        assert again.returncode == 0, again.stderr
        c = checkpoint_arrays(tmp_path / "again")
        noise = max(np.abs(a[name] - c[name]).max() for name in names)
        for name in names:
            assert np.abs(a[name] - b[name]).max() <= 4 * noise + 1e-6, (name, noise)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--lr", "inf"),
        ("--seed", "-1"),
        ("--seed", str(2**32)),
        ("--dropout", "1"),
        ("--max-steps", "0"),
        ("--n-heads", "0"),
        ("--timeout", "nan"),
        ("--ctx-len", "x"),
    ],
)
def test_numeric_flags_out_of_range_or_nan_are_refused_before_anything_runs(
    flag, value, monkeypatch, capsys
):
    main = import_example("gpt2", "main")
    monkeypatch.setattr(sys, "argv", ["main.py", flag, value])
    with pytest.raises(SystemExit) as stop:
        main.parse_args()
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        f"main.py: error: argument {flag}: expected "
    ) and error.endswith(f", got {value!r}")


def test_generate_py_refuses_a_negative_seed_and_a_nan_temperature_in_one_line(
    tmp_path,
):
    for flags in (["--seed", "-1"], ["--temp", "nan"]):
        result = run_script("gpt2/generate.py", tmp_path / "missing.npz", *flags)
        assert (
            result.returncode == 2
            and f"argument {flags[0]}: expected " in result.stderr
        )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "has no text"),
        (b"\0" * 100, "has no text"),
        (b"caf\xe9 latin-1", "as UTF-8 text"),
    ],
)
def test_text_that_is_empty_all_nul_or_not_utf8_is_refused_in_one_line(
    tmp_path, content, message
):
    (tmp_path / "text.txt").write_bytes(content)
    result = run_script(
        "gpt2/main.py",
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path / "out",
        *TINY_RUN,
    )
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "a-file").write_text("")
    result = run_script(
        "gpt2/main.py", "--data", tmp_path / "text.txt",
        "--out", tmp_path / "a-file" / "out", *TINY_RUN,
    )  # fmt: skip
    line = one_line_error(result)
    assert "Not a directory" in line and "a-file" in line, line
    assert "Step 1/" not in result.stdout  # refused before the first step


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_writes_are_atomic_with_the_users_umask_and_leave_no_temporary_file(
    tmp_path, umask
):
    save = import_example("gpt2", "save")
    path = tmp_path / "w.npz"
    (tmp_path / ".w.tmp.npz").write_bytes(b"half")  # left by a write killed by SIGKILL
    old = os.umask(umask)
    try:
        save.save_arrays(path, {"a": mx.arange(3)})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]

    def fails(tmp):
        open(tmp, "wb").write(b"partial")
        raise KeyboardInterrupt  # or a full disk

    with pytest.raises(KeyboardInterrupt):
        save.write_atomically(path, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]
    assert np.array_equal(np.load(path)["a"], [0, 1, 2])  # the old file whole


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "hf")
    result = run_script("gpt2/convert.py", folder, folder.parent / "gpt2.npz")
    assert result.returncode == 0, result.stderr
    return folder.parent / "gpt2.npz"


def with_config(converted, tmp_path, config_bytes=None, **changes):
    """A copy of the converted weights with its stored config changed (or replaced by
    raw bytes)."""
    arrays = dict(np.load(converted))
    config = json.loads(arrays["config"].tobytes())
    raw = (
        config_bytes
        if config_bytes is not None
        else json.dumps({**config, **changes}).encode()
    )
    np.savez(
        tmp_path / "damaged.npz",
        **{**arrays, "config": np.frombuffer(raw, dtype=np.uint8)},
    )
    return tmp_path / "damaged.npz"


@pytest.mark.parametrize(
    "changes",
    [
        dict(n_head=0),
        dict(n_embd=-32),
        dict(n_embd=10**12),
        dict(n_layer=10**9),
        dict(n_head="4"),
        dict(dropout=float("nan")),
        dict(bias="yes"),
        dict(config_bytes=b"{not json"),
        dict(config_bytes=b"[1, 2]"),
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values())))[:12],
)
def test_a_damaged_config_in_a_weights_file_is_refused_as_a_whole_before_building(
    converted, tmp_path, changes
):
    generate = import_example("gpt2", "generate")
    with pytest.raises(generate.WeightsError, match="its stored config"):
        generate.load_model(with_config(converted, tmp_path, **changes))


def test_generate_py_reports_a_damaged_config_in_one_line(converted, tmp_path):
    result = run_script(
        "gpt2/generate.py",
        with_config(converted, tmp_path, n_head=0),
        "--max-tokens",
        "2",
    )
    assert "its stored config does not describe its weights" in one_line_error(result)


def test_weights_of_a_wrong_dtype_are_refused(converted, tmp_path):
    generate = import_example("gpt2", "generate")
    arrays = dict(np.load(converted))
    arrays["h.0.attn.c_attn.weight"] = arrays["h.0.attn.c_attn.weight"].astype(np.int32)
    arrays["ln_f.bias"] = arrays["ln_f.bias"] > 0
    np.savez(tmp_path / "ints.npz", **arrays)
    with pytest.raises(generate.WeightsError) as refused:
        generate.load_model(tmp_path / "ints.npz")
    assert "h.0.attn.c_attn.weight int32 (expected a floating-point dtype)" in str(
        refused.value
    )
    assert "ln_f.bias bool (expected a floating-point dtype)" in str(refused.value)


@pytest.mark.parametrize(
    "meta", [b'{"lr": 0.001}', b'{"step": "7"}', b'{"step": -1}', b"[7]", b"{oops"]
)
def test_resume_refuses_a_checkpoint_without_a_valid_step_in_one_line(tmp_path, meta):
    (tmp_path / "text.txt").write_text(TEXT)
    common = [
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path,
        *TINY_RUN,
        "--max-steps",
        "2",
    ]
    assert run_script("gpt2/main.py", *common).returncode == 0
    arrays = dict(mx.load(str(tmp_path / "checkpoint.safetensors")))
    arrays["meta"] = mx.array(np.frombuffer(meta, dtype=np.uint8))
    mx.save_safetensors(str(tmp_path / "checkpoint.safetensors"), arrays)
    line = one_line_error(
        run_script("gpt2/main.py", *common, "--max-steps", "4", "--resume")
    )
    assert str(tmp_path / "checkpoint.safetensors") in line and (
        "no step count" in line or "cannot read" in line
    )


def test_convert_refuses_an_output_it_cannot_write_before_converting(tmp_path):
    folder = tiny_gpt2(tmp_path / "hf")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.npz").mkdir()
    for output, expected in (
        (tmp_path / "folder.npz", "it is a folder"),
        (tmp_path / "a-file" / "w.npz", "is a file, not a folder"),
    ):
        line = one_line_error(run_script("gpt2/convert.py", folder, output))
        assert line.startswith("error: cannot write ") and expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "folder.npz",
        "hf",
    ]  # nothing written


@pytest.mark.parametrize(
    "changes",
    [
        dict(n_head=0),
        dict(n_embd="32"),
        dict(n_layer=-2),
        dict(n_positions=10**12),
        dict(n_head=None),
    ],
)
def test_convert_refuses_a_damaged_hugging_face_config_in_one_line(tmp_path, changes):
    folder = tiny_gpt2(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    line = one_line_error(run_script("gpt2/convert.py", folder, tmp_path / "w.npz"))
    assert "config" in line and line.startswith("error: "), line
    assert not (tmp_path / "w.npz").exists()


# ---- One test per fault a user met (issues 31 and 32) ------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with text.txt and the checkpoint of a 2-step main.py run on it."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py", "--data", folder / "text.txt", "--out", folder,
        *TINY_RUN, "--max-steps", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder


def test_a_checkpoint_of_main_py_samples_with_generate_py(trained):
    result = run_script(
        "gpt2/generate.py", trained / "checkpoint.safetensors",
        "--prompt", "All: ", "--max-tokens", "20",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("All: ") and len(result.stdout) >= 25
    assert set(result.stdout) <= set(TEXT)  # the characters it was trained on


def test_generate_py_given_a_folder_says_it_is_a_folder(tmp_path):
    line = one_line_error(run_script("gpt2/generate.py", tmp_path))
    assert "is a folder" in line and "convert.py" in line


@pytest.mark.parametrize("shell", ["| head -c1", "> /dev/full"])
def test_generate_py_stops_without_a_traceback_when_stdout_closes_or_fills(
    trained, shell
):
    command = (
        f"{sys.executable} {ROOT / 'gpt2/generate.py'} "
        f"{trained / 'checkpoint.safetensors'} --max-tokens 200 --prompt All {shell}"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True
    )
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr
    if shell == "> /dev/full":
        assert "No space left" in one_line_error(result)


@pytest.mark.parametrize("delay", [0, 0.03])
def test_ctrl_c_while_starting_gives_at_most_one_line(tmp_path, delay):
    """From the script's first import on (seen through -X importtime), while MLX loads
    and the data is read. Not later: the first compiled step asks MLX's CPU backend
    for the system compiler through system(), which ignores SIGINT meanwhile (some
    10 ms; seconds on a first run, while it compiles): a Ctrl-C then is lost (MLX's)."""
    (tmp_path / "text.txt").write_text(TEXT)
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", ROOT / "gpt2/main.py", "--data",
         tmp_path / "text.txt", "--out", tmp_path, *TINY_RUN, "--epochs", "1000"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    while not process.stderr.readline().rstrip().endswith("| argparse"):
        pass
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]  # a lost Ctrl-C: training goes on
    lines = [
        line
        for line in stderr.splitlines()
        if not line.startswith(("warning: ", "import "))
    ]
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr and len(lines) <= 1, stderr


def test_an_empty_prompt_is_refused_before_training(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py", "--data", tmp_path / "text.txt", "--out", tmp_path / "out",
        *TINY_RUN, "--prompt", "",
    )  # fmt: skip
    assert result.returncode == 2 and "--prompt" in result.stderr
    assert "Step" not in result.stdout


def test_generate_py_refuses_nan_weights(trained, tmp_path):
    arrays = dict(mx.load(str(trained / "checkpoint.safetensors")))
    arrays["model.h.0.mlp.c_fc.weight"][0, 0] = mx.nan
    mx.save_safetensors(str(tmp_path / "nan.safetensors"), arrays)
    line = one_line_error(run_script("gpt2/generate.py", tmp_path / "nan.safetensors"))
    assert "h.0.mlp.c_fc.weight is not finite" in line


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("nan weight", "model.wte.weight is not finite"),
        ("nan moment", "optimizer.wte.weight.v is not finite"),
        ("no optimizer", "optimizer."),
        ("wrong shape", "optimizer.wte.weight.m float32 (3, 3)"),
    ],
)
def test_resume_checks_every_array_of_the_checkpoint_in_one_line(
    trained, tmp_path, damage, expected
):
    arrays = dict(mx.load(str(trained / "checkpoint.safetensors")))
    if damage == "nan weight":
        arrays["model.wte.weight"][0, 0] = mx.nan
    elif damage == "nan moment":
        arrays["optimizer.wte.weight.v"][0, 0] = mx.inf
    elif damage == "no optimizer":
        arrays = {k: v for k, v in arrays.items() if not k.startswith("optimizer.")}
    else:
        arrays["optimizer.wte.weight.m"] = mx.zeros((3, 3))
    mx.save_safetensors(str(tmp_path / "checkpoint.safetensors"), arrays)
    result = run_script(
        "gpt2/main.py", "--data", trained / "text.txt", "--out", tmp_path,
        *TINY_RUN, "--max-steps", "4", "--resume",
    )  # fmt: skip
    line = one_line_error(result)
    assert "is damaged" in line and expected in line


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path,
):
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["--data", tmp_path / "text.txt", "--out", tmp_path, *TINY_RUN]
    assert run_script("gpt2/main.py", *common, "--max-steps", "11").returncode == 0
    before = checkpoint_arrays(tmp_path)
    result = run_script("gpt2/main.py", *common, "--lr", "100", "--epochs", "3")
    line = one_line_error(result)
    assert "diverged" in line and "--lr" in line
    assert not (tmp_path / "completions.txt").read_text() == ""  # the first run's
    after = checkpoint_arrays(tmp_path)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_full_disk_during_a_run_says_the_previous_checkpoint_is_whole(
    tmp_path, monkeypatch
):
    main = import_example("gpt2", "main")
    model = main.GPT(main.GPTConfig(8, 8, 1, 1, 8))
    optimizer = main.optim.AdamW(1e-3)
    optimizer.init(model.trainable_parameters())

    def full(path, arrays):
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(main, "save_arrays", full)
    path = tmp_path / "checkpoint.safetensors"
    checkpoint = main.Checkpoint(path, model, optimizer, {}, 11, True)
    with pytest.raises(ValueError) as stopped:
        checkpoint.save(22)
    message = str(stopped.value)
    assert "step 22" in message and f"{path} (step 11), is whole" in message
    assert "--resume" in message


def test_convert_refuses_a_folder_without_tokenizer_files(tmp_path):
    folder = tiny_gpt2(tmp_path / "hf")
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    line = one_line_error(run_script("gpt2/convert.py", folder, tmp_path / "w.npz"))
    assert "no tokenizer files" in line and not (tmp_path / "w.npz").exists()


def test_generate_py_refuses_a_prompt_that_is_not_utf8_in_one_line(trained):
    result = subprocess.run(
        [sys.executable, ROOT / "gpt2/generate.py", trained / "checkpoint.safetensors",
         "--prompt", b"\xff"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "not UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr


def test_benchmark_py_ctrl_c_gives_one_line():
    process = subprocess.Popen(
        [sys.executable, ROOT / "gpt2/benchmark.py", "--tiny", "--steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a Ctrl-C goes to the whole process group
    )
    time.sleep(5)
    os.killpg(process.pid, signal.SIGINT)
    stderr = process.communicate()[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "Interrupted"
