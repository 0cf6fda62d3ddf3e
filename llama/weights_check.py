"""Why a file cannot be loaded as a converted Llama: what the path is instead, and
which arrays do not fit the model. model.py reads this file only on those errors."""

import mlx.core as mx


def not_weights(path):
    """What `path` (a Path) is, when it is not a .npz or .safetensors file."""
    if path.is_dir():
        return (
            f"{path} is a folder, not a weights file; convert it into one first: "
            f"python llama/convert.py {path} {path.name}.safetensors"
        )
    if path.suffix == ".gguf":
        return (
            f"{path} is a GGUF file, which this example does not read; convert the "
            "Hugging Face or Meta checkpoint with convert.py instead"
        )
    if path.suffix not in (".npz", ".safetensors"):
        return (
            f"the weights must be the .npz or .safetensors file written by convert.py, "
            f"got {path} (llama.py takes the weights first, then the tokenizer)"
        )
    return f"{path} does not exist; write it with convert.py first"


def misfit(model, weights, expected):
    """The missing, unexpected and misshapen arrays of `weights` for `model`, whose
    parameters are `expected`, in one sentence."""
    problems = [f"missing {k}" for k in sorted(expected.keys() - weights.keys())]
    problems += [f"unexpected {k}" for k in sorted(weights.keys() - expected.keys())]
    for k in sorted(weights.keys() & expected.keys()):
        have, want = weights[k], expected[k]
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"{k} is {tuple(have.shape)}, expected {tuple(want.shape)}")
        # Packed quantized weights are uint32, the others floats (MLX arrays only:
        # tp.py also checks the shapes of NumPy views, where bfloat16 is uint16).
        packed = want.dtype == mx.uint32
        kind = mx.uint32 if packed else mx.floating
        if isinstance(have, mx.array) and not mx.issubdtype(have.dtype, kind):
            problems.append(
                f"{k} is {have.dtype}, expected {kind if packed else 'a float'}"
            )
    q = model.args.quantization
    hint = ""
    if q:
        hint = f" (the configuration says {q['bits']}-bit weights in groups"
        hint += f" of {q['group_size']})"
    more = f" and {len(problems) - 6} more" if len(problems) > 6 else ""
    return f"the weights do not fit the model{hint}: {', '.join(problems[:6])}{more}"
