"""llama/quantized_matvec.py: the CUDA decode kernel for 4- and 8-bit weights agrees with
mx.quantized_matmul and with float32 math on the dequantized weights; off CUDA it is MLX's own call."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from helpers import import_example

qmv = import_example("llama", "quantized_matvec")

ON_CUDA = qmv.on_cuda()
needs_cuda = pytest.mark.skipif(
    not ON_CUDA, reason="the kernel runs only on a CUDA GPU; elsewhere quantized_matmul is mx.quantized_matmul")

# Largest |difference| allowed, as a fraction of the largest |output|: float32 differs from the float32
# reference only in summation order; float16 and bfloat16 also round the output (2^-11, 2^-8), and MLX's
# own 4-bit kernel sums float16 products in float16, so the comparison with it is looser.
TOL_REFERENCE = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}
TOL_MLX = {mx.float32: 1e-5, mx.float16: 4e-3, mx.bfloat16: 1.6e-2}


def quantized(N, K, group_size, bits, dtype, seed=0):
    """Random (N, K) weights, quantized: (w, scales, biases) as mx.quantize returns them."""
    w = mx.random.normal((N, K), key=mx.random.key(seed)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


def relative_error(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def test_off_cuda_it_is_mlx_quantized_matmul():
    with mx.stream(mx.cpu):  # on any machine, a CPU array: the kernel does not apply
        w, scales, biases = quantized(24, 128, 64, 4, mx.float32)
        x = mx.random.normal((1, 128), key=mx.random.key(1))
        expected = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4)
        got = qmv.quantized_matmul(x, w, scales, biases, group_size=64, bits=4)
        assert mx.array_equal(got, expected).item()


def test_kernel_applies_only_to_what_it_supports(monkeypatch):
    monkeypatch.setattr(qmv, "on_cuda", lambda: True)  # the checks on the arguments, on any machine
    w, scales, biases = quantized(16, 256, 64, 4, mx.float16)
    x = mx.zeros((1, 1, 256), mx.float16)
    assert qmv.kernel_applies(x, w, scales, biases, 64, 4)
    assert qmv.kernel_applies(mx.zeros((qmv.MAX_ROWS, 256), mx.float16), w, scales, biases, 64, 4)
    assert not qmv.kernel_applies(mx.zeros((qmv.MAX_ROWS + 1, 256), mx.float16), w, scales, biases, 64, 4)
    assert not qmv.kernel_applies(x, w, scales, biases, 64, 8)  # bits that do not match the packing
    assert not qmv.kernel_applies(x, w, scales, biases, 32, 4)  # group size that does not match the scales
    assert not qmv.kernel_applies(x, w, scales, None, 64, 4)
    assert not qmv.kernel_applies(x.astype(mx.float32), w, scales, biases, 64, 4)  # scales of another dtype
    assert not qmv.kernel_applies(mx.zeros((1, 128), mx.float16), w, scales, biases, 64, 4)
    monkeypatch.setattr(qmv, "on_cuda", lambda: False)
    assert not qmv.kernel_applies(x, w, scales, biases, 64, 4)


def test_use_kernel_keeps_a_quantized_model_s_outputs():
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64, bias=False))
    nn.quantize(model, group_size=64, bits=4)
    x = mx.random.normal((1, 1, 256))
    expected = model(x)
    qmv.use_kernel(model)
    assert all(type(layer) is qmv.QuantizedLinear for layer in model.layers)
    assert relative_error(model(x), expected) <= TOL_REFERENCE[mx.float32]


# (N, K, leading shape of x): a 4096-wide row, N not a multiple of the rows per block, K not a multiple
# of a stride (128 threads x 16 bytes), the w2 shape of Llama 7B (K = 11008), and 2 to 4 rows of x.
SHAPES = [(256, 4096, (1,)), (301, 1152, (1, 1)), (64, 11008, (1,)), (40, 640, (3,)), (24, 384, (2, 2))]


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("N,K,lead", SHAPES)
def test_kernel_matches_mlx_float16(bits, group_size, N, K, lead):
    check(bits, group_size, N, K, lead, mx.float16)


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("N,K,lead", [SHAPES[0], SHAPES[1], SHAPES[3]])
def test_kernel_matches_mlx_other_dtypes(bits, dtype, N, K, lead):
    check(bits, 64, N, K, lead, dtype)


def check(bits, group_size, N, K, lead, dtype):
    w, scales, biases = quantized(N, K, group_size, bits, dtype)
    x = mx.random.normal(lead + (K,), key=mx.random.key(1)).astype(dtype)
    assert qmv.kernel_applies(x, w, scales, biases, group_size, bits)
    got = qmv.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    mlx = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    dequantized = mx.dequantize(w.astype(mx.uint32), scales.astype(mx.float32), biases.astype(mx.float32),
                                group_size=group_size, bits=bits)
    reference = x.astype(mx.float32) @ dequantized.T
    assert got.shape == lead + (N,) and got.dtype == dtype
    assert relative_error(got, reference) <= TOL_REFERENCE[dtype]
    assert relative_error(got, mlx) <= TOL_MLX[dtype]
