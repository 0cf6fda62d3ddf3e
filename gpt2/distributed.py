"""Data parallelism for main.py with mx.distributed: N processes train one model.

    python gpt2/distributed.py -n 2 --backend ring gpt2/main.py ...   # 2 CPU processes
    python gpt2/distributed.py -n 4 --backend nccl gpt2/main.py ...   # 4 GPUs
    python gpt2/distributed.py --hostfile hosts.json --backend ring gpt2/main.py  # Macs

Run as a script, this file is mlx.launch (any of its flags), with --python set to this
Python and Ctrl-C left to the training processes, which stop together at a step
boundary; process 0 saves that step and says so, and the exit status is the processes'
(mlx.launch itself exits 0 and prints a traceback on Ctrl-C). `mlx.launch --python
python3 gpt2/main.py ...` works too.

Every process (a rank) holds the whole model and the whole optimizer state. Each step,
rank r takes its slice of the global batch, computes gradients on it, and one all-reduce
(a sum over ranks) averages them, so every rank applies the same update to the same
weights. Started with plain `python`, main.py does not read this file.
"""

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

# What to do when a backend is missing from this MLX, or does not start.
INSTALL = {
    "nccl": "NCCL comes with MLX for CUDA on Linux with NVIDIA GPUs: pip install "
    "'mlx[cuda12]' (or 'mlx[cuda13]')",
    "ring": "the ring backend comes with every MLX; start the script with "
    "`mlx.launch --backend ring`, which sets MLX_RANK and MLX_HOSTFILE",
    "mpi": "install OpenMPI (brew install open-mpi, or apt-get install openmpi-bin) "
    "and start with `mlx.launch --backend mpi`",
    "jaccl": "JACCL needs macOS 26.2 or later on Macs linked by Thunderbolt 5 with "
    "RDMA enabled",
}


class DistributedError(ValueError):
    """The processes could not be connected. The message says what to do."""


def launched_backend(env=os.environ):
    """The backend mlx.launch (or mpirun) set this process up for, read from its
    environment; None for a process started alone, or by `mlx.launch -n 1`."""
    if "MLX_WORLD_SIZE" in env or "NCCL_HOST_IP" in env:
        return "nccl" if int(env.get("MLX_WORLD_SIZE", "2")) > 1 else None
    if "MLX_JACCL_COORDINATOR" in env or "MLX_IBV_DEVICES" in env:
        return "jaccl"
    if "MLX_HOSTFILE" in env:
        try:  # mlx.launch -n 1 writes an empty hostfile
            return "ring" if Path(env["MLX_HOSTFILE"]).read_text().strip() else None
        except OSError:
            return "ring"  # let MLX say what is wrong with the hostfile
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    return None


def init():
    """The group of all processes of this run: a group of one without a launcher."""
    backend = launched_backend()
    if backend is None:
        if (
            "MLX_HOSTFILE" in os.environ
        ):  # mlx.launch -n 1's empty hostfile, which MLX would try to parse
            del os.environ["MLX_HOSTFILE"]
        return (
            mx.distributed.init()
        )  # size 1: all_sum returns its input, average_gradients the gradients
    if not mx.distributed.is_available(backend):
        raise DistributedError(
            f"the {backend} backend is not available in this MLX ({mx.__version__}); "
            f"{INSTALL[backend]}"
        )
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistributedError(
            f"cannot start the {backend} backend ({e}); {INSTALL[backend]}"
        ) from None


def average(grads, loss, group):
    """The gradients and the loss averaged over the ranks: one all-reduce of the
    gradients (in buckets of up to 32 MiB: nn.average_gradients concatenates small
    arrays) and one of the loss. Call it inside the compiled step; with one process it
    returns its inputs."""
    if group.size() == 1:
        return grads, loss
    return nn.average_gradients(grads, group), mx.distributed.all_sum(
        loss, group=group
    ) / group.size()


def broadcast(tree, group):
    """Rank 0's arrays on every rank (a sum in which the other ranks add zeros)."""
    if group.size() == 1:
        return tree
    first = group.rank() == 0
    return nn.utils.tree_map(
        lambda a: mx.distributed.all_sum(a if first else mx.zeros_like(a), group=group),
        tree,
    )


def setup(model, timeout, group):
    """Rank 0's weights on every rank, a Watchdog of `timeout` seconds and an Agreement;
    returns the watchdog's progress() and the agreement."""
    model.update(
        broadcast(model.parameters(), group)
    )  # the same weights everywhere, for sure
    return Watchdog(timeout, group).progress, Agreement(group)


class Agreement:
    """agreement(flag) -> whether any process has raised its flag (Ctrl-C), the same
    answer on every process at the same step. Each call starts an all-reduce of this
    process's flag and returns the one the previous call started, which has long
    finished: no step waits for it."""

    def __init__(self, group):
        self.group, self.pending = group, mx.array(0)

    def __call__(self, flag):
        if self.pending.item() > 0:
            return True  # and no new all-reduce: every process stops here
        self.pending = mx.distributed.all_sum(mx.array(int(flag)), group=self.group)
        mx.async_eval(self.pending)
        return False

    def barrier(self):
        """Wait until every process gets here (process 0 has written the checkpoint)."""
        mx.eval(mx.distributed.all_sum(mx.array(0), group=self.group))


class Watchdog:
    """Stop this process, with a message, if the run makes no progress for `seconds`.

    mlx.launch stops every process when one of them exits with an error, but it cannot
    see one that hangs (a stuck host, a lost connection that no socket reports); then
    the others would wait in the next all-reduce forever. The training loop calls
    progress() after every step.
    """

    def __init__(self, seconds, group):
        self.seconds, self.group, self.last = seconds, group, time.monotonic()
        if seconds > 0 and group.size() > 1:
            threading.Thread(target=self.watch, daemon=True).start()

    def progress(self):
        self.last = time.monotonic()

    def watch(self):
        while time.monotonic() - self.last < self.seconds:
            time.sleep(min(1.0, self.seconds / 10))
        print(
            f"error: process {self.group.rank()} of {self.group.size()} made no "
            f"progress for {self.seconds:g} s; another process may have stopped or "
            "hung: stopping (raise --timeout for slow steps)",
            file=sys.stderr,
            flush=True,
        )
        # a process stopped with SIGSTOP gets mlx.launch's SIGTERM only once continued
        try:
            os.killpg(os.getpgrp(), signal.SIGCONT)
        except OSError:
            pass
        os._exit(
            1
        )  # from this thread: the main thread may be blocked in a collective operation


def launch(argv):
    """mlx.launch with `argv`, --python this Python unless given, Ctrl-C left to the
    processes (a second one stops the launch at once), and the exit status of the first
    process that failed."""
    from mlx._distributed_utils import launch as mlx_launch

    signal.signal(
        signal.SIGINT, lambda *_: signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    )
    failures, warn = [], mlx_launch.log_warning

    def log_warning(
        *message, **kwargs
    ):  # "Node with rank R exited with code C", or "... was killed"
        text = " ".join(map(str, message))
        if "Node with rank" in text:
            code = (
                int(re.search(r"exited with code (-?\d+)", text)[1])
                if "exited with code" in text
                else 1
            )
            if code == -signal.SIGTERM and 130 in failures:
                # after Ctrl-C, mlx.launch ending a process that was still exiting (the
                # checkpoint is saved)
                return
            failures.append(
                code if code >= 0 else 128 - code
            )  # -15 (SIGTERM) -> 143, as a shell says
            if code == 130:
                return  # an interrupted process: process 0 has said so
        warn(*message, **kwargs)

    mlx_launch.log_warning = log_warning
    sys.argv = [
        sys.argv[0],
        *([] if "--python" in argv else ["--python", sys.executable]),
        *argv,
    ]
    mlx_launch.main()
    sys.exit(failures[0] if failures else 0)


if __name__ == "__main__":
    launch(sys.argv[1:])
