import re
import signal
import subprocess
import sys

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
        [
            "--num-examples",
            "1000000",
            "--num-features",
            "1000000",
        ],  # 4 TB of X: refused, not a crash allocating it
    ],
)
def test_main_refuses_bad_flags_in_one_line_before_running(args):
    result = run_script("linear_regression/main.py", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "error: " in result.stderr.strip().splitlines()[-1]


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
    assert (
        last.startswith("error: Linear regression diverged: the loss is nan")
        and "--lr 100" in last
    )
    assert (
        "Loss nan" not in result.stdout and "Logistic" not in result.stdout
    )  # it stopped there


def test_sgd_raises_at_the_first_check_after_the_loss_turns_non_finite():
    mx.random.seed(0)
    X, y, _ = model.make_linear_data(5, 50)
    with pytest.raises(FloatingPointError, match="by iteration 10$"):
        model.sgd(model.squared_loss, X, y, num_iters=1000, lr=1e3, check_every=10)


def test_progress_reports_the_iteration_loss_and_time_left(capsys):
    main = import_example("linear_regression", "main")
    progress = main.Progress(num_iters=100)
    progress(10, 0.5)  # less than 2 s since the start: quiet
    assert capsys.readouterr().err == ""
    progress.last -= 3
    progress(50, 0.25)
    assert re.fullmatch(
        r"  iteration 50/100, loss 0.25000, about \d+ s to go\n",
        capsys.readouterr().err,
    )


def test_ctrl_c_ends_the_run_with_one_line_and_exit_130():
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "linear_regression/main.py"),
            "--num-iters",
            "100000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the first progress line, 2 s in: while MLX's CPU backend compiles the step with the system
    # compiler (through system(), which ignores SIGINT meanwhile) a Ctrl-C can be lost.
    while not process.stderr.readline().startswith("  iteration "):
        pass
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
