"""gpt2/: parity with transformers' GPT2LMHeadModel, conversion errors, character-level
training, exact --resume, and the data and vocabulary errors."""

import argparse
import json
import re
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import ROOT, import_example, run_script, tiny_gpt2

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
) * 40


@pytest.fixture(
    scope="module", params=[True, False], ids=["tied head", "separate head"]
)
def converted(request, tmp_path_factory):
    folder = tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "hf", tie=request.param)
    result = run_script("gpt2/convert.py", folder, folder.parent / "gpt2.npz")
    assert result.returncode == 0, result.stderr
    return folder, folder.parent / "gpt2.npz"


def test_logits_match_transformers(converted):
    from transformers import GPT2LMHeadModel

    folder, weights = converted
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    logits = np.array(
        import_example("gpt2", "generate").load_model(weights)[0](mx.array(ids))
    )
    assert (
        np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    )  # 1e-5 relative, float32


def test_generate_py_greedy_generation_equals_transformers(converted):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder, weights = converted
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "the cat sat in the hat"
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    expected = prompt + tokenizer.decode(out[0, ids.shape[1] :].tolist()) + "\n"
    result = run_script(
        "gpt2/generate.py",
        weights,
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--temp",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_convert_names_missing_keys_and_writes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_gpt2(tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.bias"]
    save_file(weights, folder / "model.safetensors")
    result = run_script("gpt2/convert.py", folder, tmp_path / "out.npz")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "missing: h.1.mlp.c_fc.bias" in result.stderr
    assert not (tmp_path / "out.npz").exists()


def test_convert_refuses_other_models(tmp_path):
    folder = tiny_gpt2(tmp_path / "hf")
    config = (folder / "config.json").read_text().replace('"gelu_new"', '"relu"')
    (folder / "config.json").write_text(config)
    result = run_script("gpt2/convert.py", folder, tmp_path / "out.npz")
    assert result.returncode != 0 and "activation_function 'relu'" in result.stderr
    result = run_script(
        "gpt2/convert.py", "openai-community/gpt2", tmp_path / "out.npz"
    )  # offline in tests
    assert (
        result.returncode != 0
        and "cannot get 'openai-community/gpt2' from the Hugging Face Hub"
        in result.stderr
    )
    result = run_script("gpt2/convert.py", tmp_path / "nowhere", tmp_path / "out.npz")
    assert result.returncode != 0 and "is not a folder" in result.stderr
    assert not (tmp_path / "out.npz").exists()


def test_convert_gpt2_from_the_repository_root_reads_the_hub_not_the_folder(
    tmp_path,
):
    # The README's `python gpt2/convert.py gpt2 weights/gpt2.npz`, run from the
    # repository root, where the folder gpt2/ (this example, no config.json) exists.
    # Offline, "gpt2" must come from the Hugging Face cache: a tiny model placed there
    # as the Hub client stores it.
    cache = tmp_path / "hub"
    snapshot = cache / "models--gpt2" / "snapshots" / ("0" * 40)
    tiny_gpt2(snapshot)
    (cache / "models--gpt2" / "refs").mkdir(parents=True)
    (cache / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    assert (ROOT / "gpt2").is_dir() and not (ROOT / "gpt2" / "config.json").exists()
    out = tmp_path / "weights" / "gpt2.npz"
    result = run_script(
        "gpt2/convert.py", "gpt2", out, cwd=ROOT, env={"HF_HUB_CACHE": str(cache)}
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file() and (tmp_path / "weights" / "gpt2-tokenizer").is_dir()
    result = run_script(
        "gpt2/convert.py",
        "gpt2",
        tmp_path / "again.npz",
        cwd=ROOT,
        env={"HF_HUB_CACHE": str(tmp_path / "empty")},
    )  # not cached: the Hub's error, not the folder's
    assert (
        result.returncode != 0
        and "cannot get 'gpt2' from the Hugging Face Hub" in result.stderr
    )
    result = run_script(
        "gpt2/convert.py", tmp_path / "weights", tmp_path / "x.npz"
    )  # a path, no config.json
    assert result.returncode != 0 and "a folder without config.json" in result.stderr


def epoch_lines(stdout):
    return [
        tuple(map(float, m))
        for m in re.findall(r"Epoch \d+ \| train = ([\d.]+) \| val = ([\d.]+)", stdout)
    ]


def test_training_lowers_the_loss(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py",
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path,
        "--ctx-len",
        "32",
        "--n-emb",
        "32",
        "--n-heads",
        "2",
        "--n-layers",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "4",
        "--lr",
        "3e-3",
        "--max-tokens",
        "50",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    losses = epoch_lines(result.stdout)
    assert len(losses) == 4
    assert (
        losses[-1][0] < losses[0][0] - 0.5 and losses[-1][1] < losses[0][1] - 0.5
    )  # train and val
    completion = (tmp_path / "completions.txt").read_text()
    assert len(completion) == 51 and set(completion) <= set(
        TEXT
    )  # the prompt "\n" and 50 characters


def test_training_says_what_it_does_and_shows_progress_and_the_time_left(
    tmp_path,
):
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py",
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path,
        "--ctx-len",
        "32",
        "--n-emb",
        "32",
        "--n-heads",
        "2",
        "--n-layers",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--log-every",
        "4",
        "--max-tokens",
        "5",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(
        rf"{len(TEXT):,} characters, vocabulary \d+; 0\.\d\dM parameters; "
        r"11 steps in 1 epochs of batch 16 x 32; "
        r"(float32|bfloat16) on ",
        lines[0],
    ), lines[0]  # the GPU's default is bfloat16
    steps = [line for line in lines if line.startswith("Step ")]
    assert re.fullmatch(
        r"Step 1/11 \| loss = [\d.]+ \| the first step took [\d.]+ s \(it compiles\)",
        steps[0],
    )
    for line, step in zip(steps[1:], (4, 8)):
        assert re.fullmatch(
            rf"Step {step}/11 \| loss = [\d.]+ \| \d+ ms/step \| \d+:\d\d:\d\d left",
            line,
        ), line
    assert len(steps) == 3 and lines.index(steps[-1]) < lines.index(
        next(x for x in lines if x.startswith("Epoch 1 |"))
    )


def test_progress_without_log_every_prints_the_first_step_then_every_10_seconds(
    monkeypatch, capsys
):
    main = import_example("gpt2", "main")
    clock = iter(
        [0.0, 5.0, 6.0, 9.0, 16.0, 17.0, 26.5]
    )  # the start, then the end of steps 1, 2, ...
    monkeypatch.setattr(main.time, "perf_counter", lambda: next(clock))
    progress = main.Progress(first=0, total=100, every=0)
    for step in range(1, 7):
        progress(step, 1.0)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in printed] == [
        "Step 1/100",
        "Step 4/100",
        "Step 6/100",
    ]
    assert "the first step took 5.0 s" in printed[0]
    assert printed[1].endswith(
        "| 3667 ms/step | 0:05:52 left"
    )  # (16 - 5) s / 3 steps; 96 steps left
    assert printed[2].endswith(
        "| 4300 ms/step | 0:06:44 left"
    )  # (26.5 - 5) s / 5 steps; 94 left


def test_reference_blas_warning_only_without_openblas(tmp_path, capsys):
    main = import_example("gpt2", "main")
    maps = {
        "reference": ["/venv/lib/mlx_cpu.libs/libblas-1a2b.so.3"],
        "openblas": [
            "/venv/lib/mlx_cpu.libs/libblas-1a2b.so.3",
            "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        ],
        "none": ["/usr/lib/libc.so.6"],
    }
    for name, libs in maps.items():
        lines = "".join(f"7f00-7f01 r-xp 00000000 08:01 42    {lib}\n" for lib in libs)
        (tmp_path / "maps").write_text(lines + "7ffd-7ffe rw-p 0 0 0 [stack]\n")
        main.warn_if_reference_blas(tmp_path / "maps")
        warned = capsys.readouterr().err
        expected = name == "reference"
        assert ("reference BLAS" in warned and "OpenBLAS" in warned) == expected, name
    main.warn_if_reference_blas(tmp_path / "no-such-file")  # not Linux: no warning
    assert capsys.readouterr().err == ""


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    common = [
        "--data",
        tmp_path / "text.txt",
        "--ctx-len",
        "32",
        "--n-emb",
        "32",
        "--n-heads",
        "2",
        "--n-layers",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--dropout",
        "0.2",
        "--min-lr",
        "1e-4",
        "--warmup",
        "2",
        "--grad-clip",
        "1.0",
        "--max-tokens",
        "20",
        "--dtype",
        "float32",
    ]  # the GPU's default is bfloat16
    # On the CPU, MLX is deterministic and the resumed run must equal the uninterrupted
    # one bit for bit. On a GPU some kernels sum with atomics (the embedding gradients),
    # so two identical uninterrupted runs already differ in the last bits, and 17 AdamW
    # steps grow that to a few 1e-6 (3.4e-6 seen on an H100). There the test measures
    # that run-to-run noise with a second uninterrupted run and demands that the resumed
    # run be no further from the first than 4x that noise (plus 1e-6, as one noise
    # sample may be small). A resume that lost state (a learning rate, a moment, the
    # dropout seed) is off by ~1e-3 or more.
    exact = mx.default_device() == mx.cpu
    runs = {
        "full": ["--out", tmp_path / "full", "--max-steps", "17"],
        "first": ["--out", tmp_path / "resumed", "--max-steps", "13"],
    }
    if not exact:
        runs["again"] = ["--out", tmp_path / "again", "--max-steps", "17"]
    # 11 steps per epoch here: the interrupted run stops mid-epoch 2, the full ones run
    # to step 17. The independent runs go in parallel (each spends most of its time
    # compiling on a GPU).
    with ThreadPoolExecutor(len(runs)) as pool:
        results = dict(
            zip(
                runs,
                pool.map(
                    lambda args: run_script("gpt2/main.py", *common, *args),
                    runs.values(),
                ),
            )
        )
    second = run_script(
        "gpt2/main.py",
        *common,
        "--out",
        tmp_path / "resumed",
        "--max-steps",
        "17",
        "--resume",
    )
    for result in (*results.values(), second):
        assert result.returncode == 0, result.stderr
    assert "Resumed from" in second.stdout and "at step 13" in second.stdout

    def checkpoint(name):
        return {
            k: np.array(v)
            for k, v in mx.load(str(tmp_path / name / "checkpoint.safetensors")).items()
        }

    def max_difference(x, y):
        return max(float(np.max(np.abs(x[k] - y[k]))) for k in x if k != "meta")

    a, b = checkpoint("full"), checkpoint("resumed")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    meta_a, meta_b = (
        json.loads(m.pop("meta").tobytes()) for m in (a, b)
    )  # the run's flags, --out among them
    assert meta_a["step"] == meta_b["step"] == 17 and meta_a["lr"] == meta_b["lr"]
    if exact:
        for name in a:
            assert np.array_equal(a[name], b[name]), name
    else:
        noise = max_difference(a, checkpoint("again"))
        assert noise < 1e-4, (
            f"two uninterrupted GPU runs differ by {noise}: more than rounding"
        )
        assert max_difference(a, b) <= 4 * noise + 1e-6, (max_difference(a, b), noise)


def test_resume_refuses_other_settings(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    common = [
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path,
        "--ctx-len",
        "32",
        "--n-emb",
        "32",
        "--n-heads",
        "2",
        "--n-layers",
        "1",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--max-tokens",
        "5",
    ]
    assert run_script("gpt2/main.py", *common).returncode == 0
    result = run_script("gpt2/main.py", *common, "--lr", "0.1", "--resume")
    assert (
        result.returncode != 0
        and "other settings" in result.stderr
        and "(lr)" in result.stderr
    )
    result = run_script("gpt2/main.py", *common, "--n-layers", "2", "--resume")
    assert result.returncode != 0 and "(n_layers)" in result.stderr


def test_min_lr_schedule_warms_up_linearly_then_decays_or_decays_at_once():
    import mlx.optimizers as optim

    main = import_example("gpt2", "main")
    for warmup in (0, 4):
        args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup=warmup)
        schedule, decay = (
            main.learning_rate(args, 20),
            optim.cosine_decay(1e-3, 20 - warmup, end=1e-4),
        )
        rates = [schedule(mx.array(step)).item() for step in range(21)]
        assert rates[:warmup] == pytest.approx(
            [1e-3 * step / warmup for step in range(warmup)]
        )
        assert rates[warmup:] == [
            decay(mx.array(step)).item() for step in range(21 - warmup)
        ]
    assert (
        main.learning_rate(argparse.Namespace(lr=1e-3, min_lr=None, warmup=0), 20)
        == 1e-3
    )  # constant


def test_char_vocab_round_trips_and_names_unknown_characters():
    main = import_example("gpt2", "main")
    vocab = main.CharVocab(TEXT)
    assert vocab.decode(vocab.encode(TEXT)) == TEXT
    assert len(vocab.chars) == len(set(TEXT))
    with pytest.raises(ValueError, match=r"not in the training text: 'Zé'"):
        vocab.encode("Zé First")


def test_unknown_prompt_characters_give_one_line(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script(
        "gpt2/main.py",
        "--data",
        tmp_path / "text.txt",
        "--out",
        tmp_path,
        "--ctx-len",
        "16",
        "--n-emb",
        "16",
        "--n-heads",
        "2",
        "--n-layers",
        "1",
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--prompt",
        "Zebra",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not in the training text: 'Zb'" in result.stderr
    assert "Epoch" not in result.stdout  # refused before training, not after
    assert not (tmp_path / "completions.txt").exists()


def test_no_data_offline_says_where_to_put_it(tmp_path):
    no_network = {
        name: "http://127.0.0.1:9" for name in ("https_proxy", "HTTPS_PROXY")
    }  # a closed port
    result = run_script(
        "gpt2/main.py",
        env={
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "no_proxy": "",
            "NO_PROXY": "",
            **no_network,
        },
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot download Tiny Shakespeare")
    assert (
        str(tmp_path / "cache" / "mlx-examples" / "tinyshakespeare" / "input.txt")
        in lines[-1]
    )
    assert "--data PATH" in lines[-1]


def test_download_caches_tiny_shakespeare(tmp_path, monkeypatch):
    main = import_example("gpt2", "main")
    source = tmp_path / "input.txt"
    source.write_text(TEXT)
    monkeypatch.setattr(main, "SHAKESPEARE", source.as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    target = tmp_path / "xdg" / "mlx-examples" / "tinyshakespeare" / "input.txt"
    assert main.download_shakespeare() == target and target.read_text() == TEXT
    source.unlink()
    assert main.download_shakespeare().read_text() == TEXT  # the cached copy


def test_init_follows_gpt2():
    model_module = import_example("gpt2", "model")
    mx.random.seed(0)
    config = model_module.GPTConfig(
        vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=256
    )
    model = model_module.GPT(config)
    std = lambda a: float(np.array(a).std())  # noqa: E731
    assert abs(std(model.wte.weight) - 0.02) < 1e-3
    assert abs(std(model.h[0].mlp.c_fc.weight) - 0.02) < 1e-3
    assert (
        abs(std(model.h[0].attn.c_proj.weight) - 0.02 / 4) < 3e-4
    )  # 0.02 / sqrt(2 * 8)
    assert abs(std(model.h[0].mlp.c_proj.weight) - 0.02 / 4) < 3e-4
    assert float(mx.abs(model.h[0].attn.c_attn.bias).max()) == 0.0
    assert float(mx.min(model.h[0].ln_1.weight)) == 1.0
