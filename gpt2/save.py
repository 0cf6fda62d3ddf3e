"""Writing a file atomically, for the weights (convert.py), the checkpoint and the
generated text (main.py): a reader finds the old file or the new one, never half of one.
"""

import json
import os
from pathlib import Path

import mlx.core as mx


def json_array(value):
    """A JSON-able value as the uint8 array of its JSON bytes, stored beside weights."""
    return mx.array(list(json.dumps(value).encode()), dtype=mx.uint8)


def write_atomically(path, write):
    """Call write(temporary path) in `path`'s folder, then rename it to `path`.

    A write that fails or is interrupted leaves the old file whole and no temporary
    file; one killed with SIGKILL leaves the temporary file, which the next write of the
    same path replaces. The file gets the permissions of a new file under the umask."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # mx.savez wants .npz
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~umask)  # MLX creates its files 0o644 whatever the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_arrays(path, arrays):
    """Write {name: array} to `path` (.npz or .safetensors) atomically."""
    if Path(path).suffix == ".npz":
        write_atomically(path, lambda tmp: mx.savez(tmp, **arrays))
    else:
        write_atomically(path, lambda tmp: mx.save_safetensors(tmp, arrays))
