"""gpt2/ data parallelism (distributed.py): processes started by mlx.launch train the
same model as one process, and the ways a distributed run goes wrong end with a message,
not a hang.

The runs here use mlx.launch's ring backend (TCP on this machine) on the CPU: what CI
has."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from helpers import ROOT, run_script

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
) * 40
# 47 steps per epoch of batch 8 x 16 on this text; dropout 0, so every process count
# computes the same thing.
SETTINGS = [
    "--ctx-len",
    "16",
    "--n-emb",
    "32",
    "--n-heads",
    "2",
    "--n-layers",
    "2",
    "--batch-size",
    "8",
    "--dropout",
    "0",
    "--epochs",
    "2",
    "--log-every",
    "1",
    "--max-tokens",
    "5",
    "--dtype",
    "float32",
]
STEPS = (
    60  # past the end of epoch 1: two evaluations and two checkpoints (one at the cap)
)


def free_ports(n=2):
    """The first of n consecutive free TCP ports (mlx.launch's ring backend takes one
    per process)."""
    for _ in range(100):
        first = random.randrange(20000, 60000)
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch(n, script, *args, backend="ring", timeout=120):
    """`mlx.launch -n N --backend B script args` with this Python; the CompletedProcess.

    mlx.launch 0.32.4 exits with status 0 even when a process failed, so callers read
    the output."""
    launcher = [
        sys.executable,
        "-c",
        "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
    ]
    command = [
        *launcher,
        "-n",
        str(n),
        "--backend",
        backend,
        "--starting-port",
        str(free_ports(n)),
        "--python",
        sys.executable,
        str(script),
        *map(str, args),
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def step_losses(stdout):
    return {
        int(s): float(v)
        for s, v in re.findall(r"Step (\d+)/\d+ \| loss = ([\d.]+)", stdout)
    }


def checkpoint(folder):
    return {
        k: np.array(v)
        for k, v in mx.load(str(folder / "checkpoint.safetensors")).items()
    }


def assert_same_training_state(a, b, tolerance=1e-5):
    """The weights and AdamW's moments of checkpoints a and b agree within `tolerance`,
    except the key biases.

    A key bias adds q . b_k to all of a query's scores alike, and softmax ignores that:
    its exact gradient is 0, the computed one is rounding noise (~1e-10) that depends on
    the order of the sums, and AdamW divides it by its own size, so these entries move
    by up to ~lr/100 per step either way.
    """
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(("model.", "optimizer.")):
            x, y = a[key], b[key]
            if key.endswith(
                "attn.c_attn.bias"
            ):  # (3 * n_emb,): q, k, v biases; skip k's
                n = len(x) // 3
                x, y = np.delete(x, np.s_[n : 2 * n]), np.delete(y, np.s_[n : 2 * n])
            assert np.abs(x - y).max() <= tolerance, (key, np.abs(x - y).max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 60 steps as 1 process, 2 processes, and 1 process with --grad-accum 2,
    in parallel."""
    tmp = tmp_path_factory.mktemp("gpt2_distributed")
    (tmp / "text.txt").write_text(TEXT)
    common = ["--data", tmp / "text.txt", *SETTINGS, "--max-steps", STEPS]
    jobs = {
        "one": lambda: run_script("gpt2/main.py", *common, "--out", tmp / "one"),
        "two": lambda: launch(2, ROOT / "gpt2/main.py", *common, "--out", tmp / "two"),
        "accum": lambda: run_script(
            "gpt2/main.py", *common, "--out", tmp / "accum", "--grad-accum", "2"
        ),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    for name, result in results.items():
        assert result.returncode == 0 and "Trained 60 steps" in result.stdout, (
            name,
            result.stdout,
            result.stderr,
        )
    return tmp, results


def test_two_processes_and_grad_accum_equal_one_process(runs):
    tmp, results = runs
    losses = {name: step_losses(result.stdout) for name, result in results.items()}
    assert sorted(losses["one"]) == list(range(1, STEPS + 1))
    assert "2 processes x 1 micro-batches of 4" in results["two"].stdout
    assert "1 processes x 2 micro-batches of 4" in results["accum"].stdout
    for name in ("two", "accum"):
        assert losses[name].keys() == losses["one"].keys(), name
        for step, loss in losses[
            "one"
        ].items():  # printed to 6 decimals: equal within 1e-5
            assert abs(losses[name][step] - loss) <= 1e-5, (
                name,
                step,
                losses[name][step],
                loss,
            )

        # Validation (split over the processes, then summed) prints the same numbers, to
        # its 4 decimals.
        def val(out):
            return [float(v) for v in re.findall(r"val = ([\d.]+)", out)]

        assert len(val(results["one"].stdout)) == 2
        assert np.allclose(
            val(results[name].stdout), val(results["one"].stdout), rtol=0, atol=1.01e-4
        )
    # Process 0 alone prints: one line per step, not two.
    assert results["two"].stdout.count("Step 1/") == 1
    for name in ("two", "accum"):
        assert_same_training_state(checkpoint(tmp / "one"), checkpoint(tmp / name))
        assert sorted(p.name for p in (tmp / name).iterdir()) == [
            "checkpoint.safetensors",
            "completions.txt",
        ]


def test_resume_with_another_number_of_processes(runs):
    tmp, results = runs
    common = ["--data", tmp / "text.txt", *SETTINGS, "--out", tmp / "resumed"]
    first = run_script("gpt2/main.py", *common, "--max-steps", "30")
    assert first.returncode == 0, first.stderr
    second = launch(
        2,
        ROOT / "gpt2/main.py",
        *common,
        "--max-steps",
        STEPS,
        "--resume",
        "--grad-accum",
        "2",
    )
    assert "Resumed from" in second.stdout and "at step 30" in second.stdout, (
        second.stdout + second.stderr
    )
    assert "Trained 30 steps" in second.stdout
    losses, reference = step_losses(second.stdout), step_losses(results["one"].stdout)
    assert sorted(losses) == list(range(31, STEPS + 1))
    assert all(abs(losses[s] - reference[s]) <= 1e-5 for s in losses)
    assert_same_training_state(checkpoint(tmp / "one"), checkpoint(tmp / "resumed"))


def test_batch_that_does_not_split_is_refused(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py",
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path / "out",
        *SETTINGS,
        "--batch-size",
        "6",
        "--grad-accum",
        "4",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --batch-size 6 must be a multiple of the processes (1) times "
        "--grad-accum (4)"
    ]
    assert not (tmp_path / "out").exists()


def test_unavailable_backend_says_how_to_install_it(tmp_path):
    # The environment mlx.launch gives a process of an NCCL run (or, where MLX has NCCL,
    # a JACCL run).
    if not mx.distributed.is_available("nccl"):
        backend, env, hint = (
            "nccl",
            {"MLX_WORLD_SIZE": "2", "NCCL_HOST_IP": "127.0.0.1"},
            "pip install 'mlx[cuda12]'",
        )
    else:
        backend, env, hint = (
            "jaccl",
            {"MLX_JACCL_COORDINATOR": "127.0.0.1:1"},
            "Thunderbolt 5",
        )
    assert not mx.distributed.is_available(backend)
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py",
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path / "out",
        *SETTINGS,
        env={**env, "MLX_RANK": "0", "NCCL_PORT": str(free_ports(1))},
        timeout=60,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert (
        line.startswith(f"error: the {backend} backend is not available in this MLX")
        and hint in line
    )
    assert not (tmp_path / "out").exists()


def failing_main(path, fault):
    """A main.py whose process 1 runs `fault` in its 60th call of windows(): a step of
    epoch 2 (47 steps and 6 evaluation batches make epoch 1, after which process 0
    writes a checkpoint)."""
    path.write_text(
        textwrap.dedent(f"""\
        import os, signal, sys, time
        sys.path.insert(0, {str(ROOT / "gpt2")!r})
        import main
        if os.environ["MLX_RANK"] == "1":
            windows, calls = main.windows, []
            def failing_windows(*args):
                calls.append(1)
                if len(calls) == 60:
                    {fault}
                return windows(*args)
            main.windows = failing_windows
        main.main()
        """)
    )
    return path


def assert_stopped_after_epoch_1(output, out):
    assert "Epoch 1 |" in output and "Epoch 2 |" not in output
    assert "Traceback" not in output
    # Process 0 stopped before the end: no completions, and only the whole checkpoint of
    # epoch 1.
    assert [p.name for p in out.iterdir()] == ["checkpoint.safetensors"]
    assert b'"step": 47' in checkpoint(out)["meta"].tobytes()


def test_a_process_that_dies_stops_the_others_and_leaves_a_whole_checkpoint(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    script = failing_main(tmp_path / "dying_main.py", "os._exit(3)")
    tic = time.perf_counter()
    result = launch(
        2,
        script,
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path / "out",
        *SETTINGS,
        timeout=240,
    )
    # Far sooner than the watchdog's default 600 s: mlx.launch stopped process 0. (Not
    # 60 s: on a GPU machine running the suite 8 tests at a time, compiling the two
    # processes' kernels alone took longer.)
    assert time.perf_counter() - tic < 150
    assert (
        "Node with rank 1 exited with code 3" in result.stderr
    )  # mlx.launch's message; then it stops process 0
    assert_stopped_after_epoch_1(result.stdout + result.stderr, tmp_path / "out")


def test_a_process_that_hangs_stops_the_run_after_the_timeout(tmp_path):
    # mlx.launch sees no failure. Process 0, waiting in the all-reduce, stops itself
    # after --timeout (so may the hanging process 1, stuck in its own sleep: whichever
    # comes first); then mlx.launch stops the other.
    (tmp_path / "text.txt").write_text(TEXT)
    script = failing_main(tmp_path / "hanging_main.py", "time.sleep(3600)")
    tic = time.perf_counter()
    result = launch(
        2,
        script,
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path / "out",
        *SETTINGS,
        "--timeout",
        "5",
        timeout=90,
    )
    assert time.perf_counter() - tic < 60
    assert re.search(
        r"error: process [01] of 2 made no progress for 5 s", result.stderr
    ), result.stderr
    assert re.search(r"Node with rank [01] exited with code 1", result.stderr)
    assert_stopped_after_epoch_1(result.stdout + result.stderr, tmp_path / "out")


def test_a_process_stopped_with_sigstop_ends_the_whole_run_after_the_timeout(tmp_path):
    # The stopped process cannot act on mlx.launch's SIGTERM until it is continued: the
    # other one's watchdog continues it (SIGCONT to its process group) as it stops, so
    # that the launch can end.
    (tmp_path / "text.txt").write_text(TEXT)
    script = failing_main(
        tmp_path / "stopped_main.py", "os.kill(os.getpid(), signal.SIGSTOP)"
    )
    tic = time.perf_counter()
    result = launch(
        2,
        script,
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path / "out",
        *SETTINGS,
        "--timeout",
        "5",
        timeout=90,
    )
    assert time.perf_counter() - tic < 60
    assert "error: process 0 of 2 made no progress for 5 s" in result.stderr, (
        result.stderr
    )
    assert_stopped_after_epoch_1(result.stdout + result.stderr, tmp_path / "out")


def launch_script(n, *args):
    """`python gpt2/distributed.py -n N --backend ring ... args`: the launcher this
    example gives."""
    return [
        sys.executable,
        str(ROOT / "gpt2/distributed.py"),
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(free_ports(n)),
        *map(str, args),
    ]


def test_ctrl_c_to_two_processes_says_one_line_saves_that_step_and_resumes_exactly(
    runs, tmp_path
):
    tmp, results = runs
    out = tmp_path / "interrupted"
    common = ["--data", tmp / "text.txt", *SETTINGS, "--max-steps", STEPS, "--out", out]
    process = subprocess.Popen(
        launch_script(2, ROOT / "gpt2/main.py", *common),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if line.startswith("Step 3/"):
            os.killpg(
                process.pid, signal.SIGINT
            )  # what Ctrl-C in a terminal does: every process gets it
            break
    stdout, stderr = process.communicate(timeout=120)
    assert (
        process.returncode == 130
        and "Traceback" not in stderr
        and "[WARN]" not in stderr
    ), stderr
    (line,) = [
        line for line in stderr.strip().splitlines() if not line.startswith("warning: ")
    ]
    step = int(
        re.fullmatch(
            rf"Interrupted at step (\d+); saved {re.escape(str(out))}/"
            "checkpoint.safetensors; "
            "continue with --resume",
            line,
        )[1]
    )
    assert b'"step": %d' % step in checkpoint(out)["meta"].tobytes()
    resumed = run_script(
        "gpt2/main.py", *common, "--resume"
    )  # on one process: any number can continue
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, (
        resumed.stderr
    )
    assert_same_training_state(checkpoint(tmp / "one"), checkpoint(out))


def test_the_launcher_exits_with_the_status_of_the_process_that_failed(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import os, sys\nsys.exit(3 if os.environ['MLX_RANK'] == '1' else 0)\n"
    )
    result = subprocess.run(
        launch_script(2, script), capture_output=True, text=True, timeout=60
    )
    assert (
        result.returncode == 3
        and "Node with rank 1 exited with code 3" in result.stderr
    ), result.stderr


def test_after_an_interrupt_the_launcher_does_not_report_the_processes_it_ends_itself(
    tmp_path,
):
    # Process 0 ends with 130 (interrupted, checkpoint saved) while process 1 is still
    # exiting: mlx.launch ends that one with SIGTERM. That is the launcher's cleanup,
    # not a second failure to warn about.
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import os, sys, time\nif os.environ['MLX_RANK'] == '1':\n"
        "    time.sleep(60)\nsys.exit(130)\n"
    )
    result = subprocess.run(
        launch_script(2, script), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130 and "[WARN]" not in result.stderr, result.stderr


def test_benchmark_ddp_runs_both_frameworks_and_prints_the_ratio(tmp_path):
    # The scaling benchmark's code paths, tiny: MLX on 1 and 2 processes, PyTorch DDP
    # (gloo, CPU) on 2, each started the way the scaling command starts it.
    common = [
        "--tiny",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
        tmp_path / "r.jsonl",
    ]
    one = launch(
        1, ROOT / "gpt2/benchmark_ddp.py", "mlx", *common
    )  # mlx.launch -n 1: a group of one
    assert '"gpus": 1' in one.stdout, one.stderr
    assert re.search(
        r"a tiny GPT on Device\((cpu|gpu), 0\), batch 4 x 32 per process: 1 warm-up "
        "steps",
        one.stderr,
    )  # said at once
    assert "timing 2/2:" in one.stderr
    two = launch(2, ROOT / "gpt2/benchmark_ddp.py", "mlx", *common)
    torch_ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            ROOT / "gpt2/benchmark_ddp.py",
            "torch",
            *map(str, common),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # gloo on the CPU, GPUs or not
    assert torch_ddp.returncode == 0, torch_ddp.stderr
    table = run_script("gpt2/benchmark_ddp.py", "table", tmp_path / "r.jsonl")
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("mlx", "1"),
        ("mlx", "2"),
        ("torch", "2"),
    ], two.stdout + two.stderr
    assert (
        rows[0][5] == "100.0%" and rows[1][5].endswith("%") and rows[2][5] == "nan%"
    )  # no 1-process PyTorch run
