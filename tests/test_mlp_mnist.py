import hashlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from helpers import import_example, run_script, tiny_mnist, write_idx

mnist = import_example("mlp_mnist", "mnist")
model = import_example("mlp_mnist", "model")
convert = import_example("mlp_mnist", "convert")


# ---------------------------------------------------------------- reading local IDX files


@pytest.mark.parametrize("gz", [True, False])
def test_load_dir_reads_idx_files_gzipped_or_not(tmp_path, gz):
    tiny_mnist(tmp_path, n_train=30, n_test=7, gz=gz)
    data = mnist.load_dir(tmp_path)
    assert data["train_images"].shape == (30, 784) and data["test_images"].shape == (7, 784)
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


@pytest.mark.parametrize("name, make_bytes, message", [
    ("train-images-idx3-ubyte", lambda good: good[:-10], "needs"),                    # truncated
    ("train-labels-idx1-ubyte", lambda good: b"\x00\x00\x08\x03" + good[4:], "magic"),  # wrong magic
    ("t10k-images-idx3-ubyte", lambda good: b"\x00\x01", "too short"),
])
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


def test_load_dir_rejects_a_broken_gzip(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(mnist.DataError, match="cannot read"):
        mnist.load_dir(tmp_path)


def test_load_dir_lists_the_missing_files(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(mnist.DataError, match="t10k-labels-idx1-ubyte"):
        mnist.load_dir(tmp_path)


# ---------------------------------------------------------------- downloading (from file:// URLs, offline)


def mirror_of_tiny_mnist(tmp_path):
    source = tiny_mnist(tmp_path / "mirror", n_train=20, n_test=5, gz=True)
    checksums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()}
    return source.as_uri() + "/", checksums


def test_fetch_downloads_checks_and_caches(tmp_path):
    url, checksums = mirror_of_tiny_mnist(tmp_path)
    cache = tmp_path / "cache"
    mnist.fetch(cache, mirrors=["file:///nonexistent/mirror/", url], checksums=checksums)  # first one fails
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
    assert not list(cache.glob("*.part"))


def test_the_real_checksums_are_those_of_the_original_files():
    assert set(mnist.MD5) == {name + ".gz" for name in mnist.FILES.values()}
    assert mnist.MD5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"


# ---------------------------------------------------------------- the model and its PyTorch twin


def test_mlp_shapes():
    mlp = model.MLP(num_layers=3, input_dim=784, hidden_dim=32, output_dim=10)
    assert len(mlp.layers) == 4
    assert mlp(mx.zeros((5, 784))).shape == (5, 10)


def trained_weights(tmp_path):
    data_dir = tiny_mnist(tmp_path / "data")
    result = run_script("mlp_mnist/main.py", "--data-dir", data_dir, "--epochs", "3", "--hidden-dim", "32",
                        "--batch-size", "32", "--save", tmp_path / "mlp.safetensors")
    assert result.returncode == 0, result.stderr
    return result, tmp_path / "mlp.safetensors"


def test_training_learns_the_tiny_data_and_saves_weights(tmp_path):
    result, weights = trained_weights(tmp_path)
    accuracies = [float(line.split("Test accuracy ")[1].split(",")[0])
                  for line in result.stdout.splitlines() if line.startswith("Epoch")]
    assert len(accuracies) == 3
    assert accuracies[-1] > 0.9  # chance is 0.1
    assert weights.is_file()


def test_convert_to_pytorch_and_back_gives_the_same_predictions(tmp_path):
    _, weights = trained_weights(tmp_path)
    assert run_script("mlp_mnist/convert.py", weights, tmp_path / "mlp.pt").returncode == 0
    assert run_script("mlp_mnist/convert.py", tmp_path / "mlp.pt", tmp_path / "back.safetensors").returncode == 0

    X = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    mlx_logits = np.array(convert.load_mlx_model(weights)(mx.array(X)))
    with torch.no_grad():
        torch_logits = convert.load_torch_model(tmp_path / "mlp.pt")(torch.from_numpy(X)).numpy()
    back_logits = np.array(convert.load_mlx_model(tmp_path / "back.safetensors")(mx.array(X)))

    np.testing.assert_allclose(torch_logits, mlx_logits, rtol=1e-5, atol=1e-5)
    assert (torch_logits.argmax(1) == mlx_logits.argmax(1)).all()
    np.testing.assert_array_equal(back_logits, mlx_logits)  # the round trip is exact


def test_convert_names_keys_that_do_not_match(tmp_path):
    state_dict = convert.TorchMLP(2, 784, 16, 10).state_dict()
    state_dict["net.9.weight"] = state_dict.pop("net.4.weight")
    torch.save({"config": dict(num_layers=2, input_dim=784, hidden_dim=16, output_dim=10),
                "state_dict": state_dict}, tmp_path / "bad.pt")
    result = run_script("mlp_mnist/convert.py", tmp_path / "bad.pt", tmp_path / "out.safetensors")
    assert result.returncode == 1
    assert "net.4.weight" in result.stderr and "net.9.weight" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_rejects_a_corrupt_file_in_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    result = run_script("mlp_mnist/convert.py", tmp_path / "bad.safetensors", tmp_path / "out.pt")
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
    result = run_script("mlp_mnist/main.py", "--mirror", "http://127.0.0.1:9/", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "could not download MNIST" in last_line and "--data-dir" in last_line
    assert str(tmp_path / "mlx-examples" / "mnist") in last_line  # where to put the files by hand
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-written in the cache


def test_main_rejects_unknown_flags():
    result = run_script("mlp_mnist/main.py", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
