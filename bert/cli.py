"""What every script here does the same way where it meets the user: flags, text, output files, interrupts.

- `run(main, *errors)` runs a script's main(): the errors named, ValueError and OSError become one line
  on stderr and exit 1; Ctrl-C ends with "interrupted" and exit 130, SIGTERM with "terminated" and exit
  143. Both signals are raised inside main(), so its `finally` clauses run (temporary files go).
- `positive_int` and `text` are argparse types: a count of at least 1, and command-line text that is UTF-8.
- `read_lines(path)` reads a UTF-8 text file, one sentence a line.
- `write_atomically(path, write)` has `write(file)` fill a temporary file beside `path`, then renames it
  over `path`: a reader finds the old file or the new one, never half of one. The file gets the user's
  umask (a temporary file starts as 0600); the temporary file is removed on every exit Python sees, and
  one left by a process killed outright (kill -9) is removed by the next write of the same path.
  `check_writable(path, size)` says why `path` cannot be written before the work that produces it.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


class Terminated(BaseException):
    """What SIGTERM raises inside run(), as Ctrl-C raises KeyboardInterrupt."""


def on_sigterm(signum, frame):
    raise Terminated


def run(main, *errors):
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (ValueError, OSError, *errors) as e:
        sys.exit(
            "error: " + " ".join(str(e).split())
        )  # one line, even for multi-line library errors


def positive_int(value):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, got {value!r}"
        ) from None
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, got {number}"
        )
    return number


def text(value):
    """Command-line text: Python decodes arguments that are not UTF-8 into lone surrogates, refused here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{value.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text"
        ) from None
    return value


def read_lines(path):
    """The lines of a UTF-8 text file (without their line endings); ValueError in one line if it is not one."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror}") from None


def temp_prefix(path):
    return (
        f".{path.name}.{os.getpid()}."  # hidden, and tied to the process that writes it
    )


def remove_stale_temps(path):
    """Remove the temporary files that earlier writers of `path`, no longer running, left behind."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".")[0]
        try:
            if pid.isdigit() and int(pid) != os.getpid():
                os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # it runs, under another user
            pass


def check_writable(path, size=0):
    """Raise OSError (one line, naming `path`) unless `path` can be written with `size` bytes; creates its folder."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot write {path}: it is a folder; give a file name")
    if parent := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise OSError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=temp_prefix(path), suffix=".tmp"
        ):
            pass  # a file can be created there
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    if (free := shutil.disk_usage(path.parent).free) < size:
        raise OSError(
            f"cannot write {path}: it needs {size / 1e6:.1f} MB and its disk has {free / 1e6:.1f} MB free"
        )


def user_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path, write):
    """Call write(binary file) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    check_writable(path)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, ...
        raise OSError(
            f"cannot write {path}: {e.strerror or e}; {path} is as it was"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
