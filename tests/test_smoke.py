"""Every example's commands, end to end, in a subprocess, offline, with tiny settings.

Each case is (script, arguments); `{data}` is a tiny MNIST-shaped data set, `{bert}` a
tiny BERT folder in Hugging Face layout with `{bert}.npz` its conversion, `{llama}` the
same for a tiny Llama (with its SentencePiece `tokenizer.model`) and `{gpt2}` for a tiny
GPT-2, `{text}` a small text file, `{lora}` a folder of tiny llama/lora.py data, and
`{tmp}` a scratch folder.
"""

import re
import shlex

import pytest
from helpers import (
    run_script,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_lora_data,
    tiny_mnist,
)

CASES = {
    "linear_regression/main": (
        "linear_regression/main.py",
        "--num-features 8 --num-examples 64 --num-iters 50",
    ),
    "linear_regression/benchmark": (
        "linear_regression/benchmark.py",
        "--num-iters 20 --repeats 1",
    ),
    "mlp_mnist/main": (
        "mlp_mnist/main.py",
        "--data-dir {data} --epochs 1 --hidden-dim 16 --save {tmp}/mlp.safetensors",
    ),
    "mlp_mnist/benchmark": (
        "mlp_mnist/benchmark.py",
        "--steps 2 --repeats 1 --batch-size 8 --hidden-dim 16",
    ),
    "bert/model": ("bert/model.py", "--bert-model {bert} --mlx-model {bert}.npz"),
    "bert/hf_model": ("bert/hf_model.py", "--bert-model {bert}"),
    "bert/main": (
        "bert/main.py",
        "--bert-model {bert} --mlx-model {bert}.npz 'the capital [MASK].'",
    ),
    "bert/benchmark": ("bert/benchmark.py", "--tiny --repeats 1 --shapes 2x16"),
    "bert/benchmark --profile": (
        "bert/benchmark.py",
        "--tiny --profile --repeats 1 --shapes 2x16",
    ),
    "bert/embed": (
        "bert/embed.py",
        "--bert-model {bert} --mlx-model {bert}.npz 'the capital of france' 'paris'",
    ),
    "bert/benchmark --embed": (
        "bert/benchmark.py",
        "--embed --tiny --sentences 8 --batch-size 4 --repeats 1",
    ),
    "llama/main": (
        "llama/main.py",
        "--n-layers 2 --dim 64 --hidden-dim 128 --vocab-size 256 --max-tokens 4",
    ),
    "llama/llama": (
        "llama/llama.py",
        "{llama}.npz {llama}/tokenizer.model 'call me' --max-tokens 5 --temp 0.8 "
        "--top-p 0.9",
    ),
    "llama/llama --prompts": (
        "llama/llama.py",
        "{llama}.npz {llama}/tokenizer.model --prompts {text} --max-tokens 3 "
        "--batch-size 8",
    ),
    "llama/benchmark_batch": (
        "llama/benchmark_batch.py",
        "--preset tiny --max-tokens 4 --prompt-tokens 8 "
        "--min-prompt-tokens 2 --batch-sizes 1 3 --repeats 1",
    ),
    "llama/benchmark": (
        "llama/benchmark.py",
        "--preset tiny --prompt-tokens 8 --max-tokens 4 --repeats 1 --time-load",
    ),
    "llama/benchmark --profile": (
        "llama/benchmark.py",
        "--preset tiny --profile --repeats 1",
    ),
    "llama/lora": (
        "llama/lora.py",
        "--model {llama}.npz --tokenizer {llama}/tokenizer.model --data {lora} --train "
        "--iters 2 --test --adapter-path {tmp}/adapters",
    ),
    "llama/lora_data": ("llama/lora_data.py", "{tmp}/example_data"),
    "llama/benchmark_lora": (
        "llama/benchmark_lora.py",
        "--preset tiny --device cpu --warmup 1 --steps 1",
    ),
    "llama/perplexity": (
        "llama/perplexity.py",
        "{llama}.npz {llama}/tokenizer.model --data {text} --window 32",
    ),
    "llama/benchmark_structured": (
        "llama/benchmark_structured.py",
        "--preset tiny --vocab-size 2048 --max-tokens 16 --repeats 1",
    ),
    "llama/benchmark_server": (
        "llama/benchmark_server.py",
        "--preset tiny --max-tokens 4 --clients 1 2 --requests 1 --repeats 1 "
        "--work-dir {tmp}/bench",
    ),
    "llama/benchmark_speculative": (
        "llama/benchmark_speculative.py",
        "--preset tiny --max-tokens 8 --repeats 1 --k 2",
    ),
    "llama/benchmark_gguf": (
        "llama/benchmark_gguf.py",
        "--preset tiny --runs 1 --max-tokens 8",
    ),
    "gpt2/main": (
        "gpt2/main.py",
        "--data {text} --out {tmp} --ctx-len 16 --n-emb 16 --n-heads 2 --n-layers 1 "
        "--batch-size 8 --epochs 2 --max-tokens 30",
    ),
    "gpt2/generate": (
        "gpt2/generate.py",
        "{gpt2}.npz --prompt 'the cat' --max-tokens 5",
    ),
    "gpt2/benchmark": ("gpt2/benchmark.py", "--tiny --steps 2 --repeats 1"),
    "gpt2/benchmark --profile": ("gpt2/benchmark.py", "--tiny --profile --repeats 1"),
}


def tiny_converted(tmp_path_factory, make, convert_args):
    """A tiny Hugging Face folder made by `make`, converted to FOLDER.npz by
    `convert_args(folder)`."""
    folder = make(tmp_path_factory.mktemp("smoke") / make.__name__)
    result = run_script(*convert_args(folder))
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_converted(
        tmp_path_factory,
        tiny_bert,
        lambda f: ("bert/convert.py", "--bert-model", f, "--mlx-model", f"{f}.npz"),
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_converted(
        tmp_path_factory, tiny_llama, lambda f: ("llama/convert.py", f, f"{f}.npz")
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_converted(
        tmp_path_factory, tiny_gpt2, lambda f: ("gpt2/convert.py", f, f"{f}.npz")
    )


@pytest.mark.parametrize("case", CASES)
def test_example_runs(case, tmp_path, bert, llama, gpt2):
    script, args = CASES[case]
    data = tiny_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 30)
    lora = tiny_lora_data(tmp_path / "lora")
    args = shlex.split(
        args.format(
            data=data,
            tmp=tmp_path,
            bert=bert,
            llama=llama,
            gpt2=gpt2,
            text=text,
            lora=lora,
        )
    )
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


def test_mlp_mnist_convert_round_trip(tmp_path):
    data = tiny_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    run_script(
        "mlp_mnist/main.py",
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--save",
        tmp_path / "a.safetensors",
    )
    assert (
        run_script(
            "mlp_mnist/convert.py", tmp_path / "a.safetensors", tmp_path / "a.pt"
        ).returncode
        == 0
    )
    assert (
        run_script(
            "mlp_mnist/convert.py", tmp_path / "a.pt", tmp_path / "b.safetensors"
        ).returncode
        == 0
    )


@pytest.mark.parametrize(
    "script, args",
    [
        ("linear_regression/benchmark.py", "--num-iters 20 --repeats 1"),
        (
            "mlp_mnist/benchmark.py",
            "--steps 2 --repeats 1 --batch-size 8 --hidden-dim 16",
        ),
        ("bert/benchmark.py", "--tiny --repeats 1 --shapes 2x16"),
        (
            "bert/benchmark.py",
            "--embed --tiny --sentences 8 --batch-size 4 --repeats 1",
        ),
        (
            "llama/benchmark.py",
            "--preset tiny --prompt-tokens 8 --max-tokens 4 --repeats 1",
        ),
        ("gpt2/benchmark.py", "--tiny --steps 2 --repeats 1"),
    ],
)
def test_benchmarks_time_pytorch_apart_when_ld_preload_is_set(script, args, tmp_path):
    # An empty LD_PRELOAD changes nothing for the loader but takes the child-process
    # path.
    result = run_script(script, *args.split(), cwd=tmp_path, env={"LD_PRELOAD": ""})
    assert result.returncode == 0, result.stderr
    assert "in a child process without LD_PRELOAD" in result.stdout
    assert re.search(r"\d+\.\d\dx", result.stdout)  # the ratio column
