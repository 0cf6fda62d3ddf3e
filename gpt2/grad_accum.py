"""main.py --grad-accum K: one update from K micro-batches, a batch K times larger in the memory of one.

The training step's rows are cut into K micro-batches. Each gets its own compiled forward and
backward pass; their losses and gradients are summed (main.py divides each micro-batch's loss by K,
so the sums are the batch's means), and then the one compiled update (averaged over the processes,
clipped, applied) follows, as for a batch in one pass.
"""

import mlx.core as mx
from mlx.utils import tree_map


def accumulating_step(gradients, update, state, k):
    """train_step(x, y) -> loss: gradients(x, y) -> (loss, grads) on each of k micro-batches of the rows,
    then update(loss, grads) on their sums; both compiled with the step's `state`."""
    gradients, update = (
        mx.compile(f, inputs=state, outputs=state) for f in (gradients, update)
    )

    def train_step(x, y):
        total = None  # (loss, gradients) summed over the micro-batches
        for micro_batch in zip(mx.split(x, k), mx.split(y, k)):
            loss_and_grads = gradients(*micro_batch)
            total = (
                loss_and_grads
                if total is None
                else tree_map(mx.add, total, loss_and_grads)
            )
            mx.eval(
                total
            )  # here, so that one micro-batch's activations are in memory at a time
        return update(*total)

    return train_step
