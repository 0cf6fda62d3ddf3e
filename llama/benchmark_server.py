"""Serving speed: llama/server.py against mlx_lm.server, N streaming clients at once.

    python llama/benchmark_server.py --preset 7b --dtype float16       # on a GPU
    python llama/benchmark_server.py --preset 7b --quantize 4
    python llama/benchmark_server.py --preset 7b --duration 300        # the soak run
    python llama/benchmark_server.py --preset tiny --max-tokens 8      # on a CPU

Both servers serve the same random weights, written once into --work-dir in the two
layouts: a Hugging Face folder (config.json, model.safetensors in Hugging Face's names,
tokenizer.json: what mlx_lm reads; with --quantize, quantized as mlx_lm quantizes,
config "quantization") and that folder converted by convert.py (what server.py reads).
The tokenizer is a word-level one with a word per token, so a prompt of n words is n
tokens (plus BOS) for both; the output layer's row of EOS is zero, so random weights
never pick it and every reply is --max-tokens.

For each number of clients (--clients, default 1 4 16 64), each client sends --requests
streaming /v1/completions requests one after another (each after a random pause of up
to --arrival-ms), greedy, prompts of mixed lengths (from --min-prompt-tokens to
--prompt-tokens, each prompt different). Measured per request: time to first token
(TTFT) and time per output token after it (TPOT); per run: total tokens/s (all tokens
generated over the wall time), median and range of --repeats runs; failed requests.
Both servers may run --max-batch rows at once (mlx_lm: --decode-concurrency).

--duration S instead runs this server alone for S seconds with --soak-clients clients
that stream, stop reading and disconnect, wait for whole answers, or send bad requests
(malformed JSON, wrong types, a prompt longer than the context), and counts what did not
get the answer it should. mlx_lm.server is skipped, saying so, when mlx_lm is not
installed.
"""

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from llama import in_range

PRESETS = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        vocab_size=320,
        max_position_embeddings=256,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}
HERE = Path(__file__).resolve().parent


def say(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- The weights, in both layouts ----------------------------------------------------


def hf_shapes(config):
    """{Hugging Face name: shape} of a Llama."""
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    head_dim = dim // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], dim),
        "model.norm.weight": (dim,),
        "lm_head.weight": (config["vocab_size"], dim),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update(
            {
                f"{layer}.self_attn.q_proj.weight": (dim, dim),
                f"{layer}.self_attn.k_proj.weight": (kv, dim),
                f"{layer}.self_attn.v_proj.weight": (kv, dim),
                f"{layer}.self_attn.o_proj.weight": (dim, dim),
                f"{layer}.mlp.gate_proj.weight": (hidden, dim),
                f"{layer}.mlp.up_proj.weight": (hidden, dim),
                f"{layer}.mlp.down_proj.weight": (dim, hidden),
                f"{layer}.input_layernorm.weight": (dim,),
                f"{layer}.post_attention_layernorm.weight": (dim,),
            }
        )
    return shapes


def random_weights(config, dtype, quantize, seed):
    """{name: array} of random weights (std 0.02, norms 1), the 2-D ones quantized as
    mlx_lm quantizes them (affine, groups of 64) with --quantize."""
    mx.random.seed(seed)
    weights = {}
    for name, shape in hf_shapes(config).items():
        if len(shape) == 1:
            weights[name] = mx.ones(shape, dtype)
            continue
        w = (mx.random.normal(shape) * 0.02).astype(dtype)
        if (
            name == "lm_head.weight"
        ):  # EOS (id 2) never wins: every reply is full length
            w[2] = 0
        if quantize:
            base = name.removesuffix(".weight")
            q, scales, biases = mx.quantize(w, group_size=64, bits=quantize)
            weights.update(
                {name: q, f"{base}.scales": scales, f"{base}.biases": biases}
            )
        else:
            weights[name] = w
        mx.eval(weights)
    return weights


def write_tokenizer(folder, vocab_size):
    """A word-level tokenizer.json: "<unk>", "<s>", "</s>", then the words w3, w4..."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generation = dict(bos_token_id=1, eos_token_id=2)
    (folder / "generation_config.json").write_text(json.dumps(generation))


def write_weights(args):
    """(Hugging Face folder, converted file) in --work-dir, written unless there."""
    quantized = f"-{args.quantize}bit" if args.quantize else ""
    folder = args.work_dir / f"{args.preset}-{args.dtype}{quantized}-seed{args.seed}"
    converted = folder.with_suffix(".safetensors")
    if converted.is_file():
        return folder, converted
    say(f"writing random {args.preset} weights to {folder} and {converted.name}")
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(
        PRESETS[args.preset],
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype=args.dtype,
        bos_token_id=1,
        eos_token_id=2,
    )
    if args.quantize:
        config["quantization"] = {"group_size": 64, "bits": args.quantize}
    dtype = getattr(mx, args.dtype)
    weights = random_weights(config, dtype, args.quantize, args.seed)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    del weights
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, config["vocab_size"])
    result = subprocess.run(
        [sys.executable, str(HERE / "convert.py"), str(folder), str(converted)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"error: convert.py failed: {result.stderr.strip()}")
    return folder, converted


# ---- The servers ---------------------------------------------------------------------


def start(name, command, port, log):
    """Start a server: its process once GET /v1/models answers, or None if never."""
    import httpx

    say(f"starting {name}: {' '.join(map(str, command))}")
    process = subprocess.Popen(list(map(str, command)), stdout=log, stderr=log)
    deadline = time.time() + 1800  # 7B weights take a while to read
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    say(f"{name} did not start (exit code {process.poll()}); see {log.name}")
    stop(process)
    return None


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def commands(args, folder, converted, port):
    """{server name: its command line}: this one, and mlx_lm.server when installed."""
    ours = [sys.executable, HERE / "server.py", converted, folder, "--port", port]
    ours += ["--max-batch", args.max_batch, "--max-queue", 1024]
    servers = {"server.py": ours}
    if importlib.util.find_spec("mlx_lm") is None:
        say("mlx_lm is not installed: only server.py is measured (pip install mlx-lm)")
    elif args.duration is None:
        peer = [sys.executable, "-m", "mlx_lm", "server", "--model", folder]
        peer += ["--port", port, "--decode-concurrency", args.max_batch]
        peer += ["--max-tokens", args.max_tokens, "--log-level", "WARNING"]
        servers["mlx_lm.server"] = peer
    return servers


# ---- The clients ---------------------------------------------------------------------


def prompts(n, args, vocab_size, seed):
    """n prompts of random words, lengths spread from --min-prompt-tokens to
    --prompt-tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(args.min_prompt_tokens, args.prompt_tokens + 1, n)
    return [" ".join(f"w{i}" for i in rng.integers(3, vocab_size, k)) for k in lengths]


async def stream_one(http, prompt, max_tokens):
    """(TTFT, TPOT, tokens) of one streaming request; an exception if it failed."""
    body = dict(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tic, first, last, tokens, done = time.perf_counter(), None, None, None, False
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            answer = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"status {response.status_code}: {answer[:200]}")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if not (done and first and tokens):
        raise RuntimeError("the stream ended early")
    return first - tic, (last - first) / max(1, tokens - 1), tokens


async def run_clients(port, texts, clients, max_tokens, arrival):
    """Each client sends its share of `texts` one after another. (seconds, results,
    {why a request failed: how many})."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 8)
    timeout = httpx.Timeout(None)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as http:
        results, failed = [], collections.Counter()

        async def client(share):
            rng = random.Random(len(share[0]))
            for text in share:
                # Requests arrive spread over `arrival` seconds, not all in one instant:
                # mlx_lm.server's listening socket holds 5 connections not yet accepted.
                await asyncio.sleep(rng.uniform(0, arrival))
                try:
                    results.append(await stream_one(http, text, max_tokens))
                except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
                    failed[f"{type(e).__name__}: {e}"[:240]] += 1

        tic = time.perf_counter()
        await asyncio.gather(*(client(texts[i::clients]) for i in range(clients)))
        return time.perf_counter() - tic, results, failed


def measure(port, args, vocab_size):
    """{clients: (tokens/s of each repeat, TTFTs, TPOTs, failed)} against one server."""
    warm_up = prompts(2, args, vocab_size, 0)
    asyncio.run(run_clients(port, warm_up, 1, args.max_tokens, 0))
    levels = {}
    for clients in args.clients:
        speeds, ttfts, tpots, failed = [], [], [], collections.Counter()
        for repeat in range(args.repeats):
            seed = 1000 * clients + repeat
            texts = prompts(clients * args.requests, args, vocab_size, seed)
            arrival = args.arrival_ms / 1e3
            run = run_clients(port, texts, clients, args.max_tokens, arrival)
            seconds, results, lost = asyncio.run(run)
            speeds.append(sum(r[2] for r in results) / seconds)
            ttfts += [r[0] for r in results]
            tpots += [r[1] for r in results]
            failed += lost
        say(f"{clients} clients: {statistics.median(speeds):.1f} tokens/s")
        for why, count in failed.most_common():
            say(f"  {count} failed: {why}")
        levels[clients] = (speeds, ttfts, tpots, failed.total())
    return levels


# ---- The soak run --------------------------------------------------------------------


BAD_BODIES = [
    b'{"prompt": "w3 w4",',  # malformed JSON
    json.dumps({"prompt": "w3", "max_tokens": "5"}).encode(),
    json.dumps({"prompt": "w3", "temperature": -1}).encode(),
    json.dumps({"prompt": "w3", "model": "no-such-model"}).encode(),
]


async def soak_request(http, rng, text, args):
    """One request of a random kind; True if it got the answer it should."""
    max_tokens = args.max_tokens
    kind = rng.choice(["stream", "stream", "whole", "disconnect", "bad", "long"])
    if kind in ("bad", "long"):
        body = rng.choice(BAD_BODIES)
        if kind == "long":  # longer than the context
            context = PRESETS[args.preset]["max_position_embeddings"]
            body = json.dumps({"prompt": "w3 " * (context + 100)}).encode()
        headers = {"Content-Type": "application/json"}
        response = await http.post("/v1/completions", content=body, headers=headers)
        error = response.json().get("error", {})
        return response.status_code in (400, 404) and "message" in error
    if kind == "whole":
        body = dict(prompt=text, max_tokens=max_tokens)
        response = await http.post("/v1/completions", json=body)
        return response.status_code == 200 and response.json()["usage"]["total_tokens"]
    if kind == "stream":
        await stream_one(http, text, max_tokens)
        return True
    body = dict(prompt=text, max_tokens=max_tokens, stream=True)
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():  # a few events, then hang up
            if line.startswith("data: ") and rng.random() < 0.3:
                break
    return response.status_code == 200


async def soak(port, args, vocab_size):
    """--soak-clients clients sending requests of random kinds for --duration s."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    counts = {"requests": 0, "failed": 0}
    deadline = time.time() + args.duration
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600)) as http:

        async def client(number):
            rng = random.Random(number)
            texts = prompts(64, args, vocab_size, number)
            while time.time() < deadline:
                try:
                    ok = await soak_request(http, rng, rng.choice(texts), args)
                except (httpx.HTTPError, RuntimeError, ValueError, KeyError):
                    ok = False
                counts["requests"] += 1
                counts["failed"] += not ok

        await asyncio.gather(*(client(i) for i in range(args.soak_clients)))
        healthy = (await http.get("/health")).json()
    return counts, healthy


# ---- Report --------------------------------------------------------------------------


def percentile(values, q):
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def report(results, args):
    """A row per server and number of clients; the ratio to mlx_lm.server if it ran."""
    weights = f"{args.quantize}-bit" if args.quantize else args.dtype
    lengths = f"{args.min_prompt_tokens}-{args.prompt_tokens}"
    print(
        f"{args.preset} preset, {weights} random weights, MLX {mx.__version__} on "
        f"{mx.default_device()}; {args.requests} streaming requests per client, "
        f"prompts of {lengths} tokens, {args.max_tokens} new tokens each, greedy; "
        f"tokens/s median [min-max] of {args.repeats}; times in ms"
    )
    print(
        f"{'server':>14} {'clients':>7} {'tokens/s':>9} {'range':>13} {'vs mlx_lm':>9} "
        f"{'TTFT p50':>8} {'p99':>7} {'TPOT p50':>8} {'p99':>6} {'failed':>6}"
    )
    for name, levels in results.items():
        for clients, (speeds, ttfts, tpots, failed) in levels.items():
            speed = statistics.median(speeds)
            span = f"{min(speeds):.0f}-{max(speeds):.0f}"
            versus = ""
            if name != "mlx_lm.server" and "mlx_lm.server" in results:
                peer = statistics.median(results["mlx_lm.server"][clients][0])
                versus = f"{speed / peer:.2f}x"
            ttft = f"{percentile(ttfts, 50):>8.1f} {percentile(ttfts, 99):>7.1f}"
            tpot = f"{percentile(tpots, 50):>8.2f} {percentile(tpots, 99):>6.2f}"
            print(
                f"{name:>14} {clients:>7} {speed:>9.1f} {span:>13} {versus:>9} "
                f"{ttft} {tpot} {failed:>6}"
            )


def workload_flags(parser):
    """The flags of what the clients send."""
    parser.add_argument(
        "--clients",
        type=in_range(int, 1, 1024),
        nargs="+",
        default=[1, 4, 16, 64],
        help="concurrent clients (default: 1 4 16 64)",
    )
    parser.add_argument(
        "--requests",
        type=in_range(int, 1),
        default=2,
        help="requests per client, one after another (default: 2)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=in_range(int, 1),
        help="the longest prompt (default: 512; tiny: 32)",
    )
    parser.add_argument(
        "--min-prompt-tokens",
        type=in_range(int, 1),
        help="the shortest prompt (default: 32; tiny: 4)",
    )
    parser.add_argument(
        "--max-tokens",
        type=in_range(int, 1),
        default=128,
        help="new tokens per request (default: 128)",
    )
    parser.add_argument(
        "--max-batch",
        type=in_range(int, 1),
        default=64,
        help="rows decoded at once by either server (default: 64)",
    )
    parser.add_argument(
        "--arrival-ms",
        type=in_range(float, 0),
        default=100,
        help="each request waits a random 0 to this many ms before it is sent "
        "(default: 100)",
    )
    parser.add_argument(
        "--repeats",
        type=in_range(int, 1),
        default=3,
        help="runs per number of clients (default: 3)",
    )


def parse_args():
    parser = argparse.ArgumentParser(
        description="Serving speed of server.py against mlx_lm.server, same weights."
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], default="float16"
    )
    parser.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="quantize the weights to 4 or 8 bits",
    )
    workload_flags(parser)
    parser.add_argument(
        "--duration",
        type=in_range(float, 1),
        help="instead: a soak run of this many seconds against server.py",
    )
    parser.add_argument(
        "--soak-clients",
        type=in_range(int, 1),
        default=16,
        help="clients of the soak run (default: 16)",
    )
    parser.add_argument("--port", type=in_range(int, 1, 65535), default=8181)
    parser.add_argument("--seed", type=in_range(int, 0, 2**32 - 1), default=0)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/benchmark_server"),
        help="where the weights are written, and kept for the next run",
    )
    args = parser.parse_args()
    tiny = args.preset == "tiny"
    if args.prompt_tokens is None:
        args.prompt_tokens = 32 if tiny else 512
    if args.min_prompt_tokens is None:
        args.min_prompt_tokens = min(4 if tiny else 32, args.prompt_tokens)
    context = PRESETS[args.preset]["max_position_embeddings"]
    if args.min_prompt_tokens > args.prompt_tokens:
        parser.error("--min-prompt-tokens must not be above --prompt-tokens")
    if args.prompt_tokens + 1 + args.max_tokens > context:
        parser.error(f"--prompt-tokens + --max-tokens must fit the context, {context}")
    return args


def main():
    args = parse_args()
    folder, converted = write_weights(args)
    vocab_size = PRESETS[args.preset]["vocab_size"]
    results = {}
    for name, command in commands(args, folder, converted, args.port).items():
        log = open(args.work_dir / f"{name}.log", "w")
        process = start(name, command, args.port, log)
        if process is None:
            continue
        try:
            if args.duration:
                counts, healthy = asyncio.run(soak(args.port, args, vocab_size))
                print(
                    f"soak run of {args.duration:.0f} s, {args.soak_clients} clients: "
                    f"{counts['requests']} requests, {counts['failed']} failed; "
                    f"afterwards /health says {healthy}"
                )
            else:
                results[name] = measure(args.port, args, vocab_size)
        finally:
            stop(process)
        if any(level[3] for level in results.get(name, {}).values()):
            lines = Path(log.name).read_text(errors="replace").splitlines()
            say(f"{name} failed requests; the end of {log.name}:")
            print("\n".join(lines[-20:]), file=sys.stderr)
    if results:
        report(results, args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
