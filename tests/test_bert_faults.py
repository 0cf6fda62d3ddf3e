"""bert/: bad input and faults give one line and a non-zero exit, never a traceback or a half-written file."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, import_example, run_script, tiny_bert

model_py = import_example("bert", "model")
cli = import_example("bert", "cli")
embed = import_example("bert", "embed")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT folder and its conversion."""
    folder = tiny_bert(tmp_path_factory.mktemp("bert") / "hf")
    assert (
        run_script(
            "bert/convert.py", "--bert-model", folder, "--mlx-model", f"{folder}.npz"
        ).returncode
        == 0
    )
    return folder, f"{folder}.npz"


@pytest.mark.parametrize(
    "field, value, says",
    [
        (
            "num_attention_heads",
            0,
            "num_attention_heads is 0; it must be a whole number from 1 to 1,048,576",
        ),
        ("hidden_size", -32, "hidden_size is -32"),
        ("intermediate_size", 10**12, "intermediate_size is 1000000000000"),
        (
            "num_hidden_layers",
            10**6,
            "num_hidden_layers is 1000000; it must be a whole number from 1 to 1,024",
        ),
        (
            "hidden_size",
            "32",
            "expected int, got str",
        ),  # transformers' own check of the type
        (
            "layer_norm_eps",
            float("nan"),
            "layer_norm_eps is nan; it must be a number from 1e-30 to 0.1",
        ),
        (
            "num_attention_heads",
            5,
            "hidden_size 32 is not a multiple of num_attention_heads 5",
        ),
        (None, "{not json", "is not a valid JSON file"),
    ],
)
def test_a_damaged_config_json_is_refused_as_a_whole_in_one_line(
    bert, tmp_path, field, value, says
):
    folder, npz = bert
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    config = json.loads((folder / "config.json").read_text())
    (damaged / "config.json").write_text(
        value if field is None else json.dumps({**config, field: value})
    )
    with pytest.raises(
        model_py.WeightsError,
        match="the config.json or tokenizer of .*damaged cannot be used: ",
    ) as error:
        model_py.load_model(str(damaged), npz)
    assert says in " ".join(str(error.value).split())


def test_a_damaged_config_json_gives_one_line_on_the_command_line(bert, tmp_path):
    folder, npz = bert
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    (damaged / "config.json").write_text(
        json.dumps(
            {
                **json.loads((folder / "config.json").read_text()),
                "num_attention_heads": 0,
            }
        )
    )
    result = run_script("bert/model.py", "--bert-model", damaged, "--mlx-model", npz)
    assert (
        result.returncode == 1
        and result.stderr.count("\n") == 1
        and "num_attention_heads is 0" in result.stderr
    )


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.float64])
def test_weights_that_are_not_float32_float16_or_bfloat16_are_refused(
    bert, tmp_path, dtype
):
    folder, npz = bert
    weights = dict(np.load(npz))
    weights["encoder.layers.0.attention.query.weight"] = weights[
        "encoder.layers.0.attention.query.weight"
    ].astype(dtype)
    np.savez(tmp_path / "bad.npz", **weights)
    if dtype == np.float64:  # floating point: accepted, and cast to the inference dtype
        model, _ = model_py.load_model(str(folder), str(tmp_path / "bad.npz"))
        assert (
            model.encoder.layers[0].attention.query.weight.dtype == model_py.mx.float32
        )
        return
    with pytest.raises(
        model_py.WeightsError,
        match=f"not floating point: encoder.layers.0.attention.query.weight "
        f"\\({np.dtype(dtype).name}\\)",
    ):
        model_py.load_model(str(folder), str(tmp_path / "bad.npz"))


def test_convert_refuses_a_checkpoint_whose_weights_are_not_floating_point(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tiny_bert(tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("query.weight"))
    save_file(
        {**weights, name: weights[name].astype(np.int8)}, folder / "model.safetensors"
    )
    result = run_script(
        "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "o.npz"
    )
    assert (
        result.returncode == 1
        and result.stderr.count("\n") == 1
        and f"{name} in" in result.stderr
    )
    assert (
        "is int8, not floating point" in result.stderr
        and not (tmp_path / "o.npz").exists()
    )


@pytest.mark.parametrize(
    "output, says",
    [
        ("folder.npz", "it is a folder"),
        ("a_file/o.npz", "a_file is a file, not a folder"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_work(
    tmp_path, output, says
):
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "a_file").write_text("")
    # The model does not exist: the output is checked first, before the conversion would find that out.
    result = run_script(
        "bert/convert.py",
        "--bert-model",
        tmp_path / "no-model",
        "--mlx-model",
        tmp_path / output,
    )
    assert (
        result.returncode == 1
        and result.stderr.count("\n") == 1
        and says in result.stderr
    )
    result = run_script(
        "bert/embed.py",
        "--bert-model",
        tmp_path / "no-model",
        "--mlx-model",
        "no.npz",
        "a b",
        "--out",
        str(tmp_path / output).replace(".npz", ".npy"),
    )
    assert (
        result.returncode == 1
        and result.stderr.count("\n") == 1
        and says in result.stderr
    )


def test_a_disk_without_room_is_refused_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(
        cli.shutil,
        "disk_usage",
        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000),
    )
    with pytest.raises(
        OSError,
        match=r"cannot write .*o.npz: it needs 0.0 MB and its disk has 0.0 MB free",
    ):
        cli.check_writable(tmp_path / "o.npz", size=5000)


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    (tmp_path / "o.npy").write_bytes(b"old")

    def full_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(
        OSError,
        match="cannot write .*o.npy: No space left on device; .*o.npy is as it was",
    ):
        cli.write_atomically(tmp_path / "o.npy", full_disk)
    assert (tmp_path / "o.npy").read_bytes() == b"old" and sorted(
        os.listdir(tmp_path)
    ) == ["o.npy"]


def test_a_stale_temporary_file_is_removed_at_the_next_write_and_a_running_writers_kept(
    tmp_path,
):
    dead, alive = (
        tmp_path / ".o.npz.999999999.x1.tmp",
        tmp_path / ".o.npz.1.x2.tmp",
    )  # pid 1 always runs
    dead.write_bytes(b"left by kill -9")
    alive.write_bytes(b"still being written")
    cli.write_atomically(tmp_path / "o.npz", lambda f: f.write(b"new"))
    assert (
        not dead.exists()
        and alive.exists()
        and (tmp_path / "o.npz").read_bytes() == b"new"
    )


@pytest.mark.parametrize(
    "umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]
)
def test_outputs_get_the_users_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        cli.write_atomically(tmp_path / "o.npz", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "o.npz").stat().st_mode & 0o777 == mode


WRITER = """
import sys, time
sys.path.insert(0, {bert!r})
from cli import run, write_atomically

def slow(f):
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

run(lambda: write_atomically({path!r}, slow))
"""


@pytest.mark.parametrize(
    "signum, status, line",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_ctrl_c_and_sigterm_during_a_write_remove_the_temporary_file_and_give_one_line(
    tmp_path, signum, status, line
):
    script = WRITER.format(bert=str(ROOT / "bert"), path=str(tmp_path / "o.npz"))
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "writing\n"
    assert any(
        name.endswith(".tmp") for name in os.listdir(tmp_path)
    )  # it is being written
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == status and stderr == line + "\n"
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_start_up_or_encoding_gives_one_line_and_exit_130(bert, tmp_path):
    folder, npz = bert
    (tmp_path / "many.txt").write_text("the capital of france is paris\n" * 200_000)
    command = [
        sys.executable,
        str(ROOT / "bert/embed.py"),
        "--bert-model",
        str(folder),
        "--mlx-model",
        npz,
        "--input",
        str(tmp_path / "many.txt"),
        "--out",
        str(tmp_path / "e.npy"),
    ]
    for wait_for in ("start-up", "embedding"):
        process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if wait_for == "start-up":
            time.sleep(1.5)  # past Python's own start, into the imports and loading
        else:
            while not (line := process.stderr.readline()).startswith(
                "embedding 200,000 sentences"
            ):
                assert line, "embed.py ended before it said it was embedding"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert (
            process.returncode == 130
            and stderr.strip().splitlines()[-1] == "interrupted"
        ), stderr
        assert "Traceback" not in stderr and os.listdir(tmp_path) == ["many.txt"]


def test_a_damaged_tokenizer_gives_one_line(bert, tmp_path):
    folder, npz = bert
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    (damaged / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(
        model_py.WeightsError,
        match="the config.json or tokenizer of .*damaged cannot be used: ",
    ):
        model_py.load_model(str(damaged), npz)
    result = run_script("bert/hf_model.py", "--bert-model", damaged)
    assert (
        result.returncode == 1
        and result.stderr.startswith("error: cannot load")
        and result.stderr.count("\n") == 1
    )


def test_command_line_text_that_is_not_utf8_gives_one_line(bert):
    folder, npz = bert
    for script, args in [
        ("bert/model.py", ["--text"]),
        ("bert/main.py", []),
        ("bert/embed.py", []),
    ]:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / script),
                "--bert-model",
                str(folder),
                "--mlx-model",
                npz,
                *args,
                b"caf\xe9 [MASK]",
            ],
            capture_output=True,
        )
        last = result.stderr.decode().strip().splitlines()[-1]
        assert (
            result.returncode == 2 and "b'caf\\xe9 [MASK]' is not UTF-8 text" in last
        ), result.stderr


@pytest.mark.parametrize(
    "script, args",
    [
        ("main", ["--top-k", "0"]),
        ("main", ["--top-k", "-1"]),
        ("main", ["--top-k", "nan"]),
        ("benchmark", ["--repeats", "0"]),
        ("benchmark", ["--sentences", "-5"]),
        ("benchmark", ["--batch-size", "nan"]),
        ("benchmark", ["--shapes", "0x16"]),
    ],
)
def test_counts_that_are_not_positive_whole_numbers_are_refused_by_argparse(
    script, args, capsys
):
    if script == "main":
        main = import_example("bert", "main")
        argv = [
            "main.py",
            "--bert-model",
            "x",
            "--mlx-model",
            "y.npz",
            "a [MASK]",
            *args,
        ]
        with pytest.raises(SystemExit) as exit_, pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            main.main()
    else:
        benchmark = import_example("bert", "benchmark")
        with pytest.raises(SystemExit) as exit_:
            benchmark.parse_args(["--embed", *args])
    assert exit_.value.code == 2 and "error: argument" in capsys.readouterr().err
