import hashlib
import json
import os
import re
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
outputs = import_example("mlp_mnist", "outputs")
main = import_example("mlp_mnist", "main")


# ---------------------------------------------------------------- reading local IDX files


@pytest.mark.parametrize("gz", [True, False])
def test_load_dir_reads_idx_files_gzipped_or_not(tmp_path, gz):
    tiny_mnist(tmp_path, n_train=30, n_test=7, gz=gz)
    data = mnist.load_dir(tmp_path)
    assert data["train_images"].shape == (30, 784) and data["test_images"].shape == (
        7,
        784,
    )
    assert data["train_labels"].shape == (30,) and data["test_labels"].shape == (7,)
    assert data["train_images"].dtype == np.float32
    assert 0.0 <= data["train_images"].min() and data["train_images"].max() == 1.0


def test_load_dir_accepts_a_subset_of_other_counts(tmp_path):
    # A user's own subset in the same format works: no checksum, only format checks.
    tiny_mnist(tmp_path, n_train=11, n_test=3)
    assert mnist.load_dir(tmp_path)["train_labels"].size == 11


def corrupt(tmp_path, name, data):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    (tmp_path / name).write_bytes(data)


@pytest.mark.parametrize(
    "name, make_bytes, message",
    [
        ("train-images-idx3-ubyte", lambda good: good[:-10], "needs"),  # truncated
        (
            "train-labels-idx1-ubyte",
            lambda good: b"\x00\x00\x08\x03" + good[4:],
            "magic",
        ),  # wrong magic
        ("t10k-images-idx3-ubyte", lambda good: b"\x00\x01", "too short"),
    ],
)
def test_load_dir_names_the_bad_file(tmp_path, name, make_bytes, message):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    good = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(make_bytes(good))
    with pytest.raises(mnist.DataError, match=message) as error:
        mnist.load_dir(tmp_path)
    assert name in str(error.value)


def test_load_dir_rejects_counts_that_disagree(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19))
    with pytest.raises(mnist.DataError, match="20 images but 19 labels"):
        mnist.load_dir(tmp_path)


def test_load_dir_rejects_labels_outside_0_to_9(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(5, 12))
    with pytest.raises(mnist.DataError, match="label 12"):
        mnist.load_dir(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda good: b"not gzip at all",
        lambda good: good[:-20],  # truncated
        lambda good: (
            good[:30] + bytes(b ^ 0xFF for b in good[30:60]) + good[60:]
        ),  # damaged deflate stream
    ],
)
def test_load_dir_rejects_a_damaged_gzip_in_one_error(tmp_path, damage):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(
        mnist.DataError, match="cannot read .*train-images-idx3-ubyte.gz"
    ):
        mnist.load_dir(tmp_path)


@pytest.mark.parametrize("rows, cols", [(0, 0), (28, 0)])
def test_load_dir_refuses_images_without_pixels(tmp_path, rows, cols):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((20, rows, cols)))
    with pytest.raises(mnist.DataError, match=f"images of {rows}x{cols} pixels"):
        mnist.load_dir(tmp_path)


def test_a_header_with_huge_counts_is_named_not_overflowed(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(
        b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3 + path.read_bytes()[16:]
    )
    with pytest.raises(
        mnist.DataError, match=str(16 + (2**32 - 1) ** 3)
    ):  # exact, not wrapped around
        mnist.load_dir(tmp_path)


def test_load_dir_lists_the_missing_files(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(mnist.DataError, match="t10k-labels-idx1-ubyte"):
        mnist.load_dir(tmp_path)


# ---------------------------------------------------------------- downloading (from file:// URLs, offline)


def mirror_of_tiny_mnist(tmp_path):
    source = tiny_mnist(tmp_path / "mirror", n_train=20, n_test=5, gz=True)
    checksums = {
        p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()
    }
    return source.as_uri() + "/", checksums


def test_fetch_downloads_checks_and_caches(tmp_path):
    url, checksums = mirror_of_tiny_mnist(tmp_path)
    cache = tmp_path / "cache"
    mnist.fetch(
        cache, mirrors=["file:///nonexistent/mirror/", url], checksums=checksums
    )  # first one fails
    assert sorted(p.name for p in cache.iterdir()) == sorted(checksums)
    assert mnist.load_dir(cache)["train_labels"].size == 20
    # A second fetch finds everything in the cache and never touches the (now unreachable) mirror.
    mnist.fetch(cache, mirrors=["file:///nonexistent/mirror/"], checksums=checksums)


def test_fetch_rejects_a_wrong_checksum_and_leaves_no_file(tmp_path):
    url, checksums = mirror_of_tiny_mnist(tmp_path)
    checksums["train-images-idx3-ubyte.gz"] = "0" * 32
    cache = tmp_path / "cache"
    with pytest.raises(mnist.DataError, match="MD5") as error:
        mnist.fetch(cache, mirrors=[url], checksums=checksums)
    assert "--data-dir" in str(error.value)
    assert not (cache / "train-images-idx3-ubyte.gz").exists()
    assert not list(cache.glob(".*"))  # no temporary file either


def test_there_is_a_checksum_for_each_of_the_four_files():
    assert set(mnist.MD5) == {name + ".gz" for name in mnist.FILES.values()}


# ---------------------------------------------------------------- the model and its PyTorch twin


def test_mlp_shapes():
    mlp = model.MLP(num_layers=3, input_dim=784, hidden_dim=32, output_dim=10)
    assert len(mlp.layers) == 4
    assert mlp(mx.zeros((5, 784))).shape == (5, 10)


def trained_weights(tmp_path):
    data_dir = tiny_mnist(tmp_path / "data")
    result = run_script(
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
    )
    assert result.returncode == 0, result.stderr
    return result, tmp_path / "mlp.safetensors"


def test_training_learns_the_tiny_data_and_saves_weights(tmp_path):
    result, weights = trained_weights(tmp_path)
    accuracies = [
        float(line.split("Test accuracy ")[1].split(",")[0])
        for line in result.stdout.splitlines()
        if line.startswith("Epoch")
    ]
    assert len(accuracies) == 3
    assert accuracies[-1] > 0.9  # chance is 0.1
    assert weights.is_file()


def test_convert_to_pytorch_and_back_gives_the_same_predictions(tmp_path):
    _, weights = trained_weights(tmp_path)
    assert (
        run_script("mlp_mnist/convert.py", weights, tmp_path / "mlp.pt").returncode == 0
    )
    assert (
        run_script(
            "mlp_mnist/convert.py", tmp_path / "mlp.pt", tmp_path / "back.safetensors"
        ).returncode
        == 0
    )

    X = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    mlx_logits = np.array(convert.load_mlx_model(weights)(mx.array(X)))
    with torch.no_grad():
        torch_logits = convert.load_torch_model(tmp_path / "mlp.pt")(
            torch.from_numpy(X)
        ).numpy()
    back_logits = np.array(
        convert.load_mlx_model(tmp_path / "back.safetensors")(mx.array(X))
    )

    np.testing.assert_allclose(torch_logits, mlx_logits, rtol=1e-5, atol=1e-5)
    assert (torch_logits.argmax(1) == mlx_logits.argmax(1)).all()
    np.testing.assert_array_equal(back_logits, mlx_logits)  # the round trip is exact


def test_convert_names_keys_that_do_not_match(tmp_path):
    state_dict = convert.TorchMLP(2, 784, 16, 10).state_dict()
    state_dict["net.9.weight"] = state_dict.pop("net.4.weight")
    torch.save(
        {
            "config": dict(num_layers=2, input_dim=784, hidden_dim=16, output_dim=10),
            "state_dict": state_dict,
        },
        tmp_path / "bad.pt",
    )
    result = run_script(
        "mlp_mnist/convert.py", tmp_path / "bad.pt", tmp_path / "out.safetensors"
    )
    assert result.returncode == 1
    assert "net.4.weight" in result.stderr and "net.9.weight" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_rejects_a_corrupt_file_in_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    result = run_script(
        "mlp_mnist/convert.py", tmp_path / "bad.safetensors", tmp_path / "out.pt"
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "bad.safetensors" in result.stderr
    assert not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- the command line


def test_main_explains_missing_data(tmp_path):
    result = run_script("mlp_mnist/main.py", "--data-dir", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr


def test_main_explains_an_unreachable_download(tmp_path):
    # No --data-dir and an empty cache, so main.py downloads: from a closed local port, which fails at once.
    result = run_script(
        "mlp_mnist/main.py",
        "--mirror",
        "http://127.0.0.1:9/",
        env={"XDG_CACHE_HOME": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "could not download MNIST" in last_line and "--data-dir" in last_line
    assert (
        str(tmp_path / "mlx-examples" / "mnist") in last_line
    )  # where to put the files by hand
    assert not any(
        p.is_file() for p in tmp_path.rglob("*")
    )  # nothing half-written in the cache


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "--lr: must be a positive finite number, got nan"),
        (["--lr", "inf"], "--lr: must be a positive finite number"),
        (["--lr", "-1"], "--lr: must be a positive finite number"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--batch-size", "x"], "--batch-size: must be a positive integer"),
        (["--seed", "-1"], "--seed: must be an integer from 0 to 2**32 - 1"),
        (["--seed", str(2**32)], "--seed: must be an integer from 0 to 2**32 - 1"),
        (["--save", "w.npz"], "--save: must end in .safetensors"),
    ],
)
def test_main_refuses_bad_flags_at_entry_in_one_line(tmp_path, args, message):
    result = run_script(
        "mlp_mnist/main.py", "--data-dir", tmp_path, *args, cwd=tmp_path
    )
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path):
    data = tiny_mnist(tmp_path / "data", n_train=20, n_test=5)
    result = run_script(
        "mlp_mnist/main.py",
        "--data-dir",
        data,
        "--hidden-dim",
        "10000000",
        cwd=tmp_path,
    )
    assert (
        result.returncode == 1
        and "use a smaller --hidden-dim" in result.stderr.strip().splitlines()[-1]
    )


def test_a_non_finite_loss_stops_training_and_saves_nothing(tmp_path):
    data = tiny_mnist(tmp_path / "data", n_train=64, n_test=16)
    result = run_script(
        "mlp_mnist/main.py",
        "--data-dir",
        data,
        "--hidden-dim",
        "16",
        "--lr",
        "1e30",
        "--save",
        tmp_path / "w.safetensors",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the loss is nan" in result.stderr and "nothing was saved" in result.stderr
    assert not (tmp_path / "w.safetensors").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "save, message",
    [
        ("folder.safetensors", "is a folder"),
        ("a_file/w.safetensors", "a_file is a file, not a folder"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_training(
    tmp_path, save, message
):
    data = tiny_mnist(tmp_path / "data", n_train=64, n_test=16)
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "a_file").write_text("")
    result = run_script(
        "mlp_mnist/main.py",
        "--data-dir",
        data,
        "--hidden-dim",
        "16",
        "--save",
        save,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        message in result.stderr.strip().splitlines()[-1]
        and "Epoch" not in result.stdout
    )


def test_the_saved_weights_get_the_users_umask(tmp_path):
    data = tiny_mnist(tmp_path / "data", n_train=64, n_test=16)
    subprocess.run(
        f"umask 027 && {sys.executable} {ROOT / 'mlp_mnist/main.py'} --data-dir {data} --epochs 1 "
        f"--hidden-dim 16 --save {tmp_path / 'w.safetensors'}",
        shell=True,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640


class StopAfter:
    """Stands in for main.Stop: reports Ctrl-C once `signal` has been read `n` times (once a step)."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def signal(self):
        self.reads += 1
        return signal.SIGINT if self.reads >= self.n else None


def test_an_interrupt_saves_exactly_the_step_it_stopped_at(tmp_path, monkeypatch):
    # 64 images in batches of 16: 4 steps an epoch. Stopped after step 4 of a 3-epoch run, the saved
    # weights must be those of a run of exactly 1 epoch, bit for bit.
    data = tiny_mnist(tmp_path / "data", n_train=64, n_test=16)
    args = [
        "--data-dir",
        str(data),
        "--hidden-dim",
        "16",
        "--batch-size",
        "16",
        "--cpu",
    ]
    main.main(
        args + ["--epochs", "1", "--save", str(tmp_path / "one_epoch.safetensors")]
    )
    monkeypatch.setattr(main, "Stop", lambda: StopAfter(4))
    with pytest.raises(SystemExit) as stopped:
        main.main(
            args + ["--epochs", "3", "--save", str(tmp_path / "stopped.safetensors")]
        )
    assert stopped.value.code == 130
    (expected, _), (saved, metadata) = (
        mx.load(str(tmp_path / f), return_metadata=True)
        for f in ("one_epoch.safetensors", "stopped.safetensors")
    )
    assert metadata["steps"] == "4"
    for name in expected:
        np.testing.assert_array_equal(np.array(saved[name]), np.array(expected[name]))


def test_ctrl_c_while_training_saves_that_step_and_exits_130_with_one_line(tmp_path):
    data = tiny_mnist(tmp_path / "data", n_train=3000, n_test=16)
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "mlp_mnist/main.py"),
            "--data-dir",
            str(data),
            "--epochs",
            "1000",
            "--batch-size",
            "8",
            "--save",
            str(tmp_path / "w.safetensors"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the estimate, 2 s into training: MLX's CPU backend compiles its first kernels with the
    # system compiler through system(), which ignores SIGINT meanwhile, so an earlier Ctrl-C can be lost.
    while not process.stderr.readline().startswith("about "):
        pass
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert (
        re.match(r"interrupted at epoch \d+, step ", last)
        and "saved the weights after that step" in last
    )
    weights, metadata = mx.load(str(tmp_path / "w.safetensors"), return_metadata=True)
    assert f"({metadata['steps']} steps)" in last
    assert all(mx.all(mx.isfinite(w)).item() for w in weights.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "w.safetensors",
    ]  # no temporary file left


# ---------------------------------------------------------------- writing outputs


def test_atomic_write_leaves_no_temporary_file_and_the_old_file_when_the_writer_fails(
    tmp_path,
):
    (tmp_path / "w.safetensors").write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError(
            "[write] Unable to write 334556 bytes to file."
        )  # what MLX says on a full disk

    with pytest.raises(
        outputs.OutputError,
        match=r"cannot write .*w.safetensors: \[write\] Unable.*MB free",
    ):
        outputs.atomic_write(tmp_path / "w.safetensors", fail)
    assert (tmp_path / "w.safetensors").read_text() == "old" and len(
        list(tmp_path.iterdir())
    ) == 1


def test_atomic_write_removes_its_temporary_file_on_sigterm(tmp_path):
    before = signal.getsignal(
        signal.SIGTERM
    )  # another test in this process may have set its own
    with pytest.raises(SystemExit) as terminated:
        outputs.atomic_write(
            tmp_path / "w.pt",
            lambda tmp: (
                open(tmp, "w").write("half"),
                os.kill(os.getpid(), signal.SIGTERM),
            ),
        )
    assert terminated.value.code == 143 and not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) == before  # and puts the handler back


def test_atomic_write_cleans_the_temporary_files_of_killed_writers(tmp_path):
    dead = (
        tmp_path / ".w.pt.999999999.abcd.tmp.pt"
    )  # no such process: pids stop below 2**22
    alive = tmp_path / f".w.pt.{os.getppid()}.abcd.tmp.pt"  # a writer that still runs
    dead.write_text("left by kill -9")
    alive.write_text("being written")
    outputs.atomic_write(tmp_path / "w.pt", lambda tmp: open(tmp, "w").write("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "w.pt"])


def test_a_full_disk_is_refused_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(
        outputs.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})()
    )
    with pytest.raises(
        outputs.OutputError, match="needs 2.0 MB, its disk has 0.0 MB free"
    ):
        outputs.check_writable(tmp_path / "w.safetensors", size=2_000_000)


# ---------------------------------------------------------------- convert.py and bad input


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
    result = run_script(
        "mlp_mnist/convert.py", tmp_path / "in.safetensors", tmp_path / "out.pt"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
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
    result = run_script(
        "mlp_mnist/convert.py", tmp_path / "in.pt", tmp_path / "out.safetensors"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "in.pt" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    "source, output, message",
    [
        ("missing.safetensors", "out.pt", "does not exist"),
        ("folder.safetensors", "out.pt", "is not a file"),
        ("in.safetensors", "folder.pt", "is a folder"),
        ("in.safetensors", "a_file/out.pt", "a_file is a file, not a folder"),
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
    result = run_script("mlp_mnist/convert.py", source, output, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
