"""Writing files atomically: the weights (convert.py), checkpoints and generated text (main.py).

Each file is written to a temporary file beside it, `.NAME.PID.tmp.SUFFIX`, and renamed over it only
once complete, so a reader finds the old file or the new one, never half of one. The temporary file
is created as any new file (with the user's umask), removed if the write fails, and one left by a
process killed with SIGKILL is removed by the next write of the same file. Ctrl-C (SIGINT) and
SIGTERM (which mlx.launch sends to the other processes when one fails) wait for the write to end.
"""

import glob
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx


def json_array(value):
    """A JSON-able value as the uint8 array of its JSON bytes, to be stored beside the weights."""
    return mx.array(list(json.dumps(value).encode()), dtype=mx.uint8)


@contextmanager
def signals_held(*numbers):
    """Within the block, the signals `numbers` only append their number to the list it gives, for the
    code to act on (main thread only); their handlers are restored after it."""
    held = []
    previous = [
        signal.signal(n, lambda number, frame: held.append(number)) for n in numbers
    ]
    try:
        yield held
    finally:
        for number, handler in zip(numbers, previous):
            signal.signal(number, handler)


def write_atomically(path, write):
    """Call write(temporary path), then rename the temporary file to `path` (in a folder that exists)."""
    path = Path(path)
    for stale in path.parent.glob(
        f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"
    ):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.tmp{path.suffix}"
    )  # mx.savez wants the .npz ending
    with signals_held(signal.SIGINT, signal.SIGTERM) as held:
        try:
            write(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    for number in held:  # a Ctrl-C or SIGTERM that came during the write acts now
        signal.raise_signal(number)


def check_writable(path, size=0):
    """Raise ValueError (one line) unless `path` can be written before the work that makes it starts:
    its folder exists or can be made and takes new files, `path` is no folder, `size` bytes are free."""
    path = Path(path)
    if file := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise ValueError(f"cannot write {path}: {file} is a file, not a folder")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
        free = shutil.disk_usage(path.parent).free
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    if free < size:
        raise ValueError(
            f"cannot write {path}: {free / 2**20:.0f} MiB free there, {size / 2**20:.0f} MiB needed"
        )


def save_arrays(path, arrays):
    """Write {name: array} to `path` (.npz or .safetensors) atomically."""
    write_atomically(
        path,
        lambda tmp: (
            mx.savez(tmp, **arrays)
            if tmp.endswith(".npz")
            else mx.save_safetensors(tmp, arrays)
        ),
    )
