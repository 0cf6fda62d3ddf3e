"""gpt2/: mixed-precision training (--dtype), dropout's statistics and kernels, and
the errors around them (resume in another dtype, non-finite loss, a diverging run)."""

import json
import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import example_modules, import_example, run_script
from mlx.utils import tree_flatten

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
) * 40
# 11 steps per epoch with these flags on TEXT
TINY_RUN = [
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
    "--max-tokens",
    "5",
]


@pytest.fixture(autouse=True)
def gpt2_on_the_path():
    """main.py imports its features (resume.py, distributed.py) when used, as
    `python gpt2/main.py` finds them beside it: the in-process runs here need gpt2/ on
    sys.path while they run."""
    with example_modules("gpt2"):
        yield


def dropout_masks(seed, shape=(512, 1024), p=0.2, calls=2):
    """The kept/dropped masks of `calls` successive calls of the model's dropout after
    mx.random.seed(seed).

    The model's Dropout is MLX's nn.Dropout on the CPU and on Apple GPUs, and its own
    Philox kernel on an NVIDIA GPU (the default device there), so on a CUDA machine
    these tests check the kernel."""
    mx.random.seed(seed)
    dropout = import_example("gpt2", "dropout").Dropout(p)
    dropout.train()
    outputs = [np.array(dropout(mx.ones(shape))) for _ in range(calls)]
    for out in outputs:  # kept elements are scaled by 1 / (1 - p), the rest are zero
        assert np.allclose(out[out != 0], 1 / (1 - p))
    return [out != 0 for out in outputs]


def test_dropout_keeps_each_element_with_probability_1_minus_p_independently():
    p = 0.2
    first, second = dropout_masks(seed=3, p=p)
    n = first.size
    sigma = np.sqrt(p * (1 - p) / n)
    assert (
        abs(first.mean() - (1 - p)) < 5 * sigma
    )  # the kept fraction, within 5 standard errors

    def correlation(a, b):
        return np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1]

    bound = 5 / np.sqrt(n)  # independent: |r| is about 1/sqrt(n)
    assert abs(correlation(first[:, 1:], first[:, :-1])) < bound  # neighbours in a row
    assert abs(correlation(first[1:], first[:-1])) < bound  # neighbours in a column
    assert abs(correlation(first, second)) < bound  # the next call (the next step)
    # Pairs of neighbours: the four (kept, kept) ... (dropped, dropped) counts against
    # independence, chi-square with 3 degrees of freedom; 21.1 is its 0.9999 quantile.
    a, b = first[:, 0::2].ravel(), first[:, 1::2].ravel()
    observed = np.array(
        [np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b)]
    )
    expected = len(a) * np.array([(1 - p) ** 2, (1 - p) * p, p * (1 - p), p * p])
    assert np.sum((observed - expected) ** 2 / expected) < 21.1


def test_dropout_masks_follow_the_seed():
    a, b = dropout_masks(seed=7, shape=(64, 64)), dropout_masks(seed=7, shape=(64, 64))
    c = dropout_masks(seed=8, shape=(64, 64))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_dropout_gradient_uses_the_forward_mask_inside_a_compiled_step():
    """The backward pass applies the forward pass's mask (the kernel keeps none: it
    redraws it), in a compiled step that carries mx.random.state as the training step
    does: every call a new mask."""
    p = 0.3
    dropout = import_example("gpt2", "dropout").Dropout(p)
    dropout.train()
    mx.random.seed(11)
    x = mx.random.uniform(
        1.0, 2.0, (64, 96)
    )  # no zeros: out == 0 exactly where dropped
    w = mx.random.normal((64, 96))

    def loss(x):
        out = dropout(x)
        return (out * w).sum(), out

    step = mx.compile(
        mx.value_and_grad(loss), inputs=mx.random.state, outputs=mx.random.state
    )
    masks = []
    for _ in range(2):
        (_, out), grad = step(x)
        kept = np.array(out) != 0
        # d/dx of sum(mask * x / (1 - p) * w) is mask * w / (1 - p)
        np.testing.assert_allclose(
            np.array(grad), kept * np.array(w) / (1 - p), rtol=1e-5, atol=1e-7
        )
        assert (
            abs(kept.mean() - (1 - p)) < 0.03
        )  # 6,144 elements: the standard error is 0.006
        masks.append(kept)
    assert not np.array_equal(masks[0], masks[1])  # the second call drew a new mask


ON_CUDA = mx.default_device() == mx.gpu and mx.cuda.is_available()


@pytest.mark.skipif(
    not ON_CUDA,
    reason="the kernels run on NVIDIA GPUs only; elsewhere both sides are one code",
)
@pytest.mark.parametrize(
    "T", [16, 100, 10]
)  # 10 is no multiple of 4: mx.softmax, then Dropout, on a GPU too
@pytest.mark.parametrize(
    "dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"]
)
def test_attention_dropout_kernel_equals_softmax_then_dropout_kernel(T, dtype):
    """attention_dropout.py's AttentionDropout (one kernel forward and one backward)
    gives what mx.softmax followed by dropout.py's Dropout kernel gives after the same
    seed: the same mask, and the same values and gradients within rounding."""
    AttentionDropout = import_example("gpt2", "attention_dropout").AttentionDropout
    Dropout = import_example("gpt2", "dropout").Dropout
    p = 0.2
    mx.random.seed(5)
    scores = (3 * mx.random.normal((2, 3, T, T))).astype(dtype)
    w = mx.random.normal((2, 3, T, T)).astype(dtype)
    causal = mx.triu(mx.full((T, T), -mx.inf, dtype=dtype), k=1)
    fused, dropout = AttentionDropout(p), Dropout(p)
    fused.train()
    dropout.train()

    def run(f):
        mx.random.seed(9)

        def loss(s):
            out = f(s)
            return (out * w).astype(mx.float32).sum(), out

        (_, out), grad = mx.value_and_grad(loss)(scores)
        return np.array(out.astype(mx.float32)), np.array(grad.astype(mx.float32))

    out, grad = run(fused)
    ref_out, ref_grad = run(
        lambda s: dropout(mx.softmax(s + causal, axis=-1, precise=True))
    )
    kept, lower = out != 0, np.tril(np.ones((T, T), dtype=bool))
    assert np.array_equal(kept, ref_out != 0)
    assert (
        not kept[..., ~lower].any() and 0.5 < kept[..., lower].mean() < 0.95
    )  # causal; about 1 - p kept
    # float32: rounding of a float32 softmax; bfloat16: one or two roundings to 8 bits
    # (2^-7 = 0.0078)
    atol = 1e-6 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=atol)
    np.testing.assert_allclose(
        grad,
        ref_grad,
        rtol=0,
        atol=(1e-5 if dtype == mx.float32 else 3e-2) * np.abs(ref_grad).max(),
    )


def test_attention_dropout_takes_the_kernel_only_where_it_fits(monkeypatch):
    """The kernel's rows are query positions of square (B, n_head, T, T) scores, four
    columns per Philox call, one warp's registers per row: anything else takes
    mx.softmax and Dropout (checked as if on CUDA)."""
    attention_dropout = import_example("gpt2", "attention_dropout")
    monkeypatch.setattr(import_example("gpt2", "dropout"), "on_cuda", lambda: True)
    fused = attention_dropout.AttentionDropout(0.1)
    fused.train()
    fits = lambda *shape: fused.fits_the_kernel(mx.zeros(shape))  # noqa: E731
    assert fits(2, 3, 16, 16) and fits(1, 1, 4, 4) and fits(1, 2, 1024, 1024)
    assert not fits(2, 3, 10, 10)  # no multiple of 4
    assert not fits(1, 1, 2048, 2048)  # longer than MAX_T
    assert not fits(3, 16, 16) and not fits(2, 3, 8, 16)  # not (B, n_head, T, T)
    fused.eval()
    assert not fits(2, 3, 16, 16)  # no dropout outside training
    fused.train()
    fused.fused = False
    assert not fits(2, 3, 16, 16)  # benchmark.py --ablation's two-step way


def test_dropout_kernels_replace_every_dropout_and_compute_the_same_off_cuda():
    """attention_dropout.use_dropout_kernels swaps each of the model's dropouts for its
    kernel class, with the same p and mode; off an NVIDIA GPU the kernel classes fall
    back to what the model's own modules compute."""
    import mlx.nn as nn

    kernels = import_example("gpt2", "attention_dropout")
    Dropout, AttentionDropout = kernels.Dropout, kernels.AttentionDropout
    model = tiny_model(dropout=0.2)
    x = mx.array(np.random.default_rng(0).integers(0, 40, (2, 16)))
    mx.random.seed(3)
    expected = model(x)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert (
        len(names) == 1 + 3 * 2
    )  # the embedding's, and per block: attention probabilities, residual, MLP
    kernels.use_dropout_kernels(model)
    swapped = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Dropout)
    }
    assert sorted(swapped) == sorted(names)
    for name, m in swapped.items():
        assert type(m) is (
            AttentionDropout if name.endswith("attn_dropout") else Dropout
        ), name
        assert m._p_1 == 0.8 and m.training, name
    if not ON_CUDA:
        mx.random.seed(3)
        assert mx.array_equal(
            model(x), expected
        )  # the same masks from the same seed, the same values
    kernels.use_dropout_kernels(model)  # a second call changes nothing
    assert {name: type(m) for name, m in model.named_modules() if name in swapped} == {
        name: type(m) for name, m in swapped.items()
    }
    evaluating = kernels.use_dropout_kernels(tiny_model(dropout=0.2).eval())
    assert all(
        not m.training
        for _, m in evaluating.named_modules()
        if isinstance(m, nn.Dropout)
    )


def tiny_model(dropout=0.0):
    model_module = import_example("gpt2", "model")
    mx.random.seed(0)
    model = model_module.GPT(
        model_module.GPTConfig(
            vocab_size=40,
            block_size=16,
            n_layer=2,
            n_head=2,
            n_embd=32,
            dropout=dropout,
        )
    )
    model.train()
    return model


def batch():
    rng = np.random.default_rng(0)
    return mx.array(rng.integers(0, 40, (4, 16))), mx.array(
        rng.integers(0, 40, (4, 16))
    )


def train(dtype, steps):
    """`steps` steps of main.py's training step on one batch."""
    main = import_example("gpt2", "main")
    model, optimizer = tiny_model(), optim.AdamW(learning_rate=1e-3)
    step, state = main.make_train_step(model, optimizer, dtype, grad_clip=1.0)
    x, y = batch()
    losses = []
    for _ in range(steps):
        losses.append(step(x, y).item())
    mx.eval(state)
    return model, optimizer, losses


def test_bfloat16_steps_keep_float32_master_weights_and_follow_float32():
    _, _, reference_losses = train(mx.float32, 5)
    model, optimizer, losses = train(mx.bfloat16, 5)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    assert all(
        v.dtype == mx.float32
        for k, v in tree_flatten(optimizer.state)
        if k.endswith((".m", ".v"))
    )
    # The same five steps on one batch: the loss falls alike (bfloat16 keeps 8 bits of
    # mantissa).
    assert reference_losses[-1] < reference_losses[0] - 0.05
    assert np.allclose(losses, reference_losses, atol=0.02), (losses, reference_losses)


def test_resume_in_another_dtype_continues_from_the_float32_checkpoint_and_says_so(
    tmp_path,
):
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["--data", tmp_path / "text.txt", "--out", tmp_path, *TINY_RUN]
    first = run_script(
        "gpt2/main.py", *common, "--dtype", "bfloat16", "--max-steps", "3"
    )
    assert first.returncode == 0, first.stderr
    checkpoint = {
        k: v
        for k, v in mx.load(str(tmp_path / "checkpoint.safetensors")).items()
        if k.startswith("model.")
    }
    assert checkpoint and all(
        v.dtype == mx.float32 for v in checkpoint.values()
    )  # master weights, not bfloat16
    second = run_script(
        "gpt2/main.py", *common, "--dtype", "float32", "--max-steps", "5", "--resume"
    )
    assert second.returncode == 0, second.stderr
    assert "at step 3 (trained in bfloat16, continuing in float32)" in second.stdout
    assert "Trained 2 steps" in second.stdout


def checkpoint_meta(path):
    return json.loads(bytes(memoryview(mx.load(str(path))["meta"])).decode())


def test_non_finite_loss_stops_with_the_step_number_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    main = import_example("gpt2", "main")
    (tmp_path / "text.txt").write_text(TEXT)
    real = main.make_train_step

    def breaks_at_step_15(
        *args, **kwargs
    ):  # a step whose loss is nan, as a diverging run would give
        step, state = real(*args, **kwargs)
        calls = []

        def train_step(x, y):
            calls.append(1)
            loss = step(x, y)
            return loss * float("nan") if len(calls) >= 15 else loss

        return train_step, state

    monkeypatch.setattr(main, "make_train_step", breaks_at_step_15)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "main.py",
            "--data",
            str(tmp_path / "text.txt"),
            "--out",
            str(tmp_path),
            *TINY_RUN,
            "--epochs",
            "3",
        ],
    )
    with pytest.raises(SystemExit) as stop:
        main.main()
    message = str(stop.value.code)
    assert message.startswith("error: the training loss diverged (nan) at step 15:")
    checkpoint = tmp_path / "checkpoint.safetensors"
    assert f"the last good checkpoint, {checkpoint} (step 11), is whole" in message
    # The end of epoch 1; nothing from the failing epoch was saved.
    assert checkpoint_meta(checkpoint)["step"] == 11
    assert not (tmp_path / "completions.txt").exists()


@pytest.mark.parametrize(
    "bad_step, kept", [(11, None), (22, 11)]
)  # an epoch's last step: 11 steps per epoch
def test_a_weight_that_becomes_nan_is_never_saved_and_the_last_good_checkpoint_is_named(
    tmp_path, monkeypatch, bad_step, kept
):
    main = import_example("gpt2", "main")
    (tmp_path / "text.txt").write_text(TEXT)
    real = main.make_train_step

    def update_breaks_a_weight(
        model, *args, **kwargs
    ):  # as --lr 1e30 would; the step's loss is still finite
        step, state = real(model, *args, **kwargs)
        calls = []

        def train_step(x, y):
            calls.append(1)
            loss = step(x, y)
            if len(calls) == bad_step:
                model.ln_f.weight = model.ln_f.weight * float("nan")
            return loss

        return train_step, state

    monkeypatch.setattr(main, "make_train_step", update_breaks_a_weight)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "main.py",
            "--data",
            str(tmp_path / "text.txt"),
            "--out",
            str(tmp_path),
            *TINY_RUN,
            "--epochs",
            "3",
        ],
    )
    with pytest.raises(SystemExit) as stop:
        main.main()
    message = str(stop.value.code)
    assert message.startswith(
        f"error: a weight became inf or nan at step {bad_step}: stopped, and "
    ), message
    checkpoint = tmp_path / "checkpoint.safetensors"
    if kept is None:
        assert "no checkpoint was written" in message and not checkpoint.exists()
    else:
        assert f"the last good checkpoint, {checkpoint} (step {kept})" in message
        weights = mx.load(str(checkpoint))
        assert checkpoint_meta(checkpoint)["step"] == kept
        assert all(mx.isfinite(w).all().item() for w in weights.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["text.txt"] + (["checkpoint.safetensors"] if kept else [])
    )


def test_nanogpt_reference_refuses_what_it_cannot_run_in_one_line(tmp_path):
    import torch

    result = run_script("gpt2/nanogpt_reference.py", "--data", tmp_path / "missing.txt")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = "does not exist" if torch.cuda.is_available() else "needs a CUDA GPU"
    assert result.stderr.startswith("error: ") and expected in result.stderr


def test_benchmark_ablation_times_each_variant_of_the_step_and_says_so_as_it_goes():
    benchmark = import_example("gpt2", "benchmark")
    result = run_script(
        "gpt2/benchmark.py",
        "--ablation",
        "--tiny",
        "--config",
        "walkthrough",
        "--steps",
        "1",
        "--repeats",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert (
        "Timing dropout's ablation on cpu" in result.stderr
    )  # at once, then each variant as it goes
    assert (
        "main.py's model: warm-up (compiles)..." in result.stderr
        and "main.py's model: warm-up " in result.stderr
    )
    rows = [
        line for line in result.stdout.splitlines() if line.rstrip().endswith(" ms")
    ]
    assert [row.rsplit(None, 3)[0].strip() for row in rows] == list(
        benchmark.ABLATIONS
    ), result.stdout
    assert rows[0].split()[-2] == "+0.00"  # the first row is the reference
