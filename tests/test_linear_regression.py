import mlx.core as mx
import numpy as np
import pytest

from helpers import import_example, run_script

model = import_example("linear_regression", "model")


def test_sgd_converges_to_the_least_squares_solution():
    mx.random.seed(3)
    X, y, w_star = model.make_linear_data(num_features=10, num_examples=200)
    w_sgd = model.sgd(model.squared_loss, X, y, num_iters=3000, lr=0.1)

    # Closed form in float64 with numpy, independent of the code under test.
    w_ls, *_ = np.linalg.lstsq(np.array(X, dtype=np.float64), np.array(y, dtype=np.float64), rcond=None)
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
    assert model.logistic_loss(w, X, y).item() < 0.5 * model.logistic_loss(w0, X, y).item()
    assert model.accuracy(w, X, y).item() > 0.95


def test_main_prints_loss_error_and_accuracy():
    result = run_script("linear_regression/main.py", "--num-features", "10", "--num-examples", "100",
                        "--num-iters", "500", "--lr", "0.1", "--seed", "1")
    assert result.returncode == 0, result.stderr
    linear, logistic = [line for line in result.stdout.splitlines() if "regression" in line]
    loss = float(linear.split("Loss ")[1].split(",")[0])
    error = float(linear.split("|w-w*| = ")[1].split(",")[0])
    accuracy = float(logistic.split("Accuracy ")[1].split(",")[0])
    assert loss < 1e-3 and error < 0.05 and accuracy > 0.9


@pytest.mark.parametrize("args", [["--bogus"], ["--num-iters", "0"], ["--lr", "-1"], ["--num-features", "x"]])
def test_main_rejects_bad_flags_in_one_line(args):
    result = run_script("linear_regression/main.py", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr.strip().splitlines()[-1]
