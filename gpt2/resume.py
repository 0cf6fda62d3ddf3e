"""main.py --resume: continue a run from OUT/checkpoint.safetensors exactly as if it had
not stopped.

The checkpoint (main.Checkpoint) holds the float32 weights, AdamW's state, the step it
was written at and the run's settings. Batches, learning rates and dropout masks are
functions of the seed and the step, so the resumed run repeats what the uninterrupted
one would have done, on any number of processes and in either --dtype (only the
rounding of the steps after the checkpoint depends on the dtype).
"""

import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

# What a --resume must share with the run it continues.
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


def resume(path, run, model, optimizer, say):
    """Load the checkpoint at `path` into the model and AdamW; return its step.

    Everything loaded is checked once: the settings, and the names, shapes, dtypes and
    finiteness of every array against this run's model and AdamW state."""
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}")
    fix = "train again without --resume (in another --out)"
    try:
        arrays = mx.load(str(path))
        meta = json.loads(bytes(memoryview(arrays.pop("meta"))).decode())
        arrays.pop("config", None)  # absent from older checkpoints
    except Exception as e:
        raise ValueError(f"--resume: cannot read {path} ({e}); {fix}") from None
    if (
        not isinstance(meta, dict)
        or type(meta.get("step")) is not int
        or meta["step"] < 0
    ):
        raise ValueError(f"--resume: {path} has no step count; {fix}")
    changed = [k for k in SAME if meta.get(k) != run[k]]
    if changed:
        raise ValueError(
            f"--resume: the checkpoint was made with other settings or text "
            f"({', '.join(changed)}); resume with the same flags and --data"
        )
    state = {"model": model.parameters(), "optimizer": optimizer.state}
    expected = dict(tree_flatten(state))
    wrong = sorted(expected.keys() ^ arrays.keys())  # missing or unexpected
    for k, a in arrays.items():
        want = expected.get(k, a)
        if (a.shape, a.dtype) != (want.shape, want.dtype):
            wrong.append(f"{k} {a.dtype} {a.shape}, not {want.dtype} {want.shape}")
        elif not mx.isfinite(a).all().item():
            wrong.append(f"{k} is not finite")
    if wrong:
        problems = ", ".join(wrong[:4] + ["..."] * (len(wrong) > 4))
        problems = problems.replace("mlx.core.", "")
        raise ValueError(f"--resume: {path} is damaged ({problems}); {fix}")
    state = tree_unflatten(list(arrays.items()))
    model.update(state["model"])
    optimizer.state.update(state["optimizer"])  # in place: the compiled step holds it
    optimizer.init(model.trainable_parameters())  # the empty entries flattening drops
    saved = meta.get("dtype", "float32")
    also = f" (trained in {saved}, continuing in {run['dtype']})"
    say(f"Resumed from {path} at step {meta['step']}{also * (saved != run['dtype'])}")
    return meta["step"]
