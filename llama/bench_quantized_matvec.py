"""Time one token through each weight shape of Llama 7B with quantized weights: MLX's own
mx.quantized_matmul against the CUDA kernel of quantized_matvec.py, in GB/s of quantized bytes read
(packed weights + scales + biases), and the decoding speed those times allow.

    python llama/bench_quantized_matvec.py                  # 4- and 8-bit, group size 64, float16
    python llama/bench_quantized_matvec.py --sweep          # also the kernel's launch variants

Each shape is timed over enough different matrices (--working-set MB) that none stays in the GPU's
50 MB L2 cache between calls. One measurement builds the lazy products with every matrix (4 passes),
then evaluates them: the time of mx.eval divided by the number of calls is a call's time (MLX's C++
encoding and launch included, Python's graph building not: a decoding loop overlaps that with the
GPU), the median over --repeats. Python's graph building is printed beside it, in us per call.

The tokens/s estimate adds up the matrix products of one token: 32 layers of wq, wk, wv, wo, w1, w3,
w2, and the output layer; and the same with wq|wk|wv and w1|w3 each concatenated into one matrix
(4 products per layer instead of 7). It is an upper bound: attention, norms and sampling are left out.
"""

import argparse
import statistics
import sys
import time

import mlx.core as mx

import quantized_matvec

# Llama 7B weight shapes, (N = output features, K = input features), and how many of each one token
# reads, with separate matrices and with wq|wk|wv and w1|w3 concatenated.
SHAPES = {"wq, wk, wv, wo": (4096, 4096), "w1, w3": (11008, 4096), "w2": (4096, 11008),
          "output": (32000, 4096), "wq|wk|wv": (12288, 4096), "w1|w3": (22016, 4096)}
LAYOUTS = {"separate": {"wq, wk, wv, wo": 4 * 32, "w1, w3": 2 * 32, "w2": 32, "output": 1},
           "concatenated": {"wq|wk|wv": 32, "wq, wk, wv, wo": 32, "w1|w3": 32, "w2": 32, "output": 1}}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
VARIANTS = [(8, 2, 1, 0), (8, 2, 1, 1), (8, 1, 2, 0), (8, 4, 1, 0), (16, 2, 1, 0), (4, 4, 1, 0),
            (2, 4, 2, 0), (2, 4, 2, 1), (2, 4, 1, 0), (2, 8, 1, 0), (4, 4, 2, 0), (1, 4, 4, 0)]  # --sweep
PASSES = 4  # passes over the matrices in one mx.eval, to spread its fixed cost over more calls


def seconds_per_call(call, mats, repeats):
    """(median seconds of mx.eval per call, median seconds of Python graph building per call)."""
    def once():
        tic = time.perf_counter()
        outputs = [call(m) for _ in range(PASSES) for m in mats]
        built = time.perf_counter()
        mx.eval(outputs)
        return time.perf_counter() - built, built - tic

    once()  # warm-up, and the kernel's compilation
    runs = [once() for _ in range(repeats)]
    calls = PASSES * len(mats)
    return statistics.median(e for e, _ in runs) / calls, statistics.median(b for _, b in runs) / calls


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
    """Bytes per second read plus written by MLX adding 1 to 1 GiB of float32 on the device."""
    big = mx.ones((2**28,), mx.float32)
    mx.eval(big)
    mx.eval(big + 1)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(big + 1)
        times.append(time.perf_counter() - tic)
    return 2 * big.nbytes / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8], help="bits per weight")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="weights per scale")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="activations, scales, output")
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluations per measurement")
    parser.add_argument("--working-set", type=int, default=512, help="MB of matrices per shape (>> 50 MB L2)")
    parser.add_argument("--sweep", action="store_true", help="also time other launch variants (R, WARPS, U, P)")
    args = parser.parse_args(argv)
    if not quantized_matvec.on_cuda():
        sys.exit("error: this benchmark times a CUDA kernel; run it where MLX's default device is a CUDA GPU")
    dtype, gs = DTYPES[args.dtype], args.group_size

    ceiling = copy_bandwidth(args.repeats)
    print(f"device: {mx.device_info().get('device_name', 'GPU')}; MLX {mx.__version__}; {args.dtype} activations, "
          f"group size {gs}")
    print(f"copy bandwidth (MLX, 1 GiB, read + write): {ceiling / 1e9:.0f} GB/s")

    for bits in args.bits:
        default = quantized_matvec.launch_variant(bits)
        variants = [default] + [v for v in VARIANTS if v != default and args.sweep]
        names = ["MLX"] + ["R{}W{}U{}P{}".format(*v) for v in variants]
        seconds = {}  # (shape, name) -> seconds per call
        print(f"\n{bits}-bit: GB/s of quantized bytes (mx.eval time, median of {args.repeats}); kernel is "
              f"{names[1]}")
        print(f"{'shape':<28} {'MB':>6} " + " ".join(f"{n:>10}" for n in names)
              + "  build us (MLX, kernel)  max|diff|/max|MLX|")
        for shape, (N, K) in SHAPES.items():
            one = N * K * bits // 8 + 2 * N * (K // gs) * dtype.size
            mats = random_quantized(N, K, gs, bits, dtype, max(2, args.working_set * 2**20 // one))
            x = mx.random.normal((1, K)).astype(dtype)
            mx.eval(x)
            calls = {"MLX": lambda m: mx.quantized_matmul(x, *m, transpose=True, group_size=gs, bits=bits)}
            for name, variant in zip(names[1:], variants):
                calls[name] = lambda m, v=variant: quantized_matvec.quantized_matvec(x, *m, gs, bits, v)
            builds = {}
            for name, call in calls.items():
                seconds[shape, name], builds[name] = seconds_per_call(call, mats, args.repeats)
            expected, got = calls["MLX"](mats[0]), calls[names[1]](mats[0])
            difference = (mx.abs(got - expected).max() / mx.abs(expected).max()).item()
            row = (f"{shape + f' ({N}x{K})':<28} {one / 1e6:>6.1f} "
                   + " ".join(f"{one / seconds[shape, n] / 1e9:>10.0f}" for n in names)
                   + f"  {builds['MLX'] * 1e6:>10.1f} {builds[names[1]] * 1e6:>10.1f}  {difference:>18.1e}")
            print(row, flush=True)
            del mats
        for layout, counts in LAYOUTS.items():
            token_bytes = sum(c * (SHAPES[s][0] * SHAPES[s][1] * bits // 8 + 2 * SHAPES[s][0] * (SHAPES[s][1] // gs)
                                   * dtype.size) for s, c in counts.items())
            speeds = {n: 1 / sum(c * seconds[s, n] for s, c in counts.items()) for n in names}
            print(f"{bits}-bit, {layout}: a token reads {token_bytes / 1e9:.2f} GB, {ceiling / token_bytes:.0f} "
                  f"tokens/s at the copy bandwidth; estimated tokens/s (matrix products only): "
                  + ", ".join(f"{n} {s:.0f}" for n, s in speeds.items()))


if __name__ == "__main__":
    main()
