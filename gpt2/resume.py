"""main.py --resume: continue a run from OUT/checkpoint.safetensors, exactly as if it had not stopped.

The checkpoint (main.Checkpoints) holds the float32 master weights, AdamW's state, float16's
loss scale, the step it was written at and the run's settings. Batches, learning rates and dropout
masks are functions of the seed and the step, so the resumed run repeats what the uninterrupted
one would have done, on any number of processes and in any --dtype (only the rounding of the
steps after the checkpoint depends on the dtype).
"""

import mlx.core as mx
from generate import WeightsError, check_weights, from_json_array
from mlx.utils import tree_unflatten

# What a --resume must share with the run it continues, besides the text (chars, text_sha256).
SAME = [
    "ctx_len",
    "n_emb",
    "n_heads",
    "n_layers",
    "dropout",
    "seed",
    "batch_size",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "epochs",
    "chars",
    "text_sha256",
]


def load_checkpoint(path):
    """(model weights, optimizer state, loss scale, meta) from main.Checkpoints' file. Errors are
    ValueErrors, which main.py reports in one line."""
    try:
        arrays = mx.load(str(path))
        meta = from_json_array(arrays.pop("meta"))
    except Exception as e:
        raise ValueError(f"cannot read the checkpoint {path}: {e}") from None
    if (
        not isinstance(meta, dict)
        or type(meta.get("step")) is not int
        or meta["step"] < 0
    ):
        raise ValueError(
            f"the checkpoint {path} is damaged: its metadata has no step count; train again without --resume"
        )
    part = lambda prefix: [
        (k[len(prefix) :], v) for k, v in arrays.items() if k.startswith(prefix)
    ]  # noqa: E731
    return (
        part("model."),
        tree_unflatten(part("optimizer.")),
        dict(part("loss_scale.")),
        meta,
    )


def resume(checkpoint, run, model, optimizer, loss_scale, say):
    """Load the checkpoint into the model, AdamW and float16's loss scale; return its step."""
    if not checkpoint.is_file():
        raise ValueError(f"--resume: no checkpoint at {checkpoint}")
    weights, opt_state, saved_scale, meta = load_checkpoint(checkpoint)
    changed = [k for k in SAME if meta.get(k) != run[k]]
    if changed:
        raise ValueError(
            f"--resume: the checkpoint was made with other settings or text ({', '.join(changed)}); "
            "resume with the same flags and --data"
        )
    try:
        check_weights(model, dict(weights))
    except WeightsError as e:
        raise ValueError(f"--resume: {checkpoint}: {e}") from None
    model.load_weights(weights)
    optimizer.state = opt_state
    if loss_scale and saved_scale:
        loss_scale.state.update(saved_scale)
    saved, dtype = meta.get("dtype", "float32"), run["dtype"]
    say(
        f"Resumed from {checkpoint} at step {meta['step']}"
        + (f" (trained in {saved}, continuing in {dtype})" if saved != dtype else "")
    )
    return meta["step"]
