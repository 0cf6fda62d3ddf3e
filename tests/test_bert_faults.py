"""bert/: bad input and faults give one line and a non-zero exit, never a traceback or
a half-written file."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, import_example, run_script, tiny_bert

model_py = import_example("bert", "model")
embed = import_example("bert", "embed")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT folder and its conversion."""
    folder = tiny_bert(tmp_path_factory.mktemp("bert") / "hf")
    result = run_script(
        "bert/convert.py", "--bert-model", folder, "--mlx-model", f"{folder}.npz"
    )
    assert result.returncode == 0, result.stderr
    return folder, f"{folder}.npz"


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("num_attention_heads", 0, "does not describe a BERT"),
        ("hidden_size", -32, "does not describe a BERT"),
        ("intermediate_size", 10**12, "does not describe a BERT"),
        ("num_hidden_layers", 10**6, "does not describe a BERT"),
        ("hidden_size", "32", "expected int, got str"),  # transformers' own check
        ("layer_norm_eps", float("nan"), "does not describe a BERT"),
        ("num_attention_heads", 5, "does not describe a BERT"),
        ("hidden_act", "relu", "does not describe a BERT"),
        (None, "{not json", "JSON"),
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
    with pytest.raises(ValueError, match="cannot load .*damaged") as error:
        model_py.load_model(str(damaged), npz)
    assert says in " ".join(str(error.value).split())


def test_a_damaged_config_json_gives_one_line_on_the_command_line(bert, tmp_path):
    folder, npz = bert
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 0
    (damaged / "config.json").write_text(json.dumps(config))
    result = run_script("bert/model.py", "--bert-model", damaged, "--mlx-model", npz)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "does not describe a BERT" in result.stderr


@pytest.mark.parametrize("given", ["./no-such-bert"])
def test_a_mistyped_local_folder_is_said_not_to_exist(bert, tmp_path, given):
    _, npz = bert
    given = given.format(tmp=tmp_path)
    result = run_script("bert/model.py", "--bert-model", given, "--mlx-model", npz)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"there is no folder {given}" in result.stderr


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.float64])
def test_weights_that_are_not_floating_point_are_refused(bert, tmp_path, dtype):
    folder, npz = bert
    weights = dict(np.load(npz))
    name = "encoder.layers.0.attention.query.weight"
    weights[name] = weights[name].astype(dtype)
    np.savez(tmp_path / "bad.npz", **weights)
    if dtype == np.float64:  # floating point: accepted, cast to the inference dtype
        model, _ = model_py.load_model(str(folder), str(tmp_path / "bad.npz"))
        layer = model.encoder["layers"][0]
        assert layer.attention.query.weight.dtype == model_py.mx.float32
        return
    with pytest.raises(ValueError, match="bad.npz: it holds weights that are not"):
        model_py.load_model(str(folder), str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_weights_that_are_not_finite_are_refused(bert, tmp_path, value):
    folder, npz = bert
    weights = dict(np.load(npz))
    weights["embeddings.norm.weight"][3] = value
    np.savez(tmp_path / "bad.npz", **weights)
    with pytest.raises(ValueError, match="not finite"):
        model_py.load_model(str(folder), str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_embeddings_advise_float32_only_to_a_half_precision_run(
    bert, tmp_path, capsys, dtype
):
    # Finite weights so large that the feed-forward overflows, in any dtype.
    folder, npz = bert
    weights = dict(np.load(npz))
    for name in ("up", "down"):
        weights[f"encoder.layers.0.feed_forward.{name}.weight"] *= np.float32(1e30)
    np.savez(tmp_path / "huge.npz", **weights)
    args = ["--bert-model", folder, "--mlx-model", tmp_path / "huge.npz", "a b"]
    with pytest.raises(ValueError, match=f"not finite in {dtype}") as error:
        embed.main(embed.parse_args([str(a) for a in args] + ["--dtype", dtype]))
    assert ("--dtype float32" in str(error.value)) == (dtype != "float32")


def test_convert_refuses_a_checkpoint_whose_weights_are_not_floating_point(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tiny_bert(tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("query.weight"))
    weights[name] = weights[name].astype(np.int8)
    save_file(weights, folder / "model.safetensors")
    result = run_script(
        "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "o.npz"
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"{name} in" in result.stderr and "is int8, not floating point" in (
        result.stderr
    )
    assert not (tmp_path / "o.npz").exists()


def test_an_output_that_cannot_be_written_gives_one_line(bert, tmp_path):
    folder, _ = bert
    (tmp_path / "folder.npz").mkdir()
    result = run_script(
        "bert/convert.py",
        "--bert-model",
        folder,
        "--mlx-model",
        tmp_path / "folder.npz",
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "cannot write" in result.stderr and "folder.npz" in result.stderr
    assert os.listdir(tmp_path) == ["folder.npz"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    (tmp_path / "o.npy").write_bytes(b"old")

    def full_disk(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="cannot write .*o.npy: No space left on device"):
        embed.write_atomically(tmp_path / "o.npy", full_disk)
    assert (tmp_path / "o.npy").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["o.npy"]


def test_an_output_can_be_written_into_a_new_folder(tmp_path):
    embed.write_atomically(tmp_path / "weights" / "o.npz", lambda f: f.write(b"x"))
    assert (tmp_path / "weights" / "o.npz").read_bytes() == b"x"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_get_the_users_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        embed.write_atomically(tmp_path / "o.npz", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "o.npz").stat().st_mode & 0o777 == mode


def interrupt_while_importing(script, *args):
    """Run `python -X importtime script args`, send SIGINT once argparse has been
    imported (the script's first import: MLX, transformers, ... still load), and return
    (exit status, stderr without the import-time lines)."""
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(ROOT / script), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    while not process.stderr.readline().rstrip().endswith("| argparse"):
        pass
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    lines = [line for line in stderr.splitlines() if not line.startswith("import ")]
    return process.returncode, "\n".join(lines)


@pytest.mark.parametrize(
    "script",
    ["model", "main", "embed", "convert", "hf_model", "benchmark"],
)
def test_ctrl_c_while_starting_gives_one_line_and_exit_130(script):
    returncode, stderr = interrupt_while_importing(f"bert/{script}.py", "--help")
    assert returncode == 130 and stderr.strip() == "interrupted"


def test_ctrl_c_while_encoding_gives_one_line_and_writes_nothing(bert, tmp_path):
    folder, npz = bert
    (tmp_path / "many.txt").write_text("the capital of france is paris\n" * 200_000)
    args = [
        "--bert-model",
        folder,
        "--mlx-model",
        npz,
        "--input",
        tmp_path / "many.txt",
    ]
    process = subprocess.Popen(
        [sys.executable, ROOT / "bert/embed.py", *args, "--out", tmp_path / "e.npy"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    # Wait for the first progress line: MLX's first compiled function (nn.gelu is one)
    # asks the system compiler through system(), which ignores SIGINT meanwhile.
    while " of 200,000 sentences" not in (line := process.stderr.readline()):
        assert line, "embed.py ended before it said how far it was"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == "interrupted", stderr
    assert os.listdir(tmp_path) == ["many.txt"]


@pytest.mark.parametrize("script, stdout", [("main", "closed"), ("embed", "full")])
def test_a_closed_or_full_stdout_gives_one_line_not_a_traceback(bert, script, stdout):
    folder, npz = bert
    args = ["--bert-model", folder, "--mlx-model", npz, "the capital [MASK].", "a"]
    with open("/dev/full", "w") as full:
        process = subprocess.Popen(
            [sys.executable, ROOT / f"bert/{script}.py", *args],
            stdout=subprocess.PIPE if stdout == "closed" else full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    if stdout == "closed":  # as `| head -c1` does, before the script writes
        process.stdout.close()
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_damaged_tokenizer_gives_one_line(bert, tmp_path):
    folder, npz = bert
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    (damaged / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ValueError, match="cannot load .*damaged"):
        model_py.load_model(str(damaged), npz)
    result = run_script("bert/hf_model.py", "--bert-model", damaged)
    assert result.returncode == 1 and result.stderr.startswith("error: cannot load")
    assert result.stderr.count("\n") == 1


def test_command_line_text_that_is_not_utf8_gives_one_line(bert):
    folder, npz = bert
    for script, args in [
        ("bert/model.py", ["--text"]),
        ("bert/main.py", []),
        ("bert/embed.py", []),
    ]:
        result = subprocess.run(
            [sys.executable, ROOT / script, "--bert-model", folder, "--mlx-model", npz]
            + args
            + [b"caf\xe9 [MASK]"],
            capture_output=True,
        )
        last = result.stderr.decode().strip().splitlines()[-1]
        assert result.returncode == 2 and "invalid utf8 value" in last, result.stderr


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
