"""llama/: bad input and faults. Each mistake a user can make (a damaged file, a flag
out of range, text that is not UTF-8, an output that cannot be written) gets one line
and a non-zero exit, never a traceback or a half-written file; Ctrl-C and SIGTERM leave
nothing behind; the processes of a tensor-parallel run end together when one is
interrupted, killed or stopped."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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
ARGS = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=320,
    hidden_dim=192,
    max_seq_len=4096,
)


@pytest.fixture(autouse=True)
def llama_on_path():
    """model.py imports quantize.py only for a quantized file, from llama/ as `python
    llama/llama.py` finds it."""
    with example_modules("llama"):
        yield


def random_weights(args, seed=0):
    """Random float32 weights for `args` whose logits never make EOS (id 2) the most
    likely token, so that generation runs to --max-tokens."""
    model = import_example("llama", "model")
    mx.random.seed(seed)
    weights = {
        name: mx.random.normal(p.shape) * 0.3 if p.ndim == 2 else mx.ones(p.shape)
        for name, p in tree_flatten(model.Llama(model.ModelArgs(**args)).parameters())
    }
    weights["output.weight"][2] = 0
    return weights


def save_with_config(path, config, weights):
    """A weights file as convert.py writes one, but with `config` (a dict, or raw text)
    as its configuration."""
    text = config if isinstance(config, str) else json.dumps(config)
    mx.save_safetensors(
        str(path), {**weights, "config": mx.array(list(text.encode()), dtype=mx.uint8)}
    )
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(weights file, SentencePiece tokenizer) of a tiny Llama with a 4096-token
    context."""
    folder = tmp_path_factory.mktemp("llama_faults")
    convert, model = (
        import_example("llama", "convert"),
        import_example("llama", "model"),
    )
    convert.save(
        model.ModelArgs(**ARGS), random_weights(ARGS), folder / "w.safetensors"
    )
    return folder / "w.safetensors", tiny_sentencepiece(folder / "tokenizer.model")


def one_line_error(result, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode not in (0, None), result.stderr
    assert message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and (
        len(lines) == 1 or lines[0].startswith("usage:")
    ), result.stderr


# ---- A damaged configuration, weights of the wrong dtype -----------------------------


def stored_config():
    return {
        **ARGS,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_traditional": True,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "quantization": None,
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_heads": 0}, "n_heads must be a whole number from 1 to 2147483647, not 0"),
        ({"dim": -64}, "dim must be a whole number from 1 to 2147483647, not -64"),
        (
            {"hidden_dim": 10**12},
            "hidden_dim must be a whole number from 1 to 2147483647",
        ),
        ({"n_layers": 10**6}, "n_layers must be a whole number from 1 to 1024"),
        ({"n_layers": "2"}, "n_layers must be a whole number from 1 to 1024, not '2'"),
        ({"norm_eps": float("nan")}, "norm_eps must be a positive number, not nan"),
        ({"rope_traditional": "yes"}, "rope_traditional must be true or false"),
        ({"n_heads": 3}, "dim 64, n_heads 3 and n_kv_heads 2 do not divide"),
        (
            {
                "rope_scaling": {
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "the low factor below the high one",
        ),
        (
            {"quantization": {"group_size": 64, "bits": "4"}},
            "'4'-bit quantization is not supported",
        ),
        ("{not json", "Expecting property name"),
    ],
)
def test_a_damaged_stored_configuration_is_refused_naming_the_field(
    change, message, tmp_path
):
    config = change if isinstance(change, str) else {**stored_config(), **change}
    path = save_with_config(tmp_path / "bad.safetensors", config, random_weights(ARGS))
    model = import_example("llama", "model")
    with pytest.raises(model.WeightsError) as error:
        model.load_model(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_llama_py_says_a_damaged_configuration_in_one_line(tiny, tmp_path):
    path = save_with_config(
        tmp_path / "bad.safetensors",
        {**stored_config(), "n_heads": 0},
        random_weights(ARGS),
    )
    one_line_error(
        run_script("llama/llama.py", path, tiny[1], "call me"),
        "n_heads must be a whole number",
    )


@pytest.mark.parametrize(
    "name, dtype",
    [("layers.0.attention.wq.weight", mx.int32), ("norm.weight", mx.bool_)],
)
def test_float_weights_of_another_dtype_are_refused(name, dtype, tmp_path):
    weights = random_weights(ARGS)
    weights[name] = weights[name].astype(dtype)
    path = save_with_config(tmp_path / "w.safetensors", stored_config(), weights)
    model = import_example("llama", "model")
    with pytest.raises(
        model.WeightsError, match=f"{name} is {dtype}, expected a float"
    ):
        model.load_model(path)


def test_quantization_scales_of_an_integer_dtype_are_refused(tmp_path):
    model, quantize = (
        import_example("llama", "model"),
        import_example("llama", "quantize"),
    )
    llama = model.Llama(model.ModelArgs(**ARGS))
    llama.load_weights(list(random_weights(ARGS).items()))
    weights = dict(tree_flatten(quantize.quantize(llama, 32, 4).parameters()))
    weights["layers.1.feed_forward.w2.scales"] = weights[
        "layers.1.feed_forward.w2.scales"
    ].astype(mx.int32)
    path = save_with_config(
        tmp_path / "q.safetensors",
        {**stored_config(), "quantization": {"group_size": 32, "bits": 4}},
        weights,
    )
    with pytest.raises(
        model.WeightsError,
        match="layers.1.feed_forward.w2.scales is mlx.core.int32, expected a float",
    ):
        model.load_model(path)


# ---- Flags and text at entry ---------------------------------------------------------


@pytest.mark.parametrize(
    "flag, message",
    [
        (
            ["--seed", "-1"],
            "argument --seed: must be a whole number at least 0 and at most "
            "18446744073709551615, not -1",
        ),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (
            ["--temp", "nan"],
            "argument --temp: must be a finite number at least 0, not nan",
        ),
        (
            ["--temp", "inf"],
            "argument --temp: must be a finite number at least 0, not inf",
        ),
        (
            ["--temp", "-1"],
            "argument --temp: must be a finite number at least 0, not -1",
        ),
        (
            ["--top-p", "0"],
            "argument --top-p: must be a finite number above 0 and at most 1, not 0",
        ),
        (
            ["--max-tokens", "0"],
            "argument --max-tokens: must be a whole number at least 1, not 0",
        ),
        (
            ["--timeout", "-5"],
            "argument --timeout: must be a finite number at least 0, not -5",
        ),
    ],
)
def test_llama_py_refuses_flags_out_of_range(flag, message, tiny):
    one_line_error(run_script("llama/llama.py", *tiny, "call me", *flag), message)


@pytest.mark.parametrize("max_tokens", ["0", "-1"])
def test_main_py_refuses_a_max_tokens_that_would_never_end(max_tokens):
    result = run_script("llama/main.py", "--max-tokens", max_tokens, timeout=60)
    one_line_error(
        result,
        "argument --max-tokens: must be a whole number at least 1 and at most "
        f"2147483647, not {max_tokens}",
    )


def test_main_py_says_in_one_line_that_the_heads_do_not_divide_the_width():
    one_line_error(
        run_script("llama/main.py", "--dim", "100", "--n-heads", "8", timeout=60),
        "dim 100, n_heads 8 and n_kv_heads 8 do not divide",
    )


def test_a_prompt_that_is_not_utf8_is_refused(tiny):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, tiny), b"caf\xe9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_error(result, "argument prompt: invalid text value")


def test_tokenizer_files_that_are_not_utf8_are_refused_with_one_line(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE({"a": 0, "b": 1}, [])).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"eos_token": "caf\xe9"}')
    with pytest.raises(
        import_example("llama", "tokenizer").TokenizerError,
        match="tokenizer_config.json",
    ):
        import_example("llama", "tokenizer").load_tokenizer(tmp_path)


def test_a_chat_template_that_is_not_utf8_is_refused_with_one_line(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE({"a": 0, "b": 1}, [])).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ messages }} caf\xe9")
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(tmp_path)
    chat = import_example("llama", "chat")
    with pytest.raises(chat.ChatFormatError, match="chat_template.jinja"):
        chat.chat_tokens(tokenizer, [{"role": "user", "content": "a"}])


def test_a_chat_line_that_is_not_utf8_ends_the_chat_with_one_line(tiny):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, tiny), "--chat", "--max-tokens", "2"],
        input=b"call me\ncaf\xe9\n",
        capture_output=True,
        timeout=60,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("error: a line on stdin is not UTF-8 text")
    ), stderr
    assert stderr.count("from the cache") == 1  # the first line was answered


# ---- Ctrl-C, one process -------------------------------------------------------------


def wait_for(path, text, process, seconds=60):
    """Wait until the file `path` holds `text` (a process's redirected stderr, say)."""
    deadline = time.monotonic() + seconds
    while text not in (path.read_text() if path.exists() else ""):
        assert process.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.1)


def test_ctrl_c_during_generation_is_one_line_and_exit_130(tiny, tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                *map(str, tiny),
                "call me",
                "--max-tokens",
                "4000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(err, "[load ", process)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        process.kill()
    assert (
        err.read_text().strip().splitlines()[-1] == "interrupted"
        and "Traceback" not in err.read_text()
    )


# ---- Tensor parallelism: the processes end together ----------------------------------


def launch(tmp_path, tiny, *flags):
    """mlx.launch of 2 ring processes generating 4000 tokens, in a session of its own;
    (process, stderr path)."""
    launcher = shutil.which(
        "mlx.launch", path=os.path.dirname(sys.executable)
    ) or shutil.which("mlx.launch")
    from test_llama_tp import free_ports

    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            [
                launcher,
                "-n",
                "2",
                "--backend",
                "ring",
                "--python",
                sys.executable,
                "--starting-port",
                str(free_ports(1)[0]),
                str(SCRIPT),
                *map(str, tiny),
                "call me",
                "--max-tokens",
                "4000",
                *flags,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    wait_for(err, "[load ", process)
    time.sleep(1)  # generating
    return process, err


def rank(process, r):
    """The pid of the rank-r process that mlx.launch `process` started (its children:
    Linux /proc)."""
    for pid in subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
    ).stdout.split():
        if f"MLX_RANK={r}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(
            b"\0"
        ):
            return int(pid)
    raise AssertionError(f"no rank {r} among mlx.launch's processes")


def ended(process, seconds):
    try:
        process.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return False


needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the ranks' pids through /proc"
)


def gone(pid, seconds):
    """Whether process `pid` has ended (or is a zombie) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z"):
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@needs_proc
def test_ctrl_c_to_a_two_process_run_ends_every_rank_with_one_line(tiny, tmp_path):
    process, err = launch(tmp_path, tiny)
    ranks = [rank(process, r) for r in (0, 1)]
    os.killpg(
        process.pid, signal.SIGINT
    )  # what Ctrl-C at a terminal does: every process of the group
    try:
        assert all(gone(pid, 30) for pid in ranks), err.read_text()
    finally:
        # mlx.launch 0.32 itself prints a KeyboardInterrupt traceback, may lose what the
        # ranks print after it, and now and then keeps waiting (its Ctrl-C can land
        # inside a queue's lock): that is not tested here.
        ended(process, 5)
    assert (
        err.read_text().count("interrupted") <= 1 and "llama/" not in err.read_text()
    ), err.read_text()


@needs_proc
def test_killing_a_rank_during_generation_ends_the_run_with_one_line(tiny, tmp_path):
    process, err = launch(tmp_path, tiny)
    os.kill(rank(process, 1), signal.SIGKILL)
    assert ended(process, 30), err.read_text()
    text = err.read_text()
    # Rank 0 learns it from the lost connection, or from mlx.launch's SIGTERM if that
    # comes first. mlx.launch writes its own "[WARN] Node with rank r exited" lines to
    # the same stderr, and one of them can start on the line of ours (the two processes
    # write at once), so the line is counted in the whole text.
    assert (
        text.count("error: ") == 1
        and "error: another process of this run has stopped (" in text
    ), text
    assert "Traceback" not in text, text


@needs_proc
def test_a_stopped_rank_ends_the_run_after_the_timeout(tiny, tmp_path):
    process, err = launch(tmp_path, tiny, "--timeout", "3")
    stopped = rank(process, 1)
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert ended(process, 30), err.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    ours = [line for line in err.read_text().splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "made no progress for 3 s" in ours[0], err.read_text()


# ---- convert.py: its configurations and its output -----------------------------------


def test_meta_params_without_a_field_are_refused_naming_it(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    (tmp_path / "consolidated.00.pth").write_bytes(b"never read")
    one_line_error(
        run_script("llama/convert.py", tmp_path, tmp_path / "w.npz"),
        "params.json lacks n_heads",
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, "n_heads must be a whole number"),
        ({"hidden_size": "64"}, "dim must be a whole number"),
        ({"num_hidden_layers": None}, "n_layers must be a whole number"),
    ],
)
def test_a_damaged_hugging_face_config_is_refused_naming_the_field(
    change, message, tmp_path
):
    from helpers import LLAMA_CONFIG

    folder = (
        tmp_path / "hf"
    )  # the configuration is refused before any weights are looked for
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", **LLAMA_CONFIG, **change})
    )
    one_line_error(run_script("llama/convert.py", folder, tmp_path / "w.npz"), message)


@pytest.mark.parametrize("case", ["a folder", "a parent that is a file"])
def test_convert_refuses_an_output_it_cannot_write_before_reading_anything(
    case, tmp_path
):
    output, message = (
        tmp_path / "out.safetensors",
        "is a folder; give the file to write",
    )
    if case == "a folder":
        output.mkdir()
    else:
        (tmp_path / "file").write_text("")
        output, message = (
            tmp_path / "file" / "out.safetensors",
            f"{tmp_path / 'file'} is a file, not a folder",
        )
    # A Hub name that cannot be fetched offline: the output is refused first.
    one_line_error(
        run_script("llama/convert.py", "meta-llama/Llama-2-7b-hf", output), message
    )


def test_convert_refuses_an_output_the_disk_has_no_room_for(tmp_path, monkeypatch):
    convert = import_example("llama", "convert")
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})
    )
    with pytest.raises(
        convert.ConversionError, match="needs about 5.00 MB; .* has 0.00 MB free"
    ):
        convert.check_output(tmp_path / "w.safetensors", 5 * 10**6)


@pytest.mark.parametrize(
    "fault",
    [
        RuntimeError("[save_safetensors] No space left on device"),
        KeyboardInterrupt(),
        SystemExit(143),
    ],
    ids=["full disk", "Ctrl-C", "SIGTERM"],
)
def test_a_failed_write_leaves_neither_output_nor_temporary_file(
    fault, tmp_path, monkeypatch
):
    convert, model = (
        import_example("llama", "convert"),
        import_example("llama", "model"),
    )

    def fail(path, arrays):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise fault

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(
        (convert.ConversionError, KeyboardInterrupt, SystemExit)
    ) as error:
        convert.save(
            model.ModelArgs(**ARGS), random_weights(ARGS), tmp_path / "w.safetensors"
        )
    if isinstance(fault, RuntimeError):
        assert "No space left on device" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_convert_as_an_exception():
    with pytest.raises(SystemExit) as stop:
        import_example("llama", "convert").stopped(signal.SIGTERM, None)
    assert stop.value.code == 128 + signal.SIGTERM


def test_a_temporary_file_of_a_killed_run_is_replaced_by_the_next_write(tmp_path):
    convert, model = (
        import_example("llama", "convert"),
        import_example("llama", "model"),
    )
    (tmp_path / ".w.safetensors.tmp.safetensors").write_bytes(b"left by kill -9")
    convert.save(
        model.ModelArgs(**ARGS), random_weights(ARGS), tmp_path / "w.safetensors"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_the_output_gets_the_users_umask(tmp_path):
    convert, model = (
        import_example("llama", "convert"),
        import_example("llama", "model"),
    )
    previous = os.umask(0o027)
    try:
        convert.save(model.ModelArgs(**ARGS), random_weights(ARGS), tmp_path / "w.npz")
    finally:
        os.umask(previous)
    assert (tmp_path / "w.npz").stat().st_mode & 0o777 == 0o640


# ---- Issue 32: output, Ctrl-C at start-up, damaged tokenizer folders, odd prompts ----


def ends_with_one_error_line(result, message):
    """A run that fails after loading: its status lines, then one line with
    `message`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode not in (0, None), result.stderr
    assert message in lines[-1] and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: "), result.stderr


def word_tokenizer(folder, config=None, generation_config=None):
    """A Hugging Face tokenizer folder with ARGS' 320 tokens (a word each: t0 ... t319,
    split on spaces), with `config` as tokenizer_config.json (raw text if a str) and
    `generation_config` as generation_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(exist_ok=True)
    vocab = {f"t{i}": i for i in range(ARGS["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, value in (
        ("tokenizer_config.json", config),
        ("generation_config.json", generation_config),
    ):
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            (folder / name).write_text(text)
    return folder


def test_output_to_a_closed_pipe_ends_quietly(tiny):
    result = subprocess.run(
        f"{sys.executable} {SCRIPT} {tiny[0]} {tiny[1]} 'call me' --max-tokens 500"
        " | head -c1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(result.stdout) == 1 and "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr


@pytest.mark.parametrize("prompts", [False, True])
def test_output_to_a_full_disk_is_one_line(prompts, tiny, tmp_path):
    arguments = ["call me"]
    if prompts:
        (tmp_path / "p.txt").write_text("call me\nsome years ago\n")
        arguments = ["--prompts", tmp_path / "p.txt"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, SCRIPT, *tiny, *arguments],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    ends_with_one_error_line(result, "No space left on device")


def test_convert_summary_to_a_full_disk_is_one_line_and_the_file_is_written(
    tmp_path,
):
    from helpers import tiny_llama

    folder = tiny_llama(tmp_path / "hf")
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, ROOT / "llama" / "convert.py", folder, tmp_path / "w.npz"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    ends_with_one_error_line(result, "No space left on device")
    assert (tmp_path / "w.npz").is_file()


@pytest.mark.parametrize("delay", [0, 0.05, 0.15, 0.25])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(delay, tiny):
    """From the script's first import on (seen through -X importtime), then while MLX,
    the model and the tokenizer load: never a traceback, never lost."""
    # 4,000 tokens take about 6 s here: the run is still going when the signal comes,
    # also when this process is starved for seconds on a loaded machine.
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", SCRIPT, *tiny, "call me"]
        + ["--max-tokens", "4000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    while not lines or not lines[-1].rstrip().endswith("| argparse"):
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before the signal: a longer run"
    process.send_signal(signal.SIGINT)
    stderr = "".join(lines) + process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert "Traceback" not in stderr and "generation" not in stderr, stderr


@pytest.mark.parametrize(
    "config, generation_config, message",
    [
        ("[1, 2]", None, "tokenizer_config.json must hold a JSON object"),
        ({"eos_token": {"foo": 1}}, None, None),
        ({}, {"eos_token_id": {"a": 1}}, "eos_token_id must be a token id"),
        ({}, {"eos_token_id": [[1, 2]]}, "eos_token_id must be a token id"),
    ],
)
def test_tokenizer_configs_of_the_wrong_shape_are_one_line_or_ignored(
    config, generation_config, message, tmp_path
):
    folder = word_tokenizer(tmp_path / "tok", config, generation_config)
    tokenizer = import_example("llama", "tokenizer")
    if message is None:  # an EOS token without a name: no stop token from it
        assert tokenizer.load_tokenizer(folder).stop_ids == set()
        return
    # llama.py prints a TokenizerError as one line (test_..._one_line_error_in_llama_py)
    with pytest.raises(tokenizer.TokenizerError, match=message):
        tokenizer.load_tokenizer(folder)


def test_a_damaged_tokenizer_folder_is_one_line_error_in_llama_py(tiny, tmp_path):
    folder = word_tokenizer(tmp_path / "tok", "[1, 2]")
    result = run_script("llama/llama.py", tiny[0], folder, "t5 t6")
    one_line_error(result, "must hold a JSON object")


@pytest.mark.parametrize(
    "template, message",
    [
        (42, "must be text, not 42"),
        (["x"], 'without a template named "default"'),
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{% for i in range(100000000) %}x{% endfor %}", "Range too big"),
    ],
)
def test_a_chat_template_that_is_not_text_or_fails_is_one_line(
    template, message, tiny, tmp_path
):
    folder = word_tokenizer(tmp_path / "tok", {"chat_template": template})
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(folder)
    chat = import_example("llama", "chat")
    # llama.py prints a ChatFormatError as one line (the case of 1/0 below)
    with pytest.raises(chat.ChatFormatError, match=re.escape(message)):
        chat.chat_tokens(tokenizer, [{"role": "user", "content": "t5"}])
    if template == "{{ 1/0 }}":
        result = run_script("llama/llama.py", tiny[0], folder, "--chat", "t5")
        one_line_error(result, message)


def test_the_generation_tag_renders_as_transformers_renders_it(tmp_path):
    from transformers import PreTrainedTokenizerFast

    template = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    folder = word_tokenizer(tmp_path / "tok", {"chat_template": template})
    conversation = [
        {"role": "user", "content": "t1 t2"},
        {"role": "assistant", "content": "t3"},
        {"role": "user", "content": "t4"},
    ]
    chat = import_example("llama", "chat")
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(folder)
    ours = chat.render_template(template, conversation, tokenizer.special_tokens_map)
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json")
    ).apply_chat_template(
        conversation,
        chat_template=template,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert ours == reference and "t3" in ours


@pytest.mark.parametrize("chat_flag", [True, False])
def test_a_chat_that_renders_to_no_tokens_is_one_line(chat_flag, tiny, tmp_path):
    folder = word_tokenizer(
        tmp_path / "tok", {"chat_template": "{% if false %}x{% endif %}"}
    )
    prompts = tmp_path / "p.jsonl"
    line = {"messages": [{"role": "user", "content": "t5"}]}
    prompts.write_text(json.dumps(line) + "\n")
    flags = ["--chat"] if chat_flag else []
    result = run_script("llama/llama.py", tiny[0], folder, "--prompts", prompts, *flags)
    ends_with_one_error_line(result, "renders this conversation to no tokens")


def test_a_system_only_conversation_on_llama_2_is_one_line(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    line = {"messages": [{"role": "system", "content": "Be brief."}]}
    prompts.write_text(json.dumps(line) + "\n")
    result = run_script("llama/llama.py", *tiny, "--prompts", prompts)
    ends_with_one_error_line(result, "Llama 2's chat format needs the roles")


@pytest.mark.parametrize(
    "line", ['{"prompt": "a \\ud800 b"}', "[" * 100_000, '{"prompt": "ok"}']
)
def test_a_jsonl_line_that_no_tokenizer_can_take_is_one_line(line, tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "call me"}\n' + line + "\n")
    result = run_script("llama/llama.py", *tiny, "--prompts", prompts)
    if line == '{"prompt": "ok"}':  # the well-formed case still runs
        assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    else:
        ends_with_one_error_line(result, "line 2 is not")


def test_messages_without_a_chat_format_get_advice_that_applies(tiny, tmp_path):
    folder = word_tokenizer(tmp_path / "tok", {})
    prompts = tmp_path / "p.jsonl"
    line = {"messages": [{"role": "user", "content": "t5"}]}
    prompts.write_text(json.dumps(line) + "\n")
    result = run_script("llama/llama.py", tiny[0], folder, "--prompts", prompts)
    ends_with_one_error_line(result, "no known chat format")
    assert "without --chat" not in result.stderr


def test_ctrl_c_during_prompts_says_how_many_replies_were_written(tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("call me\n" * 40)
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, SCRIPT, *tiny, "--prompts", prompts]
            + ["--batch-size", "1", "--max-tokens", "300"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        wait_for(err, "1/40 prompts", process)
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    last = err.read_text().strip().splitlines()[-1]
    written = len(stdout.splitlines())
    assert process.returncode == 130 and "Traceback" not in err.read_text()
    assert (
        last == f"interrupted after {written} of 40 replies (JSON lines) were written"
    )


def quantized_weights(scale):
    """Weights of ARGS quantized to 4 bits in groups of 32, one scale set to `scale`."""
    model, quantize = (
        import_example("llama", "model"),
        import_example("llama", "quantize"),
    )
    llama = model.Llama(model.ModelArgs(**ARGS))
    llama.load_weights(list(random_weights(ARGS).items()))
    weights = dict(tree_flatten(quantize.quantize(llama, 32, 4).parameters()))
    weights["layers.0.attention.wq.scales"][3, 0] = scale
    return weights


@pytest.mark.parametrize("kind", ["nan weight", "nan scale", "huge scale"])
def test_non_finite_weights_are_refused_naming_the_array(kind, tmp_path):
    config = stored_config()
    if kind == "nan weight":
        weights = random_weights(ARGS)
        weights["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")
        name = "layers.1.feed_forward.w2.weight"
    else:
        weights = quantized_weights(float("nan") if kind == "nan scale" else 1e30)
        config["quantization"] = {"group_size": 32, "bits": 4}
        name = "layers.0.attention.wq.scales"
    path = save_with_config(tmp_path / "w.safetensors", config, weights)
    model = import_example("llama", "model")
    with pytest.raises(model.WeightsError, match=f"{name} holds"):
        model.load_model(path)


def test_meta_params_with_multiple_of_zero_are_refused_naming_it(tmp_path):
    convert = import_example("llama", "convert")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 0}
    with pytest.raises(ValueError, match="multiple_of must be a whole number"):
        convert.meta_args(params, vocab_size=320)


def test_files_written_get_the_users_umask_002(tmp_path):
    convert, model = (
        import_example("llama", "convert"),
        import_example("llama", "model"),
    )
    previous = os.umask(0o002)
    try:
        output = tmp_path / "w.safetensors"
        convert.save(model.ModelArgs(**ARGS), random_weights(ARGS), output)
    finally:
        os.umask(previous)
    assert output.stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize(
    "name, message",
    [
        ("w.safetensors", "is one weights file"),
        ("params.json", "is Meta's configuration"),
    ],
)
def test_convert_says_what_an_existing_file_is(name, message, tmp_path):
    (tmp_path / name).write_bytes(b"{}")
    result = run_script("llama/convert.py", tmp_path / name, tmp_path / "out.npz")
    ends_with_one_error_line(result, message)
    assert "does not exist" not in result.stderr


def test_llama_py_refuses_a_damaged_gguf_in_one_line(tiny, tmp_path):
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    result = run_script("llama/llama.py", tmp_path / "w.gguf", tiny[1], "call me")
    ends_with_one_error_line(result, "cannot read")
    assert "order" not in result.stderr


def test_main_py_output_to_a_closed_pipe_or_a_full_disk(tmp_path):
    closed = subprocess.run(
        f"{sys.executable} {ROOT / 'llama' / 'main.py'} | head -c1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(closed.stdout) == 1 and "Traceback" not in closed.stderr
    assert "Exception ignored" not in closed.stderr, closed.stderr
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, ROOT / "llama" / "main.py"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    one_line_error(result, "No space left on device")
