"""MNIST: download once to a cache (checked against known MD5 sums), or read a local copy.

The data are four IDX files (http://yann.lecun.com/exdb/mnist/), each optionally gzipped:

    train-images-idx3-ubyte   magic 2051, then uint32 count, rows, cols, then count*rows*cols bytes
    train-labels-idx1-ubyte   magic 2049, then uint32 count, then count bytes (0..9)
    t10k-images-idx3-ubyte    the test set, same formats
    t10k-labels-idx1-ubyte

All header integers are big-endian.
"""

import gzip
import hashlib
import math
import os
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from outputs import atomic_write

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Public mirrors of the original gzipped files, tried in order. The MD5 sums are those of the
# original files from yann.lecun.com (the same sums torchvision checks).
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


class DataError(Exception):
    """The data could not be found, downloaded or read. The message says what to do."""


def default_cache_dir():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(cache) / "mlx-examples" / "mnist"


def expected_files_message(directory):
    names = ", ".join(f"{name}[.gz]" for name in FILES.values())
    return f"put the four MNIST IDX files in {directory}: {names}"


# ---------------------------------------------------------------- reading IDX files


def find_file(directory, name):
    """`name` or `name.gz` in `directory`, or None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path):
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (
        OSError,
        EOFError,
        zlib.error,
    ) as e:  # gzip.BadGzipFile is an OSError; zlib.error: damaged data
        raise DataError(f"cannot read {path}: {e}") from None


def parse_idx(path, magic):
    """Parse one IDX file; return a uint8 array of shape (count,) or (count, rows, cols)."""
    data = read_bytes(path)
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    found_magic, *shape = struct.unpack(f">{1 + ndim}I", data[:header_size])
    if found_magic != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path} is not an IDX {kind} file: magic number {found_magic}, expected {magic}"
        )
    expected = header_size + math.prod(shape)
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes, but its header {tuple(shape)} needs {expected}"
        )
    if ndim == 3 and 0 in shape[1:]:
        raise DataError(
            f"{path} holds images of {shape[1]}x{shape[2]} pixels; each needs at least one"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_dir(directory):
    """Read and check the four files in `directory`. Returns a dict of numpy arrays:
    train_images (N, rows*cols) float32 in [0, 1], train_labels (N,) uint32, and the same for test."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{directory} is not a folder; " + expected_files_message("a folder")
        )
    paths = {key: find_file(directory, name) for key, name in FILES.items()}
    missing = [FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{directory} lacks {', '.join(missing)} (gzipped or not)")

    data = {}
    for split in ("train", "test"):
        images = parse_idx(paths[f"{split}_images"], IMAGES_MAGIC)
        labels = parse_idx(paths[f"{split}_labels"], LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{split}: {len(images)} images but {len(labels)} labels in {directory}"
            )
        if len(images) == 0:
            raise DataError(f"{split}: {paths[f'{split}_images']} holds no images")
        if labels.max() > 9:
            raise DataError(
                f"{split}: label {labels.max()} in {paths[f'{split}_labels']}; MNIST labels are 0..9"
            )
        data[f"{split}_images"] = (
            images.reshape(len(images), -1).astype(np.float32) / 255.0
        )
        data[f"{split}_labels"] = labels.astype(np.uint32)
    if data["train_images"].shape[1] != data["test_images"].shape[1]:
        raise DataError(f"train and test images differ in size in {directory}")
    return data


# ---------------------------------------------------------------- downloading


def download(url, destination, md5, timeout=30):
    """Fetch `url` (at most 10 MB) to `destination`: the file appears only whole and with the right MD5."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    if (found := hashlib.md5(data).hexdigest()) != md5:
        raise DataError(f"{url} has MD5 {found}, expected {md5}")
    atomic_write(destination, lambda tmp: Path(tmp).write_bytes(data))


def fetch(cache_dir, mirrors=MIRRORS, checksums=MD5):
    """Download whatever of the four gzipped files `cache_dir` lacks, trying each mirror in turn."""
    cache_dir = Path(cache_dir)
    for name, md5 in checksums.items():
        if find_file(
            cache_dir, name.removesuffix(".gz")
        ):  # downloaded before, or put there by hand
            continue
        errors = []
        for mirror in mirrors:
            try:
                print(f"Downloading {mirror}{name}", flush=True)
                download(mirror + name, cache_dir / name, md5)
                break
            except (
                OSError,
                ValueError,
                DataError,
            ) as e:  # URLError and timeouts are OSErrors
                errors.append(f"{mirror}{name}: {getattr(e, 'reason', e)}")
        else:
            raise DataError(
                f"could not download MNIST ({'; '.join(errors)}). Download the files by hand and "
                f"{expected_files_message(cache_dir)} (or pass --data-dir DIR)"
            )


def load(data_dir=None, mirrors=MIRRORS):
    """MNIST from `data_dir` if given (never downloads), else from the cache, downloading it once."""
    if data_dir is not None:
        return load_dir(data_dir)
    cache_dir = default_cache_dir()
    fetch(cache_dir, mirrors)
    return load_dir(cache_dir)
