"""A decode (matrix-vector) kernel for MLX's 4- and 8-bit affine-quantized weights on CUDA GPUs.

    quantized_matmul(x, w, scales, biases, group_size=64, bits=4) -> y

computes y = x @ dequantize(w, scales, biases).T, the same as
mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits):

    x       (..., K)         float16, bfloat16 or float32: the activations
    w       (N, K * bits / 32) uint32: the packed weights, as mx.quantize returns them
    scales  (N, K / group_size) and biases (N, K / group_size), of x's dtype
    y       (..., N)         of x's dtype

It runs the kernel below when the default device is a CUDA GPU and x holds at most MAX_ROWS rows (a
decoding step is one row); everywhere else (CPU, Metal, prompts) it calls mx.quantized_matmul.
In a model: `use_kernel(model)` after nn.quantize (or loading) makes each nn.QuantizedLinear a
QuantizedLinear below, which calls quantized_matmul; nothing else changes.

MLX's affine quantization (mx.quantize): each row of the (N, K) weight is cut into groups of `group_size`
consecutive inputs; within a group w = scale * q + bias with q an unsigned `bits`-bit integer. The q are
packed along the input dimension, little end first: input k of a row sits in 32-bit word k * bits // 32,
at bits [bits * (k % (32 // bits)), ...). So one 16-byte load holds 32 (4-bit) or 16 (8-bit) consecutive
inputs of one row, all in one group (group_size >= 32).

Decoding reads every weight once per token, so the kernel is written for memory bandwidth:
- each block of WARPS warps owns R rows; its threads stride over the row in 16-byte vectors (thread t
  takes vectors t, t + 32 * WARPS, ...), so each warp load is 512 contiguous bytes;
- the weight vectors (and their scale and bias) of U strides are loaded before any is used, so every
  thread has U * R 16-byte loads in flight; weights bypass L1 (read once), x stays cached there;
- per vector, sum_k x_k * (scale * q_k + bias) = scale * sum_k x_k q_k + bias * sum_k x_k, so the inner
  loop is one fused multiply-add per weight (after a PRMT and an FADD unpack it), and sum_k x_k is
  shared by the R rows;
- the partial sums are reduced across the warp by shuffles and across warps through shared memory.
Accumulation is in float32 (MLX's own 4-bit kernel keeps per-thread sums in the input dtype).
The kernel reads 16 bytes at a time from the start of each row of x and w: MLX makes the inputs
row-contiguous (copying those that are not), and its allocations, and row slices of them, start aligned.
"""

import re

import mlx.core as mx
import mlx.nn as nn

MAX_ROWS = 4  # rows of x (tokens) up to which the kernel is used; more go to mx.quantized_matmul
# How the kernel is launched, (R, WARPS, U, P): R weight rows per block, WARPS warps per block, U strides of
# 16-byte loads issued before they are used, P = 1 to ask L2 to fetch 256 bytes per miss. The fastest of
# bench_quantized_matvec.py --sweep on an H100.
LAUNCH_VARIANTS = {4: (8, 4, 1, 0), 8: (8, 4, 1, 0)}


def launch_variant(bits):
    return LAUNCH_VARIANTS[bits]


HEADER = r"""
// A 16-byte load of packed weights that are read once: through the non-coherent path, not kept in L1;
// with P, L2 fetches the whole 256-byte block around a miss.
template <int P>
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  uint4 v;
  if constexpr (P) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  } else {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  }
  return v;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// n consecutive activations as floats, in one vector load (16 bytes for 8 halves).
template <typename T, int n>
struct alignas(sizeof(T) * n) Vector { T v[n]; };

template <int n, typename T>
__device__ __forceinline__ void load_x(const T* p, float* out) {
  Vector<T, n> vec = *reinterpret_cast<const Vector<T, n>*>(p);
#pragma unroll
  for (int i = 0; i < n; ++i) out[i] = to_float(vec.v[i]);
}

// The 32 / BITS integers of one packed word, as exact floats, in input order.
// __byte_perm(b, 0x4B000000, 0x7540 | k) is the bit pattern 0x4B0000bb, b's byte k under the
// exponent of 2^23: the float 2^23 + bb. Subtracting 2^23 leaves bb (one PRMT and one FADD per weight,
// where an int-to-float conversion would run at a quarter of the rate).
template <int BITS>
__device__ __forceinline__ void unpack(uint32_t word, float* q) {
  if constexpr (BITS == 4) {
    const uint32_t even = word & 0x0F0F0F0Fu;         // inputs 0, 2, 4, 6, one per byte
    const uint32_t odd = (word >> 4) & 0x0F0F0F0Fu;   // inputs 1, 3, 5, 7
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      q[2 * k] = __int_as_float(__byte_perm(even, 0x4B000000u, 0x7540u | k)) - 8388608.0f;
      q[2 * k + 1] = __int_as_float(__byte_perm(odd, 0x4B000000u, 0x7540u | k)) - 8388608.0f;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      q[k] = __int_as_float(__byte_perm(word, 0x4B000000u, 0x7540u | k)) - 8388608.0f;
    }
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}
"""

# The kernel body. MLX generates the signature (const T* x, const uint32_t* w, const Shape w_shape,
# const T* scales, const T* biases, T* y; w_shape because the body names it) and defines the template
# constants T, BITS, GS (group size), M (rows of x), R, WARPS, U and P before it; K and N are read from
# w_shape, so one compiled kernel serves every weight shape. Grid: N / R blocks of 32 * WARPS threads.
SOURCE = r"""
  constexpr int EPW = 32 / BITS;   // weights per 32-bit word
  constexpr int EPV = 4 * EPW;     // weights per 16-byte vector: 32 (4-bit) or 16 (8-bit)
  constexpr int TPB = 32 * WARPS;  // threads per block
  const int N = w_shape[0];        // output features (weight rows)
  const int NV = w_shape[1] / 4;   // 16-byte vectors per weight row
  const int K = NV * EPV;          // input features
  const int GPR = K / GS;          // groups (scales, biases) per weight row

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp_id = tid / 32;
  const int row0 = blockIdx.x * R;
  const uint4* w_rows = reinterpret_cast<const uint4*>(w) + (size_t)row0 * NV;
  const T* scale_rows = scales + (size_t)row0 * GPR;
  const T* bias_rows = biases + (size_t)row0 * GPR;

  float acc[M][R] = {};  // this thread's partial dot products, (x row, weight row)

  for (int i0 = 0; i0 * TPB < NV; i0 += U) {
    // Issue U strides of loads (vector v of each of the R rows) before using any of them.
    uint4 wv[U][R];
    float sv[U][R], bv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = (i0 + u) * TPB + tid;
      if (v < NV) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          wv[u][r] = load_weights<P>(w_rows + r * NV + v);
          sv[u][r] = to_float(scale_rows[r * GPR + v * EPV / GS]);
          bv[u][r] = to_float(bias_rows[r * GPR + v * EPV / GS]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = (i0 + u) * TPB + tid;
      if (v < NV) {
        float dot[M][R] = {};  // sum_k x_k q_k over this vector
        float x_total[M] = {};  // sum_k x_k over this vector
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float xf[M][EPW];
#pragma unroll
          for (int m = 0; m < M; ++m) {
            load_x<EPW>(x + m * K + v * EPV + j * EPW, xf[m]);
#pragma unroll
            for (int e = 0; e < EPW; ++e) x_total[m] += xf[m][e];
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float q[EPW];
            unpack<BITS>(word_of(wv[u][r], j), q);
#pragma unroll
            for (int m = 0; m < M; ++m) {
#pragma unroll
              for (int e = 0; e < EPW; ++e) dot[m][r] = fmaf(xf[m][e], q[e], dot[m][r]);
            }
          }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            acc[m][r] = fmaf(sv[u][r], dot[m][r], fmaf(bv[u][r], x_total[m], acc[m][r]));
          }
        }
      }
    }
  }

  // Sum over the warp's lanes, then over the block's warps.
  __shared__ float partial[WARPS][M * R];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = acc[m][r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0) partial[warp_id][m * R + r] = s;
    }
  }
  __syncthreads();
  if (tid < M * R) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) s += partial[k][tid];
    store(y + (size_t)(tid / R) * N + row0 + tid % R, s);
  }
"""

_kernel = None  # built on first use: mx.fast.cuda_kernel raises where there is no CUDA back-end


def _without_comments(code):
    # MLX hashes the whole source on every call to find the compiled kernel: send it without comments.
    return re.sub(r"[ \t]*//[^\n]*", "", code)


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="quantized_matvec",
            input_names=["x", "w", "scales", "biases"],
            output_names=["y"],
            source=_without_comments(SOURCE),
            header=_without_comments(HEADER),
        )
    return _kernel


def on_cuda():
    """True when the default device is a CUDA GPU (not the CPU, not Metal)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def kernel_applies(x, w, scales, biases, group_size, bits):
    """Whether quantized_matmul would run the CUDA kernel for these arguments (else MLX's own)."""
    if not on_cuda() or biases is None or bits not in (4, 8) or group_size not in (32, 64, 128):
        return False
    if x.dtype not in (mx.float16, mx.bfloat16, mx.float32) or w.dtype != mx.uint32 or w.ndim != 2:
        return False
    K, N = x.shape[-1], w.shape[0]
    if K == 0 or w.shape[1] * 32 != K * bits or K % group_size != 0:
        return False
    if scales.shape != (N, K // group_size) or biases.shape != scales.shape:
        return False
    if scales.dtype != x.dtype or biases.dtype != x.dtype:
        return False
    return 0 < x.size // K <= MAX_ROWS


def quantized_matvec(x, w, scales, biases, group_size, bits, variant=None):
    """The kernel itself, without checks: y = x @ dequantize(w).T for x of at most MAX_ROWS rows.
    variant: (R, WARPS, U, P) as in LAUNCH_VARIANTS, which gives the default."""
    R, warps, strides_in_flight, prefetch = variant or launch_variant(bits)
    K, N = x.shape[-1], w.shape[0]
    M = x.size // K
    R = max(1, R // M)  # registers hold M x R sums: fewer weight rows per block for more rows of x
    while N % R:  # the grid has N / R blocks
        R //= 2
    threads = 32 * warps
    return _get_kernel()(
        inputs=[x, w, scales, biases],
        template=[("T", x.dtype), ("BITS", bits), ("GS", group_size), ("M", M), ("R", R), ("WARPS", warps),
                  ("U", strides_in_flight), ("P", prefetch)],
        grid=(N // R * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[x.shape[:-1] + (N,)],
        output_dtypes=[x.dtype],
    )[0]


def quantized_matmul(x, w, scales, biases, group_size=64, bits=4):
    """x @ dequantize(w, scales, biases).T: the CUDA kernel where it applies, else mx.quantized_matmul."""
    if kernel_applies(x, w, scales, biases, group_size, bits):
        return quantized_matvec(x, w, scales, biases, group_size, bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose product goes through quantized_matmul: the CUDA kernel when decoding."""

    def __call__(self, x):
        if self.mode != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


def use_kernel(model):
    """Turn each nn.QuantizedLinear of `model` into a QuantizedLinear, parameters untouched (after nn.quantize
    or after loading a quantized model); returns the model."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
    return model
