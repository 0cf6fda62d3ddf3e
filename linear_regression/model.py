"""Linear and logistic regression in MLX, trained with plain SGD and `mx.grad`.

The whole "model" is one weight vector `w` of shape (num_features,). Everything else is
a loss function of `w`; `mx.grad` turns it into a function that returns d loss / d w.
"""

import math

import mlx.core as mx

# ---------------------------------------------------------------- data


def make_linear_data(num_features, num_examples, noise=1e-2):
    """y = X @ w_star + noise, with X, w_star ~ N(0, 1)."""
    w_star = mx.random.normal((num_features,))
    X = mx.random.normal((num_examples, num_features))  # (N, D)
    eps = noise * mx.random.normal((num_examples,))
    y = X @ w_star + eps  # (N,)
    # Evaluate now: the arrays are inputs from here on. Left lazy, a compiled step that
    # closes over them would carry (and rerun) the random-number graph at every call.
    mx.eval(X, y, w_star)
    return X, y, w_star


def make_logistic_data(num_features, num_examples):
    """Binary labels from a random hyperplane through the origin: y = X @ w_star > 0."""
    w_star = mx.random.normal((num_features,))
    X = mx.random.normal((num_examples, num_features))  # (N, D)
    y = (X @ w_star) > 0  # (N,) bool
    mx.eval(X, y, w_star)
    return X, y, w_star


# ---------------------------------------------------------------- losses


def squared_loss(w, X, y):
    """0.5 * mean((X w - y)^2)."""
    return 0.5 * mx.mean(mx.square(X @ w - y))


def logistic_loss(w, X, y):
    """Mean binary cross-entropy with logits X w, written stably:
    -[y log s(z) + (1 - y) log(1 - s(z))] = log(1 + e^z) - y z."""
    logits = X @ w
    return mx.mean(mx.logaddexp(0.0, logits) - y * logits)


def accuracy(w, X, y):
    return mx.mean((X @ w > 0) == y)


# ---------------------------------------------------------------- training


def sgd(loss_fn, X, y, num_iters, lr, check_every=100):
    """Full-batch gradient descent on `loss_fn(w, X, y)` from a small random start.

    Every `check_every` iterations and at the last one, a non-finite loss raises
    FloatingPointError: the step size is too large and the iterates blow up.
    """
    grad_fn = mx.grad(loss_fn)  # d loss / d w (argument 0), same shape as w

    # Compiling fuses the gradient and the update into one graph, built once.
    @mx.compile
    def step(w):
        return w - lr * grad_fn(w, X, y)

    w = 1e-2 * mx.random.normal((X.shape[1],))
    for i in range(1, num_iters + 1):
        w = step(w)
        # MLX is lazy: without this eval the loop would build a graph num_iters deep.
        mx.eval(w)
        if i % check_every == 0 or i == num_iters:
            loss = loss_fn(w, X, y).item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} by iteration {i}")
    return w


def least_squares(X, y):
    """The closed-form minimiser w = argmin |X w - y|^2, for checking SGD."""
    # mx.linalg runs on the CPU stream only.
    return mx.linalg.solve(X.T @ X, X.T @ y, stream=mx.cpu)
