"""Time one token through each weight shape of Llama 7B with quantized weights: MLX's own
mx.quantized_matmul against the CUDA kernel of quantized_matvec.py, in GB/s of quantized bytes read
(packed weights + scales + biases), and the decoding speed those times allow.

    python llama/bench_quantized_matvec.py                  # 4- and 8-bit, group size 64, float16
    python llama/bench_quantized_matvec.py --sweep          # also the kernel's launch variants

Each shape is timed over enough different matrices (--working-set MB) that none stays in the GPU's
50 MB L2 cache between calls; a call's time is the median over --repeats of one mx.eval of products
with every matrix (4 passes), divided by their number, so MLX's per-operation overhead is included as it is in a
model. The tokens/s estimate adds up the matrix products of a token (32 layers of wq, wk, wv, wo, w1,
w3, w2, and the output layer): an upper bound, as attention, norms and sampling are left out.
"""

import argparse
import statistics
import sys
import time

import mlx.core as mx

import quantized_matvec

# Llama 7B: (name, N = output features, K = input features, matrices per token)
SHAPES = [("wq, wk, wv, wo", 4096, 4096, 4 * 32), ("w1, w3", 11008, 4096, 2 * 32),
          ("w2", 4096, 11008, 32), ("output", 32000, 4096, 1)]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
PASSES = 4  # passes over the matrices in one mx.eval, so its fixed cost is spread over more calls
VARIANTS = [(1, 4, 2), (2, 4, 2), (4, 4, 1), (2, 8, 1), (4, 2, 2), (2, 2, 4), (1, 8, 1)]  # (R, WARPS, U)


def median_seconds(fn, repeats):
    fn()  # warm-up (and the kernel's compilation)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), min(times), max(times)


def random_quantized(N, K, group_size, bits, dtype, count):
    """`count` different random quantized (N, K) matrices: random packed bits, plausible scales."""
    mats = []
    for _ in range(count):
        w = mx.random.randint(0, 2**31 - 1, (N, K * bits // 32)).astype(mx.uint32)
        scales = (mx.random.uniform(shape=(N, K // group_size)) * 0.01).astype(dtype)
        biases = (mx.random.uniform(shape=(N, K // group_size)) * -0.1).astype(dtype)
        mats.append((w, scales, biases))
    mx.eval(mats)
    return mats


def copy_bandwidth(repeats):
    """Bytes per second read plus written by MLX copying 1 GiB on the device."""
    big = mx.ones((2**28,), mx.float32)
    mx.eval(big)
    seconds, _, _ = median_seconds(lambda: mx.eval(big + 1), repeats)
    return 2 * big.nbytes / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8], help="bits per weight")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="weights per scale")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="activations, scales, output")
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluations per measurement")
    parser.add_argument("--working-set", type=int, default=512, help="MB of matrices per shape (>> 50 MB L2)")
    parser.add_argument("--sweep", action="store_true", help="also time each (rows, warps, strides) variant")
    args = parser.parse_args(argv)
    if not quantized_matvec.on_cuda():
        sys.exit("error: this benchmark times a CUDA kernel; run it where MLX's default device is a CUDA GPU")
    dtype = DTYPES[args.dtype]

    ceiling = copy_bandwidth(args.repeats)
    print(f"device: {mx.device_info().get('device_name', 'GPU')}; MLX {mx.__version__}; {args.dtype} activations, "
          f"group size {args.group_size}")
    print(f"copy bandwidth (MLX, 1 GiB, read + write): {ceiling / 1e9:.0f} GB/s")

    variants = VARIANTS if args.sweep else [(quantized_matvec.ROWS_PER_BLOCK, quantized_matvec.WARPS_PER_BLOCK,
                                            quantized_matvec.STRIDES_IN_FLIGHT)]
    for bits in args.bits:
        totals = {"mlx": 0.0, **{v: 0.0 for v in variants}}
        token_bytes = 0
        print(f"\n{bits}-bit: GB/s of quantized bytes (median of {args.repeats} timings)")
        print(f"{'shape':<28} {'MB':>6} {'MLX':>7}  " + "  ".join(f"R{r}W{w}U{u}".rjust(8) for r, w, u in variants) + "  max|diff|/max|MLX|")
        for name, N, K, per_token in SHAPES:
            one = N * K * bits // 8 + 2 * N * (K // args.group_size) * dtype.size
            count = max(2, args.working_set * 2**20 // one)
            mats = random_quantized(N, K, args.group_size, bits, dtype, count)
            x = mx.random.normal((1, K)).astype(dtype)
            mx.eval(x)

            calls = PASSES * count

            def mlx_call():
                mx.eval([mx.quantized_matmul(x, *m, transpose=True, group_size=args.group_size, bits=bits)
                         for _ in range(PASSES) for m in mats])

            seconds, _, _ = median_seconds(mlx_call, args.repeats)
            row = [f"{name + f' ({N}x{K})':<28} {one / 1e6:>6.1f} {one * calls / seconds / 1e9:>7.0f}"]
            totals["mlx"] += per_token * seconds / calls
            for r, w, u in variants:
                def kernel_call():
                    mx.eval([quantized_matvec.quantized_matvec(x, *m, args.group_size, bits, r, w, u)
                             for _ in range(PASSES) for m in mats])

                seconds, _, _ = median_seconds(kernel_call, args.repeats)
                row.append(f"{one * calls / seconds / 1e9:>8.0f}")
                totals[(r, w, u)] += per_token * seconds / calls
            expected = mx.quantized_matmul(x, *mats[0], transpose=True, group_size=args.group_size, bits=bits)
            got = quantized_matvec.quantized_matvec(x, *mats[0], args.group_size, bits)
            difference = (mx.abs(got - expected).max() / mx.abs(expected).max()).item()
            row.append(f"{difference:>10.1e}")
            token_bytes += per_token * one
            print("  ".join(row), flush=True)
            del mats
        ideal = ceiling / 2  # a copy moves each byte twice
        print(f"{bits}-bit token: {token_bytes / 1e9:.2f} GB of matrices; at the copy bandwidth "
              f"{ideal / token_bytes:.0f} tokens/s")
        print(f"{bits}-bit estimated tokens/s (matrix products only): MLX {1 / totals['mlx']:.0f}; kernel "
              + ", ".join(f"R{r}W{w}U{u} {1 / totals[(r, w, u)]:.0f}" for r, w, u in variants))


if __name__ == "__main__":
    main()
