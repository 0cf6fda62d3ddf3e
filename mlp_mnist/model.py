"""A multi-layer perceptron for MNIST, written with `mlx.nn`."""

import mlx.nn as nn


class MLP(nn.Module):
    """`num_layers` hidden Linear + ReLU layers of width `hidden_dim`, then a Linear
    to the classes.

    Maps images flattened to (B, input_dim) to logits (B, output_dim).
    """

    def __init__(
        self, num_layers: int, input_dim: int, hidden_dim: int, output_dim: int
    ):
        super().__init__()
        sizes = [input_dim] + [hidden_dim] * num_layers + [output_dim]
        # nn.Linear stores its weight as (out, in), the same layout as torch.nn.Linear.
        self.layers = [
            nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])
        ]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def loss_fn(model, X, y):
    """Mean cross-entropy of the logits against integer labels."""
    return nn.losses.cross_entropy(model(X), y, reduction="mean")
