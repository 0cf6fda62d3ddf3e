"""Convert the trained MLP between MLX (main.py's safetensors) and PyTorch (a .pt file).

    python mlp_mnist/convert.py mlp_mnist.safetensors mlp_mnist.pt     # MLX -> PyTorch
    python mlp_mnist/convert.py mlp_mnist.pt mlp_mnist.safetensors     # PyTorch -> MLX

The direction follows the file extensions. Both files carry the model configuration.
The two frameworks store a Linear weight the same way, (out_features, in_features), so
no transpose is needed; only the names differ: MLX `layers.{i}.weight` is PyTorch
`net.{2*i}.weight` (the ReLUs sit between).
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import json
    import os
    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    import torch
    from main import write_atomically
    from model import MLP
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


class TorchMLP(torch.nn.Module):
    """The same network in PyTorch: Linear, ReLU, ..., Linear."""

    def __init__(self, num_layers, input_dim, hidden_dim, output_dim):
        super().__init__()
        sizes = [input_dim] + [hidden_dim] * num_layers + [output_dim]
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers[:-1])  # no ReLU after the last Linear

    def forward(self, x):
        return self.net(x)


class ConversionError(Exception):
    pass


def mlx_to_torch_name(name):
    """layers.{i}.{weight,bias} -> net.{2i}.{weight,bias}"""
    _, i, kind = name.split(".")
    return f"net.{2 * int(i)}.{kind}"


def torch_to_mlx_name(name):
    _, i, kind = name.split(".")
    return f"layers.{int(i) // 2}.{kind}"


CONFIG_KEYS = ("num_layers", "input_dim", "hidden_dim", "output_dim")


def check_config(config, source):
    """The stored configuration as a whole: CONFIG_KEYS, each a positive integer."""
    if not isinstance(config, dict) or sorted(config) != sorted(CONFIG_KEYS):
        raise ConversionError(
            f"{source}: the stored configuration is {config!r}; expected the keys "
            f"{', '.join(CONFIG_KEYS)}"
        )
    wrong = [f"{k}={v!r}" for k, v in config.items() if type(v) is not int or v <= 0]
    if wrong:
        raise ConversionError(
            f"{source}: the stored configuration has {', '.join(wrong)}; each must be "
            "a positive integer"
        )


def expected_shapes(config):
    """{MLX name: shape} of MLP(**config), without building it (a damaged config may
    be huge)."""
    sizes = (
        [config["input_dim"]]
        + [config["hidden_dim"]] * config["num_layers"]
        + [config["output_dim"]]
    )
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (
            (n_out, n_in),
            (n_out,),
        )
    return shapes


def check_weights(found, expected, source):
    """Name what is missing or unexpected, any shape that does not match the config,
    and any array that is not floating point. `found` is {name: (shape, is float)}."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{source} does not match the configured MLP: "
            f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}"
        )
    for name, shape in expected.items():
        if tuple(found[name][0]) != tuple(shape):
            raise ConversionError(
                f"{source}: {name} has shape {tuple(found[name][0])}, expected "
                f"{tuple(shape)}"
            )
    not_float = sorted(name for name, (_, is_float) in found.items() if not is_float)
    if not_float:
        raise ConversionError(
            f"{source}: {', '.join(not_float)} not floating point; the weights of an "
            "MLP are floats"
        )


def read_mlx(path):
    """(config, {mlx name: numpy array}) from a safetensors file written by main.py."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ConversionError(
            f"cannot read MLX weights from {path}: {' '.join(str(e).split())}"
        ) from None
    if "config" not in metadata:
        raise ConversionError(
            f"{path} has no model configuration in its metadata; was it written by "
            "main.py?"
        )
    try:
        config = json.loads(metadata["config"])
    except ValueError as e:
        raise ConversionError(
            f"{path}: the stored configuration is not valid JSON ({e})"
        ) from None
    check_config(config, path)
    check_weights(
        {k: (v.shape, mx.issubdtype(v.dtype, mx.floating)) for k, v in arrays.items()},
        expected_shapes(config),
        path,
    )
    # float32 for NumPy, which has no bfloat16
    return config, {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}


def read_torch(path):
    """(config, {torch name: numpy array}) from a file written by `mlx_to_torch`."""
    try:
        # weights_only=True: never unpickle arbitrary objects from a file.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config, state_dict = checkpoint["config"], checkpoint["state_dict"]
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise ConversionError(
            f"{path} is not a PyTorch MLP checkpoint written by convert.py "
            f"({type(e).__name__})"
        ) from None
    check_config(config, path)
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ConversionError(f"{path}: its state_dict is not a dictionary of tensors")
    expected = {
        mlx_to_torch_name(k): shape for k, shape in expected_shapes(config).items()
    }
    check_weights(
        {k: (v.shape, v.is_floating_point()) for k, v in state_dict.items()},
        expected,
        path,
    )
    return config, {k: v.float().numpy() for k, v in state_dict.items()}


def mlx_to_torch(src, dst):
    config, weights = read_mlx(src)
    state_dict = {mlx_to_torch_name(k): torch.from_numpy(v) for k, v in weights.items()}
    checkpoint = {"config": config, "state_dict": state_dict}
    write_atomically(dst, lambda f: torch.save(checkpoint, f))


def torch_to_mlx(src, dst):
    config, state_dict = read_torch(src)
    weights = {torch_to_mlx_name(k): mx.array(v) for k, v in state_dict.items()}
    metadata = {"config": json.dumps(config)}
    write_atomically(dst, lambda f: mx.save_safetensors(f, weights, metadata))


def load_torch_model(path):
    """A TorchMLP with the weights of a file written by `mlx_to_torch`."""
    config, state_dict = read_torch(path)
    model = TorchMLP(**config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    return model.eval()


def load_mlx_model(path):
    """An MLP with the weights of a file written by main.py or `torch_to_mlx`."""
    config, weights = read_mlx(path)
    model = MLP(**config)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert the MNIST MLP between MLX (.safetensors) and PyTorch "
        "(.pt); the direction follows the file extensions."
    )
    parser.add_argument(
        "source",
        type=Path,
        help="a .safetensors file from main.py, or a .pt file from this script",
    )
    parser.add_argument(
        "output",
        type=Path,
        help="the file to write: .pt for PyTorch, .safetensors for MLX",
    )
    args = parser.parse_args(argv)

    suffixes = (args.source.suffix, args.output.suffix)
    try:
        if not args.source.exists():
            raise ConversionError(f"{args.source} does not exist")
        if not args.source.is_file():
            raise ConversionError(f"{args.source} is not a file")
        if suffixes == (".safetensors", ".pt"):
            mlx_to_torch(args.source, args.output)
        elif suffixes == (".pt", ".safetensors"):
            torch_to_mlx(args.source, args.output)
        else:
            raise ConversionError(
                f"cannot convert {suffixes[0] or 'no extension'} to "
                f"{suffixes[1] or 'no extension'}; use .safetensors -> .pt (MLX to "
                "PyTorch) or .pt -> .safetensors"
            )
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:  # the output is written whole or not at all
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError) as e:  # the output (MLX: RuntimeError), or stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(f"error: {e}")
