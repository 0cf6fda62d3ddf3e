"""MNIST: four IDX files (http://yann.lecun.com/exdb/mnist/), gzipped or not.

Downloaded once to a cache, each file checked against the MD5 sum of the original, or
read from a folder of your own. An IDX file is a big-endian uint32 magic number (2051
for images, 2049 for labels), the dimensions (count, rows, cols; or count), then one
byte per pixel or label.
"""

import contextlib
import gzip
import hashlib
import math
import urllib.request
import zlib
from pathlib import Path

import numpy as np

MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
# The four files, each with the MD5 sum of its original .gz from yann.lecun.com.
MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


def read_idx(path):
    """The uint8 array of the IDX file `path` or `path`.gz: (count, rows, cols) images
    or (count,) labels."""
    if not path.is_file():
        path = path.with_name(f"{path.name}.gz")
    try:
        data = path.read_bytes()
        data = gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error) as e:  # missing, or a damaged .gz
        raise ValueError(f"cannot read {path}: {e}") from None
    # A magic number of 0, 0, 8 (unsigned bytes) and the number of dimensions, then the
    # dimensions as big-endian uint32, then the bytes.
    ndim = data[3] if len(data) > 3 and data[:3] == b"\0\0\x08" else 0
    shape = np.frombuffer(data[4 : 4 + 4 * ndim], ">u4").tolist()
    if ndim not in (1, 3) or len(data) != 4 + 4 * ndim + math.prod(shape):
        raise ValueError(f"{path} is not an IDX file of bytes (magic number, size)")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_dir(folder):
    """train_images, train_labels, test_images, test_labels: images (N, rows * cols)
    float32 in [0, 1], labels (N,) uint32."""
    data = [read_idx(Path(folder) / name) for name in MD5]
    for images, labels in (data[:2], data[2:]):
        n = len(labels)
        if images.ndim != 3 or len(images) != n or not n or labels.max() > 9:
            raise ValueError(f"{folder}: expected N images, N labels from 0 to 9")
    images = [x.reshape(len(x), -1) / np.float32(255) for x in data[::2]]
    labels = [y.astype(np.uint32) for y in data[1::2]]
    return images[0], labels[0], images[1], labels[1]


def md5(path):
    return path.is_file() and hashlib.md5(path.read_bytes()).hexdigest()


def load(data_dir=None, mirrors=MIRRORS):
    """MNIST from `data_dir` if given (never downloads), else from a cache, downloading
    each file that is not there with its MD5 sum (so a download cut short is redone)."""
    if data_dir is not None:
        return load_dir(data_dir)
    cache = Path.home() / ".cache" / "mlx-examples" / "mnist"
    cache.mkdir(parents=True, exist_ok=True)
    for name, checksum in MD5.items():
        path = cache / f"{name}.gz"
        for mirror in mirrors:
            if md5(path) != checksum:
                print(f"Downloading {mirror}{path.name}", flush=True)
                with contextlib.suppress(OSError):  # URLError, timeouts
                    urllib.request.urlretrieve(mirror + path.name, path)
        if md5(path) != checksum:
            raise ValueError(
                f"could not download MNIST; put its four .gz files in {cache}, or the "
                "files in any folder and pass --data-dir"
            )
    return load_dir(cache)
