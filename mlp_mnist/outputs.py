"""Output files written whole or not at all: the one way main.py, convert.py and mnist.py write files.

`atomic_write(path, write)` has `write` fill a temporary file beside `path`, then renames it into
place, so `path` is either its old self or complete. The file gets the permissions of the user's
umask (a temporary file starts as 0600). The temporary file is removed on every exit Python sees (an
exception, Ctrl-C, SIGTERM); one left by a process killed outright (kill -9, power loss) is removed at
the next write to the same path. `check_writable(path, size)` says in one line why `path` cannot be
written, before the work that produces it.
"""

import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputError(Exception):
    """An output that cannot be written; the message names the path and why."""


def temp_prefix(path, pid):
    # .NAME.PID.XXXXXXXX.tmpSUFFIX: hidden, tied to its writer, and with the real suffix last, since
    # some writers (mx.save_safetensors, np.savez) append their suffix to a name that lacks it.
    return f".{path.name}.{pid}."


def remove_stale_temps(path):
    """Remove the temporary files of earlier writers of `path` that no longer run."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp{path.suffix}"):
        pid = tmp.name[len(f".{path.name}.") :].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # it exists, under another user
            pass


@contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises SystemExit (status 143), so `finally` clauses run."""

    def handler(signum, frame):
        print("terminated (SIGTERM)", file=sys.stderr)
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the handler alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_writable(path, size=0):
    """Raise OutputError unless `path` can be written with `size` bytes (creating its folder if need be)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"cannot write {path}: it is a folder; give a file name inside it"
        )
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(
            dir=path.parent, prefix=temp_prefix(path, os.getpid()), suffix=".tmp"
        )
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise OutputError(
            f"cannot write {path}: it needs {size / 1e6:.1f} MB, its disk has {free / 1e6:.1f} MB free"
        )


def atomic_write(path, write):
    """Call write(tmp_path), then rename it to `path`; OutputError (one line) if that cannot be done."""
    path = Path(path)
    check_writable(path)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent,
        prefix=temp_prefix(path, os.getpid()),
        suffix=f".tmp{path.suffix}",
    )
    os.close(fd)
    try:
        with sigterm_raises():
            write(tmp)
            os.chmod(tmp, user_mode())
            os.replace(tmp, path)
    except (
        OSError,
        RuntimeError,
    ) as e:  # a full disk (MLX and PyTorch raise RuntimeError for it), ...
        free = shutil.disk_usage(path.parent).free / 1e6
        raise OutputError(
            f"cannot write {path}: {getattr(e, 'strerror', None) or e} "
            f"({free:.1f} MB free on its disk); {path} is as it was"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
