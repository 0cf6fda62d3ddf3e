"""float16 training's dynamic loss scaling, for main.py --dtype float16 (bfloat16 and float32 need none).

float16's largest value is 65504 and its smallest normal 6e-5: small gradients flush to zero. So
the loss is multiplied by a scale before the backward pass and the gradients are divided by it
after. A step whose gradients overflowed (inf or nan) changes nothing but the scale, which it
halves; 1000 overflow-free steps in a row double it. This is PyTorch's GradScaler.
"""

from functools import partial

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map


class LossScale:
    """The scale and the overflow-free steps since it last changed, in `state` (the training step
    lists it among its compiled inputs and outputs, and the checkpoint stores it), for `optimizer`."""

    def __init__(self, optimizer, scale=2.0**15, good_steps=0):
        self.optimizer, self.state = (
            optimizer,
            {"scale": mx.array(scale), "good_steps": mx.array(good_steps)},
        )

    def scale(self, loss):
        return loss * self.state["scale"]

    def unscale(self, grads):
        return tree_map(lambda g: g / self.state["scale"], grads)

    def update(self, model, grads):
        """The optimizer's update if every gradient is finite, else no change; then the new scale."""
        optimizer = self.optimizer
        finite = mx.all(
            mx.stack([mx.isfinite(g).all() for _, g in tree_flatten(grads)])
        )
        before = (model.trainable_parameters(), tree_map(lambda a: a, optimizer.state))
        optimizer.update(model, grads)
        keep_if_finite = partial(tree_map, lambda new, old: mx.where(finite, new, old))
        model.update(keep_if_finite(model.trainable_parameters(), before[0]))
        optimizer.state.update(
            keep_if_finite(optimizer.state, before[1])
        )  # in place: the step's state holds it
        good_steps = mx.where(finite, self.state["good_steps"] + 1, 0)
        grow = good_steps >= 1000
        self.state["scale"] = (
            mx.where(finite, mx.where(grow, 2.0, 1.0), 0.5) * self.state["scale"]
        )
        self.state["good_steps"] = mx.where(grow, 0, good_steps)
