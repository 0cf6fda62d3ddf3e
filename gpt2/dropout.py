"""Dropout whose random mask is drawn inside one CUDA kernel.

Dropout keeps each element independently with probability 1 - p and scales it by 1 / (1
- p), so that its expected value is unchanged; the rest become 0. MLX's nn.Dropout draws
the mask with mx.random.bernoulli: on the CUDA backend that is several kernels that
write the random bits, the uniform numbers and the mask to memory, and the mask is kept
for the backward pass.

Here one kernel reads x, hashes each element's index with Philox4x32-10 (the
counter-based generator of Random123, which PyTorch's CUDA dropout also uses) and writes
x * mask / (1 - p). Nothing is kept for the backward pass: the gradient of dropout is
dropout of the gradient with the same mask, so the backward pass runs the same kernel on
the incoming gradient with the same key, which redraws the same mask. At nanoGPT's size
on an H100 this saved 0.6 ms of a 14 ms training step (benchmark.py --ablation); most of
what dropout cost there was elsewhere: attention written out in full so that its
probabilities can be dropped, which attention_dropout.py makes one pass each way.

The key (four uint32) comes from mx.random, so the masks follow mx.random.seed and a
compiled training step that lists mx.random.state among its inputs and outputs draws new
masks every step, as nn.Dropout does. On the CPU and on Apple GPUs this module is
nn.Dropout. attention_dropout.use_dropout_kernels puts it in the place of the model's
nn.Dropout modules on an NVIDIA GPU.
"""

import mlx.core as mx
import mlx.nn as nn

PHILOX = """
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): ten rounds of two 32x32->64-bit multiplications, mixing a 128-bit counter
// under a 64-bit key.
__device__ inline uint4 philox4x32_10(uint4 c, uint2 k) {
  #pragma unroll
  for (int round = 0; round < 10; ++round) {
    unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;  // the Weyl sequence that bumps the key each round
    k.y += 0xBB67AE85u;
  }
  return c;
}
"""

# Thread t draws four 32-bit numbers, for elements 4t .. 4t+3: Philox of the counter (t,
# key[2], key[3], 0) under the key (key[0], key[1]). The key is four integers from
# mx.random (~24 random bits each: MLX makes them from uniform floats). An element is
# kept when its number's top 24 bits are below KEEP = (1 - p) * 2^24, so with
# probability KEEP / 2^24; the kept ones are scaled by its inverse.
SOURCE = """
  const unsigned long long t = cg::this_grid().thread_rank();
  const unsigned long long n = x_shape[0];
  const unsigned long long i = 4 * t;
  if (i >= n) return;
  const uint4 counter =
      make_uint4((unsigned)t, (unsigned)(t >> 32) ^ key[2], key[3], 0u);
  const uint4 r = philox4x32_10(counter, make_uint2(key[0], key[1]));
  const unsigned bits[4] = {r.x, r.y, r.z, r.w};
  const float scale = 16777216.0f / KEEP;
  #pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (i + j < n) {
      const bool keep = (bits[j] >> 8) < (unsigned)KEEP;
      out[i + j] = keep ? static_cast<T>(static_cast<float>(x[i + j]) * scale)
                        : static_cast<T>(0.0f);
    }
  }
"""

_kernel = None


def masked(x, key, keep):
    """x * mask / (keep / 2^24), the mask drawn from `key` (4 uint32); keep is the kept
    fraction in 2^-24."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="philox_dropout",
            input_names=["x", "key"],
            output_names=["out"],
            header=PHILOX,
            source=SOURCE,
        )
    flat = x.reshape(-1)
    (out,) = _kernel(
        inputs=[flat, key],
        template=[("T", x.dtype), ("KEEP", keep)],
        grid=((flat.size + 3) // 4, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[flat.shape],
        output_dtypes=[x.dtype],
    )
    return out.reshape(x.shape)


def on_cuda():
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def draw_key():
    """A kernel's key: four uint32 from mx.random's state, so masks follow
    mx.random.seed."""
    return mx.random.randint(0, 2**31 - 1, (4,)).astype(mx.uint32)


class Dropout(nn.Dropout):
    """nn.Dropout(p); on an NVIDIA GPU, one Philox kernel forward and one backward
    instead of its mx.random.bernoulli mask (elsewhere, or with .kernel False,
    nn.Dropout itself)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)  # checks p and keeps 1 - p as _p_1
        # False: nn.Dropout's mx.random.bernoulli on CUDA too (benchmark.py --ablation)
        self.kernel = True

        @mx.custom_function
        def dropout(x, key):
            return masked(x, key, self.keep)

        @dropout.vjp
        def dropout_vjp(primals, cotangent, output):
            _, key = primals
            return masked(cotangent, key, self.keep), mx.zeros_like(
                key
            )  # the same mask on the gradient

        self._dropout = dropout

    @property
    def keep(self):
        """The kept fraction 1 - p in units of 2^-24: the kernel's threshold."""
        return round(self._p_1 * 2**24)

    def uses_kernel(self):
        """Training with p > 0 on an NVIDIA GPU, .kernel on: the Philox kernel runs, not
        nn.Dropout."""
        return self.kernel and self.training and self._p_1 < 1 and on_cuda()

    def __call__(self, x):
        if not self.uses_kernel():
            return super().__call__(x)
        return self._dropout(
            x, draw_key()
        )  # a fresh key from mx.random's state each call
