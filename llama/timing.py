"""Timing a Llama's decoding, shared by benchmark.py (one process) and benchmark_tp.py
(one process per GPU under mlx.launch). Only MLX here: benchmark.py also imports
PyTorch, which the ranks need not load."""

import statistics
import sys
import time

import mlx.core as mx
from model import sample

START = time.perf_counter()


def say(message):
    """A progress line on stderr (stdout keeps the results), with the seconds since the
    script started."""
    print(
        f"[{time.perf_counter() - START:.0f} s] {message}", file=sys.stderr, flush=True
    )


def generate_runs(model, prompt, max_tokens, repeats, after_run=None, label=None):
    """[(prompt seconds, seconds per decoded token)] of `repeats` runs of
    model.generate, greedy, as llama.py runs it, after a warm-up run; after_run() is
    called after each run, outside its time. With a label, say how long the warm-up took
    and the timed runs will take."""
    prompt = mx.array(prompt)
    runs = []
    for i in range(repeats + 1):  # the first run warms up
        tic = time.perf_counter()
        generator = model.generate(prompt, temp=0.0)
        next(generator)  # the first token: one pass over the prompt
        first = time.perf_counter()
        for _ in range(max_tokens - 1):
            next(generator)
        runs.append((first - tic, (time.perf_counter() - first) / (max_tokens - 1)))
        if after_run:
            after_run()
        if label and i == 0:
            seconds = time.perf_counter() - tic
            say(
                f"{label}: warm-up run {seconds:.1f} s; {repeats} timed "
                f"run{'s' * (repeats > 1)}, about {repeats * seconds:.0f} s"
            )
    return runs[1:]


def host_seconds(model, prompt, repeats=20):
    """(build, launch): median seconds the host spends on one decoding step before the
    device runs it. build: Python making the step's graph (nothing evaluated); launch:
    mx.async_eval of it, in which MLX turns the graph into kernels (and, split over
    processes, its all-reduces) and hands them to the device. generate overlaps both
    with the device's previous step, so when their sum is longer than the device's step,
    the host sets the pace. (On a CPU, MLX computes inside the launch: there it is no
    overhead measure.)"""
    cache = model.make_cache()
    mx.eval(model(mx.array([prompt]), cache, last_only=True))
    builds, launches = [], []
    for _ in range(repeats):
        tic = time.perf_counter()
        token = sample(
            model(mx.array([[1]]), cache)[:, -1], temp=0.0, top_p=1.0
        )  # a greedy step, as generate makes
        built = time.perf_counter()
        mx.async_eval(token)
        launched = time.perf_counter()
        mx.eval(
            token
        )  # the device idles now: the next step's host work is not overlapped
        builds.append(built - tic)
        launches.append(launched - built)
    return statistics.median(builds), statistics.median(launches)
