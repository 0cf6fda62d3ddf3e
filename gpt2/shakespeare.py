"""Tiny Shakespeare (Karpathy's char-rnn data, ~1M characters), main.py's default text: downloaded
once to ~/.cache/mlx-examples/tinyshakespeare/input.txt (or $XDG_CACHE_HOME), its SHA-256 checked."""

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from save import write_atomically

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def cached(url=URL):
    """The path of the cached copy, downloaded from `url` first if it is not there yet."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    path = Path(cache) / "mlx-examples" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        download(path, url)
    return path


def download(path, url=URL):
    """Download Tiny Shakespeare to `path`, checking its SHA-256; ValueError (one line) if that fails."""
    print(f"Downloading Tiny Shakespeare from {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except Exception as e:  # URLError, timeouts, HTTP errors
        raise ValueError(
            f"cannot download Tiny Shakespeare from {url} ({e}); download input.txt by hand "
            f"to {path}, or pass --data PATH to any text file"
        ) from None
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise ValueError(
            f"the file downloaded from {url} is not Tiny Shakespeare (SHA-256 mismatch); "
            f"put the right input.txt in {path} by hand"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
