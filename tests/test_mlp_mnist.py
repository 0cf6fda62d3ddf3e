import hashlib
import json
import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import ROOT, import_example, run_script, tiny_mnist, write_idx

mnist = import_example("mlp_mnist", "mnist")
model = import_example("mlp_mnist", "model")
convert = import_example("mlp_mnist", "convert")
main = import_example("mlp_mnist", "main")


# ------------------------------------------------------------ reading local IDX files


@pytest.mark.parametrize("gz", [True, False])
def test_load_dir_reads_idx_files_gzipped_or_not(tmp_path, gz):
    tiny_mnist(tmp_path, n_train=30, n_test=7, gz=gz)
    train_images, train_labels, test_images, test_labels = mnist.load_dir(tmp_path)
    assert train_images.shape == (30, 784) and test_images.shape == (7, 784)
    assert train_labels.shape == (30,) and test_labels.shape == (7,)
    assert train_images.dtype == np.float32
    assert 0.0 <= train_images.min() and train_images.max() == 1.0


def test_load_dir_accepts_a_subset_of_other_counts(tmp_path):
    # A user's own subset in the same format works: no checksum, only format checks.
    tiny_mnist(tmp_path, n_train=11, n_test=3)
    assert mnist.load_dir(tmp_path)[1].size == 11


@pytest.mark.parametrize(
    "name, damage",
    [
        ("train-images-idx3-ubyte", lambda good: good[:-10]),  # truncated
        ("train-labels-idx1-ubyte", lambda good: b"\0\0\x08\x02" + good[4:]),
        ("t10k-images-idx3-ubyte", lambda good: b"\x00\x01"),  # too short
        ("t10k-images-idx3-ubyte", lambda good: b"\0\0\x08\x03" + b"\xff" * 12),
    ],
)
def test_a_damaged_idx_file_is_named(tmp_path, name, damage):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    good = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(damage(good))
    with pytest.raises(ValueError, match="not an IDX file") as error:
        mnist.load_dir(tmp_path)
    assert name in str(error.value)


@pytest.mark.parametrize(
    "name, labels",
    [("train-labels-idx1-ubyte", np.zeros(19)), ("t10k-labels-idx1-ubyte", [12] * 5)],
)
def test_labels_must_be_one_per_image_from_0_to_9(tmp_path, name, labels):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / name, labels)
    with pytest.raises(ValueError, match="N labels from 0 to 9"):
        mnist.load_dir(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda good: b"not gzip at all",
        lambda good: good[:-20],  # truncated
        lambda good: good[:30] + bytes(b ^ 0xFF for b in good[30:60]) + good[60:],
    ],
)
def test_a_damaged_gzip_is_named(tmp_path, damage):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match="cannot read .*train-images-idx3-ubyte.gz"):
        mnist.load_dir(tmp_path)


def test_a_missing_file_is_named(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        mnist.load_dir(tmp_path)


# ---------------------------------------------------------- downloading (file:// URLs)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file:// mirror of tiny MNIST, its MD5 sums in place of MNIST's, and an empty
    home folder for the cache."""
    source = tiny_mnist(tmp_path / "mirror", n_train=20, n_test=5, gz=True)
    checksums = {  # in MNIST's order, which says which file is which
        name: hashlib.md5((source / f"{name}.gz").read_bytes()).hexdigest()
        for name in mnist.MD5
    }
    monkeypatch.setattr(mnist, "MD5", checksums)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return source.as_uri() + "/"


def test_load_downloads_checks_and_caches(tmp_path, mirror):
    data = mnist.load(mirrors=["file:///nonexistent/mirror/", mirror])
    assert data[1].size == 20
    cache = tmp_path / "home/.cache/mlx-examples/mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{name}.gz" for name in mnist.MD5
    )
    # Once cached, nothing is downloaded: the only mirror given does not exist.
    assert mnist.load(mirrors=["file:///nonexistent/mirror/"])[1].size == 20


def test_a_download_cut_short_is_fetched_again(tmp_path, mirror):
    mnist.load(mirrors=[mirror])
    cached = tmp_path / "home/.cache/mlx-examples/mnist/train-images-idx3-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:100])
    assert mnist.load(mirrors=[mirror])[0].shape == (20, 784)


def test_a_wrong_checksum_is_refused_with_what_to_do(tmp_path, mirror):
    mnist.MD5["train-images-idx3-ubyte"] = "0" * 32
    with pytest.raises(ValueError, match="could not download MNIST") as error:
        mnist.load(mirrors=[mirror])
    assert "--data-dir" in str(error.value) and ".cache/mlx-examples/mnist" in str(
        error.value
    )


def test_there_is_a_checksum_for_each_of_the_four_files():
    assert len(mnist.MD5) == 4 and all(len(md5) == 32 for md5 in mnist.MD5.values())


# ---------------------------------------------------------------- training


def test_the_mlp_maps_flat_images_to_ten_logits():
    mlp = model.MLP(num_layers=3, input_dim=784, hidden_dim=32, output_dim=10)
    assert mlp(mx.zeros((5, 784))).shape == (5, 10)


def train(tmp_path, *args):
    data_dir = tiny_mnist(tmp_path / "data")
    return run_script(
        "mlp_mnist/main.py",
        "--data-dir",
        data_dir,
        "--epochs",
        "3",
        "--hidden-dim",
        "32",
        "--batch-size",
        "32",
        "--save",
        tmp_path / "mlp.safetensors",
        *args,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    return train(tmp_path, "--device", "cpu"), tmp_path / "mlp.safetensors"


def test_training_learns_the_tiny_data_and_saves_weights(trained):
    result, weights = trained
    assert result.returncode == 0, result.stderr
    accuracies = [
        float(line.split("Test accuracy ")[1].split(",")[0])
        for line in result.stdout.splitlines()
        if line.startswith("Epoch")
    ]
    assert len(accuracies) == 3
    assert accuracies[-1] > 0.9  # chance is 0.1
    assert weights.is_file() and not list(weights.parent.glob(".*"))


@pytest.mark.parametrize("lr", ["100", "1e30", "nan", "-1"])
def test_a_diverging_run_exits_non_zero_in_one_line_and_saves_nothing(tmp_path, lr):
    result = train(tmp_path, "--lr", lr)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "diverged" in result.stderr and "--lr" in result.stderr
    assert not (tmp_path / "mlp.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-layers", "100000"], "--num-layers: must be from 1 to 16"),
        (["--hidden-dim", "10000000"], "--hidden-dim: must be from 1 to 4096"),
        (["--epochs", "0"], "--epochs: must be from 1"),
        (["--batch-size", "x"], "--batch-size: must be from 1"),
        (["--seed", "-1"], "--seed: must be from 0 to 4294967295"),
        (["--lr", "x"], "--lr: invalid float value"),
        (["--device", "tpu"], "--device: invalid choice"),
    ],
)
def test_bad_flags_are_refused_at_entry_in_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main.parse_args(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_help_names_the_device_flag_and_the_defaults():
    result = run_script("mlp_mnist/main.py", "--help")
    assert "--device {cpu,gpu}" in result.stdout and "(default: 256)" in result.stdout
    assert "--cpu" not in result.stdout


def test_missing_data_is_named_in_one_line(tmp_path):
    result = run_script("mlp_mnist/main.py", "--data-dir", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_a_closed_or_full_stdout_gives_one_line_not_a_traceback(tmp_path, stdout):
    data_dir = tiny_mnist(tmp_path / "data", n_train=64, n_test=16)
    args = ["--data-dir", data_dir, "--epochs", "2", "--hidden-dim", "16"]
    args += ["--save", tmp_path / "w.safetensors"]
    with open("/dev/full", "w") as full:
        process = subprocess.Popen(
            [sys.executable, ROOT / "mlp_mnist/main.py", *args],
            stdout=subprocess.PIPE if stdout == "closed" else full,
            stderr=subprocess.PIPE,
            text=True,
        )
    if stdout == "closed":  # as `| head -c1` does, before the script writes
        process.stdout.close()
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and "error: " in stderr


def interrupt_while_importing(script, *args):
    """Run `python -X importtime script args`, send SIGINT once argparse has been
    imported (the script's first import, then MLX and the rest still load), and return
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


@pytest.mark.parametrize("script", ["mlp_mnist/main.py", "mlp_mnist/convert.py"])
def test_ctrl_c_while_starting_gives_one_line_and_exit_130(tmp_path, script):
    returncode, stderr = interrupt_while_importing(script, "--help")
    assert returncode == 130 and stderr.strip() == "interrupted"


def test_ctrl_c_while_training_gives_one_line_and_saves_nothing(tmp_path):
    data_dir = tiny_mnist(tmp_path / "data", n_train=3000, n_test=16)
    save = tmp_path / "w.safetensors"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "mlp_mnist/main.py"), "--data-dir", str(data_dir)]
        + ["--epochs", "100000", "--batch-size", "8", "--save", str(save)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the first epoch: while MLX's CPU backend compiles its first kernels with
    # the system compiler (through system(), which ignores SIGINT) a Ctrl-C can be lost.
    assert process.stdout.readline().startswith("Epoch 1")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == "interrupted"
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        main.write_atomically(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [
        "w.safetensors"
    ]


def test_the_weights_can_be_saved_into_a_new_folder(tmp_path):
    main.write_atomically(tmp_path / "new" / "w.safetensors", lambda f: f.write(b"x"))
    assert (tmp_path / "new" / "w.safetensors").read_bytes() == b"x"


def test_the_saved_weights_get_the_users_umask(tmp_path):
    path = tmp_path / "w.safetensors"
    old = os.umask(0o027)
    try:
        main.write_atomically(path, lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------- convert.py


def test_convert_to_pytorch_and_back_gives_the_same_predictions(tmp_path, trained):
    weights = trained[1]
    assert (
        run_script("mlp_mnist/convert.py", weights, tmp_path / "mlp.pt").returncode == 0
    )
    back = tmp_path / "back.safetensors"
    assert run_script("mlp_mnist/convert.py", tmp_path / "mlp.pt", back).returncode == 0

    X = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    mlx_logits = np.array(convert.load_mlx_model(weights)(mx.array(X)))
    with torch.no_grad():
        torch_logits = convert.load_torch_model(tmp_path / "mlp.pt")(
            torch.from_numpy(X)
        ).numpy()
    back_logits = np.array(convert.load_mlx_model(back)(mx.array(X)))

    np.testing.assert_allclose(torch_logits, mlx_logits, rtol=1e-5, atol=1e-5)
    assert (torch_logits.argmax(1) == mlx_logits.argmax(1)).all()
    np.testing.assert_array_equal(back_logits, mlx_logits)  # the round trip is exact


def test_convert_names_keys_that_do_not_match(tmp_path):
    state_dict = convert.TorchMLP(2, 784, 16, 10).state_dict()
    state_dict["net.9.weight"] = state_dict.pop("net.4.weight")
    config = dict(num_layers=2, input_dim=784, hidden_dim=16, output_dim=10)
    torch.save({"config": config, "state_dict": state_dict}, tmp_path / "bad.pt")
    error = convert_error(tmp_path / "bad.pt", tmp_path / "out.safetensors")
    assert "net.4.weight" in error and "net.9.weight" in error
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_rejects_a_corrupt_file_in_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    error = convert_error(tmp_path / "bad.safetensors", tmp_path / "out.pt")
    assert "bad.safetensors" in error and "\n" not in error
    assert not (tmp_path / "out.pt").exists()


def convert_error(*argv):
    """The one-line message with which convert.py's main() exits."""
    with pytest.raises(SystemExit) as exit:
        convert.main([str(arg) for arg in argv])
    assert str(exit.value.code).startswith("error: ")
    return str(exit.value.code)


def save_mlx(path, weights, config):
    mx.save_safetensors(
        str(path), weights, metadata={} if config is None else {"config": config}
    )


GOOD_CONFIG = dict(num_layers=1, input_dim=4, hidden_dim=3, output_dim=2)
GOOD_WEIGHTS = {
    "layers.0.weight": mx.zeros((3, 4)),
    "layers.0.bias": mx.zeros((3,)),
    "layers.1.weight": mx.zeros((2, 3)),
    "layers.1.bias": mx.zeros((2,)),
}


@pytest.mark.parametrize(
    "weights, config, message",
    [
        (GOOD_WEIGHTS, None, "no model configuration"),
        (GOOD_WEIGHTS, "{not json", "not valid JSON"),
        (GOOD_WEIGHTS, json.dumps({"num_layers": 1}), "expected the keys"),
        (
            GOOD_WEIGHTS,
            json.dumps({**GOOD_CONFIG, "hidden_dim": "3"}),
            "hidden_dim='3'",
        ),
        (GOOD_WEIGHTS, json.dumps({**GOOD_CONFIG, "num_layers": -1}), "num_layers=-1"),
        (
            GOOD_WEIGHTS,
            json.dumps({**GOOD_CONFIG, "hidden_dim": 10**12}),
            "has shape (3, 4), expected (1000000000000, 4)",
        ),
        (
            {**GOOD_WEIGHTS, "layers.0.weight": mx.zeros((3, 4), mx.int32)},
            json.dumps(GOOD_CONFIG),
            "not floating point",
        ),
        (
            {**GOOD_WEIGHTS, "layers.1.bias": mx.zeros((2,), mx.bool_)},
            json.dumps(GOOD_CONFIG),
            "not floating point",
        ),
    ],
)
def test_convert_refuses_damaged_mlx_files_in_one_line(
    tmp_path, weights, config, message
):
    save_mlx(tmp_path / "in.safetensors", weights, config)
    error = convert_error(tmp_path / "in.safetensors", tmp_path / "out.pt")
    assert message in error and "\n" not in error
    assert not (tmp_path / "out.pt").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "content", ["pickle", "int tensors", "not tensors", "bad config"]
)
def test_convert_refuses_damaged_or_foreign_pytorch_files_in_one_line(
    tmp_path, content
):
    marker = tmp_path / "pwned"
    state_dict = convert.TorchMLP(**GOOD_CONFIG).state_dict()
    checkpoint = {"config": GOOD_CONFIG, "state_dict": state_dict}
    if content == "pickle":
        Exploit.marker = marker
        checkpoint["config"] = Exploit()
    elif content == "int tensors":
        state_dict["net.0.weight"] = state_dict["net.0.weight"].int()
    elif content == "not tensors":
        checkpoint["state_dict"] = {k: v.tolist() for k, v in state_dict.items()}
    else:
        checkpoint["config"] = {**GOOD_CONFIG, "output_dim": 0}
    torch.save(checkpoint, tmp_path / "in.pt")
    error = convert_error(tmp_path / "in.pt", tmp_path / "out.safetensors")
    assert "in.pt" in error and "\n" not in error
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    "source, output, message",
    [
        ("missing.safetensors", "out.pt", "does not exist"),
        ("folder.safetensors", "out.pt", "is not a file"),
        ("in.safetensors", "folder.pt", "Is a directory"),
        ("in.safetensors", "a_file/out.pt", "a_file"),
        ("in.safetensors", "out.npz", "cannot convert .safetensors to .npz"),
    ],
)
def test_convert_says_which_path_is_wrong_in_one_line(
    tmp_path, source, output, message
):
    save_mlx(tmp_path / "in.safetensors", GOOD_WEIGHTS, json.dumps(GOOD_CONFIG))
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "a_file").write_text("")
    if output in ("folder.pt", "a_file/out.pt"):  # found where __main__ catches it
        result = run_script("mlp_mnist/convert.py", source, output, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        error = result.stderr.strip()
    else:
        error = convert_error(tmp_path / source, tmp_path / output)
    assert message in error and "\n" not in error
