"""llama/tp.py: tensor-parallel generation over 2 processes on the ring backend (CPU),
against one process.

The processes are started two ways: with mlx.launch, as a user would, and directly
(MLX_RANK and a ring hostfile in the environment, as mlx.launch sets them), which lets a
test give each rank its own arguments and read each rank's exit status (mlx.launch
itself exits 0 when its processes fail).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import mlx.core as mx
import pytest
from helpers import (
    ROOT,
    example_modules,
    import_example,
    run_script,
    tiny_sentencepiece,
)
from mlx.utils import tree_flatten

SCRIPT = ROOT / "llama" / "llama.py"
PROMPT = "call me ishmael"
TIMEOUT = 60  # seconds; a hang fails the test instead of blocking CI
LAYER_WEIGHTS = re.compile(r"\.(wq|wk|wv|wo|w1|w2|w3)\.weight$")


@pytest.fixture(autouse=True)
def llama_on_path():
    """model.py imports quantize.py only for a quantized file, from llama/ as `python
    llama/llama.py` finds it."""
    with example_modules("llama"):
        yield


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def mlx_launch(*args, backend="ring", script=SCRIPT):
    launcher = shutil.which(
        "mlx.launch", path=os.path.dirname(sys.executable)
    ) or shutil.which("mlx.launch")
    assert launcher, "mlx.launch (installed with mlx) not found"
    command = [
        launcher,
        "-n",
        "2",
        "--backend",
        backend,
        "--python",
        sys.executable,
        "--starting-port",
        str(free_ports(1)[0]),
        str(script),
        *map(str, args),
    ]
    return subprocess.run(
        command, env=env(), capture_output=True, text=True, timeout=TIMEOUT
    )


def launch_ranks(tmp_path, args_per_rank):
    """Start one llama.py per entry of `args_per_rank` on a ring over 127.0.0.1;
    [(returncode, stdout, stderr)]."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(
        json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(len(args_per_rank))])
    )
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *map(str, args)],
            text=True,
            env={**env(), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank, args in enumerate(args_per_rank)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
        return [(p.returncode, *output) for p, output in zip(processes, outputs)]
    finally:
        for p in processes:
            p.kill()


def save_tiny_llama(path, seed=0, quantization=None, **args):
    """A random Llama (by default GQA: 4 query heads, 2 key/value heads) saved as
    convert.py saves one."""
    model, convert = (
        import_example("llama", "model"),
        import_example("llama", "convert"),
    )
    args = model.ModelArgs(
        **{
            **dict(
                dim=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=320,
                hidden_dim=192,
                rope_theta=5000.0,
                max_seq_len=96,
            ),
            **args,
        }
    )
    mx.random.seed(seed)
    # Matrices with std 0.3, not the default init, so that the logits are far from
    # uniform and no greedy choice is a near tie that the ranks' different order of
    # summation could flip.
    weights = {
        name: mx.random.normal(p.shape) * 0.3 if p.ndim == 2 else mx.ones(p.shape)
        for name, p in tree_flatten(model.Llama(args).parameters())
    }
    if (
        quantization is not None
    ):  # those weights quantized, as convert.py --quantize stores them
        llama = model.Llama(args)
        llama.load_weights(list(weights.items()))
        import_example("llama", "quantize").quantize(llama, **quantization)
        args = model.ModelArgs(**{**vars(args), "quantization": quantization})
        weights = dict(tree_flatten(llama.parameters()))
    convert.save(args, weights, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA Llama in a .safetensors file, and a SentencePiece tokenizer for it."""
    folder = tmp_path_factory.mktemp("llama_tp")
    return save_tiny_llama(folder / "w.safetensors"), tiny_sentencepiece(
        folder / "tokenizer.model"
    )


@pytest.fixture(scope="module")
def one_process(tiny):
    result = run_script("llama/llama.py", *tiny, PROMPT, "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 10
    return result.stdout


def test_two_ranks_print_the_text_of_one_process_each_holding_half_the_layers(
    tiny, one_process
):
    result = mlx_launch(*tiny, PROMPT, "--max-tokens", "30")
    assert "exited with code" not in result.stderr, result.stderr
    assert result.stdout == one_process  # rank 0's text only, and the same tokens
    per_rank = re.search(
        r"layer weights per rank ([\d,]+) \+ ([\d,]+) bytes", result.stderr
    )
    assert per_rank, result.stderr
    read_arrays = import_example("llama", "model").read_arrays
    layer_bytes = sum(
        a.nbytes
        for name, a in read_arrays(tiny[0]).items()
        if LAYER_WEIGHTS.search(name)
    )
    assert [int(b.replace(",", "")) for b in per_rank.groups()] == [
        layer_bytes // 2
    ] * 2
    assert result.stderr.count("[load ") == 1  # statistics from rank 0 only


@pytest.mark.skipif(
    not (mx.cuda.is_available() and mx.device_count(mx.gpu) >= 2),
    reason="NCCL runs one rank per NVIDIA GPU: needs MLX's CUDA build and at least 2 "
    "GPUs",
)
def test_two_gpus_over_nccl_print_the_text_of_one_process(tiny, one_process):
    result = mlx_launch(*tiny, PROMPT, "--max-tokens", "30", backend="nccl")
    assert "exited with code" not in result.stderr, result.stderr
    assert "split over 2 processes" in result.stderr and result.stdout == one_process


def test_npz_weights_give_the_same_text(tiny, one_process, tmp_path):
    npz = save_tiny_llama(tmp_path / "w.npz")  # the same weights
    ranks = launch_ranks(tmp_path, [(npz, tiny[1], PROMPT, "--max-tokens", "30")] * 2)
    assert [r[0] for r in ranks] == [0, 0], ranks
    assert ranks[0][1] == one_process and ranks[1][1] == ""


def test_a_quantized_model_splits_its_packed_weights_and_gives_the_same_text(
    tiny, tmp_path
):
    weights = save_tiny_llama(
        tmp_path / "q.safetensors", quantization={"group_size": 32, "bits": 4}
    )
    alone = run_script("llama/llama.py", weights, tiny[1], PROMPT, "--max-tokens", "30")
    assert alone.returncode == 0 and "4-bit weights" in alone.stderr, alone.stderr
    result = mlx_launch(weights, tiny[1], PROMPT, "--max-tokens", "30")
    assert "exited with code" not in result.stderr, result.stderr
    assert result.stdout == alone.stdout and len(alone.stdout) > 10
    per_rank = re.search(
        r"layer weights per rank ([\d,]+) \+ ([\d,]+) bytes", result.stderr
    )
    layer_bytes = sum(
        a.nbytes
        for name, a in import_example("llama", "model").read_arrays(weights).items()
        if re.search(r"\.(wq|wk|wv|wo|w1|w2|w3)\.(weight|scales|biases)$", name)
    )
    assert [int(b.replace(",", "")) for b in per_rank.groups()] == [
        layer_bytes // 2
    ] * 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_each_rank_reads_its_slice_of_the_file(tiny, tmp_path, suffix, dtype):
    """load_sharded's memory-mapped slices equal slices of the whole arrays, dtype and
    bits kept."""
    model, tp = import_example("llama", "model"), import_example("llama", "tp")
    path = tmp_path / f"w{suffix}"
    weights = model.read_arrays(tiny[0])
    config = weights.pop("config")
    arrays = {
        **{name: w.astype(getattr(mx, dtype)) for name, w in weights.items()},
        "config": config,
    }
    if suffix == ".npz":
        mx.savez(str(path), **arrays)
    else:
        mx.save_safetensors(str(path), arrays)
    whole = model.read_arrays(path)
    mapped = tp.memmap_npz(path) if suffix == ".npz" else tp.memmap_safetensors(path)
    assert whole.keys() == mapped.keys()
    for name, (array, is_bfloat16) in mapped.items():
        axis = tp.split_axis(name)
        assert axis == (
            0
            if re.search(r"\.(wq|wk|wv|w1|w3)\.", name)
            else -1
            if re.search(r"\.(wo|w2)\.", name)
            else None
        )
        for rank in range(2):
            piece = tp.to_mlx(tp.rank_slice(array, axis, rank, 2), is_bfloat16)
            assert piece.dtype == whole[name].dtype, name
            expected = (
                whole[name]
                if axis is None
                else mx.split(whole[name], 2, axis=axis)[rank]
            )
            assert mx.array_equal(piece, expected).item(), (name, rank)


class FakeGroup:
    """Rank `rank` of `size`, for splitting a model in one process (no communication
    happens)."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_load_sharded_equals_splitting_the_loaded_model(tiny):
    model, tp = import_example("llama", "model"), import_example("llama", "tp")
    for rank in range(2):
        from_file = tp.load_sharded(tiny[0], FakeGroup(rank, 2))
        split = tp.shard(model.load_model(tiny[0]), FakeGroup(rank, 2))
        flat = [dict(tree_flatten(m.parameters())) for m in (from_file, split)]
        assert flat[0].keys() == flat[1].keys()
        for name in flat[0]:
            assert mx.array_equal(flat[0][name], flat[1][name]).item(), (rank, name)
        attention = from_file.layers[0].attention
        # This rank's heads: 2 of 4 query heads, 1 of 2 key/value heads (head_dim 16).
        assert attention.wk.weight.shape == (16, 64) and attention.wo.weight.shape == (
            64,
            32,
        )


def test_head_counts_that_do_not_split_stop_every_rank_with_one_line(tiny, tmp_path):
    weights = save_tiny_llama(
        tmp_path / "w.safetensors", dim=48, n_heads=6, n_kv_heads=3, hidden_dim=96
    )
    ranks = launch_ranks(tmp_path, [(weights, tiny[1], PROMPT)] * 2)
    assert [r[0] for r in ranks] == [1, 1], ranks
    assert ranks[0][2].strip().splitlines() == [
        "error: the model has 3 key/value heads, which do not split evenly over 2 "
        "processes; use -n 1 or 3"
    ]
    assert ranks[1][2] == "" and ranks[0][1] == ranks[1][1] == ""


def test_weights_missing_on_one_rank_stop_every_rank(tiny, tmp_path):
    missing = tmp_path / "elsewhere" / "w.safetensors"
    ranks = launch_ranks(
        tmp_path, [(tiny[0], tiny[1], PROMPT), (missing, tiny[1], PROMPT)]
    )
    assert [r[0] for r in ranks] == [1, 1], ranks
    assert ranks[0][2].strip().splitlines() == [
        f"error: rank 1: {missing} does not exist on this machine; with several "
        "machines every one needs the weights at the same path"
    ]
    assert ranks[1][2] == ""


def test_a_backend_that_is_not_there_is_one_line_from_rank_0(tiny):
    if mx.cuda.is_available():
        pytest.skip("this machine has NCCL: the test needs a machine without it")
    result = mlx_launch(
        *tiny, PROMPT, backend="nccl"
    )  # NCCL needs MLX's CUDA build and GPUs
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "cannot connect" in errors[0]
        and "--backend nccl needs" in errors[0]
    ), result.stderr
    # mlx.launch reports each rank's status (and exits 0 itself); rank 0 may be stopped
    # (-15) when rank 1 exits.
    codes = dict(
        re.findall(r"Node with rank (\d) exited with code (-?\d+)", result.stderr)
    )
    assert codes.keys() == {"0", "1"} and "0" not in codes.values(), result.stderr
    assert result.stdout == ""


def test_benchmark_builds_a_split_random_model_and_times_it():
    result = mlx_launch(
        "--preset",
        "tiny",
        "--max-tokens",
        "4",
        "--repeats",
        "1",
        script=ROOT / "llama" / "benchmark_tp.py",
    )
    assert "exited with code" not in result.stderr, result.stderr
    # "2 CPU processes" where MLX has no GPU; on a GPU machine the two ring processes
    # share the GPU.
    rows = [
        line
        for line in result.stdout.splitlines()
        if re.match(r"ROW \| MLX \| tiny \| 2 (CPU processes|GPUs) \|", line)
    ]
    assert len(rows) == 1, result.stdout  # from rank 0 only
    assert float(rows[0].split("|")[4]) > 0  # tokens/s
    host = re.findall(
        r"host time per decoding step \(rank 0\): ([\d.]+) ms building the graph \+ "
        r"([\d.]+) ms",
        result.stdout,
    )
    assert len(host) == 1 and all(float(t) > 0 for t in host[0]), result.stdout
