"""Attention probabilities with dropout: the causal softmax and the dropout in one CUDA
kernel.

In training, GPT-2 drops some of the attention probabilities:

    P = softmax(S + causal mask)   S: scores Q K^T / sqrt(head_dim), (B, n_head, T, T)
    P_d = P * Z / (1 - p)          Z: keep each element with probability 1 - p

MLX's fused attention (mx.fast.scaled_dot_product_attention) has no dropout, so the
model writes these (B, n_head, T, T) matrices out. Done with mx.softmax and dropout.py's
Dropout, that is several passes over them, forward and backward. Here one kernel reads S
and writes P_d, and one kernel makes the backward pass:

    dP = dP_d * Z / (1 - p),   dS = P * (dP - rowsum(P * dP))   (the softmax's gradient)

reading S and dP_d and writing dS. P is recomputed from S (which autograd keeps anyway)
and Z is redrawn from the key, so nothing else is stored. Z is exactly the mask
dropout.py's kernel draws for the same key over P's flat elements, so the two ways give
the same result; tests/test_gpt2_precision.py checks that on a GPU. On the CPU and on
Apple GPUs this is model.py's AttentionDropout: causal_softmax, then nn.Dropout.
use_dropout_kernels() at the end puts the kernel classes in the model's place on an
NVIDIA GPU (main.py calls it), from outside the model.
"""

import mlx.core as mx
import mlx.nn as nn
import model
from dropout import PHILOX, Dropout, draw_key
from model import causal_softmax

HEADER = (
    PHILOX
    + """
#define NEG_INF (-__int_as_float(0x7f800000))
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
"""
)

# Both kernels start here. One warp (32 threads) per row of TT scores: lane l holds the
# columns 128 g + 4 l + c (c < 4) in registers, so its four consecutive columns are one
# Philox call, the one dropout.py's thread (flat index) / 4 makes. Row r is query
# position r % TT: columns above it are masked. It leaves the row's probabilities in
# p[][] (0 where masked) and the kept/dropped mask in z[][].
ROW_SOFTMAX_AND_MASK = """
  constexpr int G = (TT + 127) / 128;
  const int lane = threadIdx.x % 32;
  const unsigned long long row =
      (unsigned long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  // the whole warp returns
  if (row >= (unsigned long long)s_shape[0] * s_shape[1] * s_shape[2]) return;
  const int i = row % TT;
  const float inv_keep = 16777216.0f / KEEP;
  float p[G][4];
  bool z[G][4];
  float m = NEG_INF;
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    #pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = 128 * g + 4 * lane + c;
      p[g][c] = (j <= i) ? static_cast<float>(s[row * TT + j]) : NEG_INF;
      m = fmaxf(m, p[g][c]);
    }
  }
  m = warp_max(m);  // the row's largest score, subtracted before exp (as mx.softmax)
  float total = 0.0f;
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    #pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = 128 * g + 4 * lane + c;
      p[g][c] = (j <= i) ? __expf(p[g][c] - m) : 0.0f;
      total += p[g][c];
    }
  }
  // the sum in float32, as mx.softmax(precise=True)
  const float inv_total = 1.0f / warp_sum(total);
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    const unsigned long long t = (row * TT + 128 * g + 4 * lane) / 4;
    const uint4 r = philox4x32_10(
        make_uint4((unsigned)t, (unsigned)(t >> 32) ^ key[2], key[3], 0u),
        make_uint2(key[0], key[1]));
    const unsigned bits[4] = {r.x, r.y, r.z, r.w};
    #pragma unroll
    for (int c = 0; c < 4; ++c) {
      p[g][c] *= inv_total;
      z[g][c] = (bits[c] >> 8) < (unsigned)KEEP;
    }
  }
"""

FORWARD = (
    ROW_SOFTMAX_AND_MASK
    + """
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    #pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = 128 * g + 4 * lane + c;
      if (j < TT)
        out[row * TT + j] = static_cast<T>(z[g][c] ? p[g][c] * inv_keep : 0.0f);
    }
  }
"""
)

BACKWARD = (
    ROW_SOFTMAX_AND_MASK
    + """
  float dp[G][4];
  float dot = 0.0f;  // rowsum(P * dP)
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    #pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = 128 * g + 4 * lane + c;
      dp[g][c] = (j < TT && z[g][c])
          ? static_cast<float>(grad[row * TT + j]) * inv_keep
          : 0.0f;
      dot += p[g][c] * dp[g][c];
    }
  }
  dot = warp_sum(dot);
  #pragma unroll
  for (int g = 0; g < G; ++g) {
    #pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = 128 * g + 4 * lane + c;
      if (j < TT) out[row * TT + j] = static_cast<T>(p[g][c] * (dp[g][c] - dot));
    }
  }
"""
)

# a row lives in one warp's registers (T / 32 floats per thread, three times in the
# backward)
MAX_T = 1024
_kernels = {}


def run_kernel(name, source, inputs, keep):
    """Launch `source` with one warp per row of inputs["s"] (..., T, T); returns its
    (..., T, T) output."""
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(
            name=name,
            input_names=list(inputs),
            output_names=["out"],
            header=HEADER,
            source=source,
        )
    s = inputs["s"]
    rows, warps_per_block = s.size // s.shape[-1], 4
    (out,) = _kernels[name](
        inputs=list(inputs.values()),
        template=[("T", s.dtype), ("TT", s.shape[-1]), ("KEEP", keep)],
        grid=(rows * 32, 1, 1),
        threadgroup=(32 * warps_per_block, 1, 1),
        output_shapes=[s.shape],
        output_dtypes=[s.dtype],
    )
    return out


class AttentionDropout(Dropout):
    """dropout(softmax(scores + causal mask)) over the last axis of (B, n_head, T, T)
    scores.

    Where fits_the_kernel: the two kernels above. Otherwise model.causal_softmax and
    then Dropout (in eval mode: the softmax alone)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        # False: mx.softmax, then dropout.py's kernel (benchmark.py --ablation)
        self.fused = True

        @mx.custom_function
        def softmax_dropout(scores, key):
            return run_kernel(
                "causal_softmax_dropout", FORWARD, {"s": scores, "key": key}, self.keep
            )

        @softmax_dropout.vjp
        def softmax_dropout_vjp(primals, cotangent, output):
            scores, key = primals
            return (
                run_kernel(
                    "causal_softmax_dropout_grad",
                    BACKWARD,
                    {"s": scores, "grad": cotangent, "key": key},
                    self.keep,
                ),
                mx.zeros_like(key),
            )

        self._softmax_dropout = softmax_dropout

    def fits_the_kernel(self, scores):
        """Where Dropout would run its kernel, for scores (B, n_head, T, T) with T a
        multiple of 4 (one Philox call per 4 columns) and at most MAX_T."""
        T = scores.shape[-1]
        return (
            self.fused
            and self.uses_kernel()
            and scores.ndim == 4
            and scores.shape[-2] == T
            and T % 4 == 0
            and T <= MAX_T
        )

    def __call__(self, scores):
        if self.fits_the_kernel(scores):
            return self._softmax_dropout(
                scores, draw_key()
            )  # the key Dropout would draw: the same mask
        return super().__call__(causal_softmax(scores))


def use_dropout_kernels(gpt):
    """Swap every dropout of `gpt` for its kernel class, with the same p and mode: each
    nn.Dropout for dropout.py's Dropout, each model.AttentionDropout for the one above.
    Measured on an H100 at nanoGPT's size (benchmark.py --ablation): 13% of the training
    step. On the CPU and on Apple GPUs the swapped modules compute what the model's do.
    """
    kernel_class = {nn.Dropout: Dropout, model.AttentionDropout: AttentionDropout}
    for _, module in gpt.named_modules():
        for name, child in list(module.items()):
            if type(child) in kernel_class:
                p = 1 - child._p_1  # nn.Dropout keeps 1 - p as _p_1
                module[name] = kernel_class[type(child)](p)
                module[name].train(child.training)
    return gpt
