"""The warning main.py, benchmark.py and benchmark_ddp.py print when MLX runs on a Linux CPU with the
reference BLAS that mlx[cpu] bundles (netlib's: matrix products ~30x slower than OpenBLAS's, this
example's training about 6x slower). Preloading OpenBLAS fixes it; README.md says how."""

import sys

import mlx.core as mx


def warn_if_reference_blas():
    if mx.default_device() != mx.cpu or not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:  # the shared libraries this process has loaded
        libs = {line.split()[-1] for line in f if "/" in line}
    reference = any("mlx_cpu.libs/libblas" in lib for lib in libs)
    if reference and not any(
        lib.rsplit("/", 1)[-1].startswith("libopenblas") for lib in libs
    ):
        print(
            "warning: MLX is using the reference BLAS bundled with mlx[cpu] (slow matrix products: training "
            "takes about 6x longer); see gpt2/README.md to preload OpenBLAS",
            file=sys.stderr,
            flush=True,
        )
