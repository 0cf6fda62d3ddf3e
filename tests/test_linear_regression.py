import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import ROOT, import_example, run_script

model = import_example("linear_regression", "model")


def test_sgd_converges_to_the_least_squares_solution():
    mx.random.seed(3)
    X, y, w_star = model.make_linear_data(num_features=10, num_examples=200)
    w_sgd = model.sgd(model.squared_loss, X, y, num_iters=3000, lr=0.1)

    # Closed form in float64 with numpy, independent of the code under test.
    w_ls, *_ = np.linalg.lstsq(
        np.array(X, dtype=np.float64), np.array(y, dtype=np.float64), rcond=None
    )
    assert np.abs(np.array(w_sgd) - w_ls).max() < 1e-4
    # ...and the model's own closed-form helper agrees.
    assert np.abs(np.array(model.least_squares(X, y)) - w_ls).max() < 1e-4
    # The noise is 1e-2, so the fit is close to, but not exactly, w_star.
    assert 0 < np.linalg.norm(np.array(w_sgd) - np.array(w_star)) < 0.05


def test_squared_loss_gradient_matches_closed_form():
    mx.random.seed(1)
    X, y, _ = model.make_linear_data(5, 50)
    w = mx.random.normal((5,))
    grad = mx.grad(model.squared_loss)(w, X, y)
    expected = X.T @ (X @ w - y) / X.shape[0]  # d/dw 0.5 mean((Xw - y)^2)
    assert np.allclose(np.array(grad), np.array(expected), atol=1e-5)


def test_logistic_regression_separates_the_data():
    mx.random.seed(0)
    X, y, _ = model.make_logistic_data(num_features=10, num_examples=300)
    w0 = mx.zeros((10,))
    w = model.sgd(model.logistic_loss, X, y, num_iters=500, lr=0.5)
    assert (
        model.logistic_loss(w, X, y).item() < 0.5 * model.logistic_loss(w0, X, y).item()
    )
    assert model.accuracy(w, X, y).item() > 0.95


def test_main_prints_loss_error_and_accuracy():
    result = run_script(
        "linear_regression/main.py",
        "--num-features",
        "10",
        "--num-examples",
        "100",
        "--num-iters",
        "500",
        "--lr",
        "0.1",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    linear, logistic = [
        line for line in result.stdout.splitlines() if "regression" in line
    ]
    loss = float(linear.split("Loss ")[1].split(",")[0])
    error = float(linear.split("|w-w*| = ")[1].split(",")[0])
    accuracy = float(logistic.split("Accuracy ")[1].split(",")[0])
    assert loss < 1e-3 and error < 0.05 and accuracy > 0.9


@pytest.mark.parametrize(
    "args",
    [
        ["--num-iters", "0"],
        ["--lr", "-1"],
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--logistic-lr", "0"],
        ["--num-features", "x"],
        ["--seed", "-1"],
        ["--seed", str(2**64)],
        ["--num-examples", "1000000", "--num-features", "1000000"],  # 4 TB of X
    ],
)
def test_main_refuses_bad_flags_in_one_line_before_running(capsys, args):
    main = import_example("linear_regression", "main")
    with pytest.raises(SystemExit) as exit:
        main.parse_args(args)
    assert exit.value.code == 2 and capsys.readouterr().out == ""


def test_a_diverging_fit_stops_with_one_line_and_a_non_zero_exit():
    result = run_script(
        "linear_regression/main.py",
        "--lr",
        "100",
        "--num-iters",
        "300",
        "--num-features",
        "10",
        "--num-examples",
        "100",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Linear regression diverged: the loss is nan" in last and "--lr 100" in last
    assert "Loss nan" not in result.stdout and "Logistic" not in result.stdout


def test_sgd_raises_at_the_first_check_after_the_loss_turns_non_finite():
    mx.random.seed(0)
    X, y, _ = model.make_linear_data(5, 50)
    with pytest.raises(FloatingPointError, match="by iteration 10$"):
        model.sgd(model.squared_loss, X, y, num_iters=1000, lr=1e3, check_every=10)


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_a_closed_or_full_stdout_gives_one_line_not_a_traceback(stdout):
    args = ["--num-iters", "100", "--num-features", "10", "--num-examples", "100"]
    with open("/dev/full", "w") as full:
        process = subprocess.Popen(
            [sys.executable, ROOT / "linear_regression/main.py", *args],
            stdout=subprocess.PIPE if stdout == "closed" else full,
            stderr=subprocess.PIPE,
            text=True,
        )
    if stdout == "closed":  # as `| head -c1` does, before the script writes
        process.stdout.close()
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and "error: " in stderr


def test_ctrl_c_while_starting_gives_one_line_and_exit_130():
    # SIGINT once argparse is imported, the script's first import: MLX still loads.
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", ROOT / "linear_regression/main.py"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not process.stderr.readline().rstrip().endswith("| argparse"):
        pass
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    lines = [line for line in stderr.splitlines() if not line.startswith("import ")]
    assert process.returncode == 130 and lines == ["interrupted"]


def test_ctrl_c_while_fitting_gives_one_line_and_exit_130():
    process = subprocess.Popen(
        [sys.executable, ROOT / "linear_regression/main.py", "--num-iters", str(10**9)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    # Repeated: while MLX's CPU backend compiles the step with the system compiler
    # (through system(), which ignores SIGINT meanwhile) a Ctrl-C can be lost.
    while process.poll() is None:
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
    assert process.returncode == 130
    assert process.stderr.read().strip() == "interrupted"
