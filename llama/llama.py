"""Generate text, or chat, with a converted Llama and its tokenizer.

    python llama/llama.py weights.safetensors tokenizer.model "Call me Ishmael."
    python llama/llama.py llama-3.1-8b-instruct.safetensors \
        path/to/Llama-3.1-8B-Instruct --chat "Hello"
    python llama/llama.py llama-3.1-8b-instruct.safetensors tokenizer.model --chat \
        --system "Be brief."  # interactive: a message per line, Ctrl-D ends

Only the model's text goes to stdout, streamed as it is produced; timings go to stderr.
Generation stops at the tokenizer's stop tokens (EOS; Llama 3's <|end_of_text|>,
<|eom_id|> and <|eot_id|>; every EOS id of a Hugging Face generation config), after
--max-tokens tokens, or when the context is full.
"""

import os
import signal


def stop_at_once(signum, frame):
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__":
    # Ctrl-C while the imports below run (a fraction of a second; a library may catch
    # a KeyboardInterrupt there) ends the process with one line; main() then restores
    # Python's KeyboardInterrupt, handled once at the bottom of this file.
    signal.signal(signal.SIGINT, stop_at_once)

# ruff: noqa: E402 (the imports below come after that guard)
import argparse
import math
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
from model import WeightsError, load_model, warn_if_reference_blas
from tokenizer import StreamingDecoder, TokenizerError, load_tokenizer


def generate(model, tokenizer, args, prompt_tokens, cache=None, context=()):
    """Stream the continuation of `prompt_tokens` to stdout until a stop token,
    args.max_tokens or the end of the context, then its speed to stderr; return the
    reply's tokens (without the stop token) and all the tokens generated. With `cache`,
    prompt_tokens continue what it holds: `context`, the tokens before."""
    length, limit = len(context) + len(prompt_tokens), model.args.max_seq_len
    if length >= limit:
        raise ValueError(
            f"the prompt is {length} tokens; the model's context is {limit}, "
            "reply included: shorten it"
        )
    decoder = StreamingDecoder(tokenizer, [*context, *prompt_tokens])
    generated, tic, first = [], time.perf_counter(), None
    if args.proposer:  # --prompt-lookup or --draft-model (speculative.py)
        from speculative import speculative_generate

        stream = speculative_generate(
            model, prompt_tokens, args.proposer, args.temp, args.top_p, cache, context
        )
    else:
        prompt = mx.array(prompt_tokens)
        stream = model.generate(prompt, args.temp, args.top_p, cache=cache)
    for token in stream:
        # The first token comes out of the pass over the whole prompt.
        first = first or time.perf_counter()
        # Stop one token late: `seconds` then holds a step per token of the reply.
        if len(generated) == min(args.max_tokens, limit - length):
            break
        generated.append(token)
        if token in tokenizer.stop_ids:
            break
        print(decoder.add(token), end="", flush=True)
    seconds = time.perf_counter() - first
    print(decoder.add(None), flush=True)
    reply = generated
    if generated[-1] in tokenizer.stop_ids:
        reply = generated[:-1]
    cached = f"{len(context)} tokens from the cache | " if cache else ""
    accepted = args.proposer.summary() if args.proposer else ""
    print(
        f"[{cached}prompt {len(prompt_tokens)} tokens, "
        f"{len(prompt_tokens) / (first - tic):.1f} tokens/s | "
        f"generation {len(reply)} tokens, {len(reply) / seconds:.1f} tokens/s"
        f"{accepted} | "
        f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB]",
        file=sys.stderr,
    )
    return reply, generated


def load(args):
    """(model, tokenizer, what the load line adds). Started as N > 1 processes by
    mlx.launch, the model is split over them (tp.py)."""

    def tokenizer_for(model):
        if args.tokenizer is None or args.tokenizer.endswith(".gguf"):
            from gguf_file import GGUFTokenizer  # the file's own tokenizer

            tokenizer = GGUFTokenizer(args.tokenizer or args.weights)
        else:
            tokenizer = load_tokenizer(args.tokenizer, model.args.vocab_size)
        if args.chat:  # refuse a tokenizer without a chat format before any input
            from chat import chat_tokens

            chat_tokens(tokenizer, [{"role": "user", "content": "hi"}])
        return tokenizer

    if args.weights.endswith(".gguf"):  # llama.cpp's files, read by gguf_file.py
        from gguf_file import load_gguf

        model, note = load_gguf(args.weights)
    elif "MLX_RANK" in os.environ:  # mlx.launch sets it in every process it starts
        from tp import load_split, stop_if_any_failed

        if args.adapter_path:  # rank 0 says why, every rank exits
            stop_if_any_failed(
                None,
                "--adapter-path runs on one process; fuse the adapters into the "
                "model first (lora.py --fuse)",
            )
        errors = (WeightsError, TokenizerError)
        return load_split(args.weights, tokenizer_for, errors, args.timeout)
    else:
        model, note = load_model(args.weights), ""
    if args.adapter_path:  # LoRA adapters from lora.py
        from lora_adapters import load_adapters

        note += load_adapters(model, args.adapter_path)
    return model, tokenizer_for(model), note


def in_range(kind, low, high=math.inf, above=False):
    """An argparse type: a finite `kind` (int or float) from `low` (or just above it)
    to `high`."""
    bounds = f"{'above' if above else 'at least'} {low}"
    if high < math.inf:
        bounds += f" and at most {high}"

    def parse(text):
        value = kind(text)
        too_low = value <= low if above else value < low
        if too_low or not value <= high or abs(value) == math.inf:  # NaN fails too
            number = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {number} {bounds}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


def text(argument):
    """An argparse type: UTF-8 text (other bytes arrive as lone surrogates)."""
    argument.encode()
    return argument


def parse_args():
    parser = argparse.ArgumentParser(
        description="Generate text or chat with a converted Llama (see convert.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("weights", help="a .safetensors or .npz from convert.py, or a .gguf")
    tokenizer = "a tokenizer.model, tokenizer.json or model folder (a .gguf has one)"
    add("tokenizer", nargs="?", help=tokenizer)
    add("prompt", nargs="?", type=text, help="the text to continue, or chat message")
    add("--chat", action="store_true", help="use the chat format; no prompt: stdin")
    add("--system", type=text, help="a system message for --chat")
    add("--max-tokens", type=in_range(int, 1), default=100, help="tokens per reply")
    add("--temp", type=in_range(float, 0), default=0.0, help="0 is greedy")
    top_p = in_range(float, 0, 1, above=True)
    add("--top-p", type=top_p, default=1.0, help="sample from the top-p mass")
    add("--seed", type=in_range(int, 0, 2**64 - 1), default=0, help="for sampling")
    seconds = in_range(float, 0)
    add("--timeout", type=seconds, default=600, help="mlx.launch: seconds of stall")
    add("--adapter-path", help="a folder of LoRA adapters from lora.py --train")
    add("--prompts", help="a file of prompts, a line each, or .jsonl (batch.py)")
    add("--batch-size", type=in_range(int, 1), default=16, help="with --prompts")
    add("--json-schema", help="a JSON schema file: the output is valid under it")
    add("--json", action="store_true", help="the output is a JSON object")
    k = in_range(int, 1, 64)
    add("--prompt-lookup", type=k, metavar="K", help="propose K tokens from the text")
    add("--ngram-size", type=k, default=2, help="tokens --prompt-lookup matches")
    add("--draft-model", help="a smaller model (convert.py file) that proposes")
    add("--num-draft-tokens", type=k, default=3, help="tokens it proposes at a time")
    args = parser.parse_intermixed_args()  # the prompt may come after --chat
    # model.gguf "prompt": the GGUF's own tokenizer, and the second word is the prompt.
    gguf = args.weights.endswith(".gguf")
    if gguf and args.prompt is None and not Path(args.tokenizer or "").exists():
        args.tokenizer, args.prompt = None, args.tokenizer and text(args.tokenizer)
    if args.tokenizer is None and not gguf:
        parser.error("give the tokenizer after the weights (only a .gguf has its own)")
    structured = args.json_schema or args.json
    speculative = args.prompt_lookup or args.draft_model
    if args.prompt is None and not args.chat and not args.prompts:
        parser.error(
            "give a prompt to continue, --chat for a conversation, or --prompts"
        )
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; give some text to continue")
    if args.prompts and args.prompt is not None:
        parser.error("--prompts replaces the prompt")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    if structured and args.prompt is None and not args.prompts:
        parser.error("--json-schema and --json need a prompt or --prompts")
    if "MLX_RANK" in os.environ and (args.prompts or structured):
        parser.error("--prompts, --json-schema and --json run in one process")
    if args.prompt_lookup and args.draft_model:
        parser.error("--prompt-lookup and --draft-model propose two ways: pick one")
    if speculative and (args.prompts or structured):
        parser.error("--prompt-lookup and --draft-model decode one prompt, not JSON")
    return args


def main():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: see below
    args = parse_args()
    mx.random.seed(args.seed)  # the same on every rank: all sample the same tokens
    if args.prompts:  # read before the model, so that a bad file fails at once
        from batch import read_prompts

        prompts = read_prompts(args.prompts)
    schemas = {}  # structured output: checked before the model loads
    if args.json_schema or args.json or str(args.prompts).endswith(".jsonl"):
        from structured import read_schemas

        schemas = read_schemas(args)
    tic = time.perf_counter()
    model, tokenizer, note = load(args)
    # A quantized file (convert.py --quantize) needs no flag: its config says so.
    q = model.args.quantization
    weights = f"{q['bits']}-bit weights in groups of {q['group_size']}, " if q else ""
    print(
        f"[load {time.perf_counter() - tic:.2f} s, {weights}{tokenizer.kind} "
        f"tokenizer{note}]",
        file=sys.stderr,
    )
    warn_if_reference_blas()
    args.proposer = None
    if args.prompt_lookup or args.draft_model:  # speculative.py, read only then
        from speculative import proposer_for

        args.proposer = proposer_for(args, model)
    if args.prompts:
        from batch import run_prompts

        run_prompts(model, tokenizer, args, *prompts, schemas)
    elif schemas:
        from structured import generate_json

        generate_json(model, tokenizer, args, schemas[None])
    elif args.chat:
        from chat import chat

        reply = partial(generate, model, tokenizer, args)
        chat(model, tokenizer, reply, args.prompt, args.system)
    else:
        generate(model, tokenizer, args, tokenizer.prompt(args.prompt))
    # The step started ahead still runs: with other ranks, let its all_sums finish.
    mx.synchronize()


if __name__ == "__main__":
    try:
        main()
    # Bad input: weights or tokenizer that do not fit, a prompt too long for the
    # context, a template's refusal.
    except (WeightsError, TokenizerError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # under mlx.launch, tp.py ends the run
        print(f"\ninterrupted {e}".rstrip(), file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # stdout closed (`| head -c1`) or full (`> /dev/full`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e, BrokenPipeError):
            sys.exit(1)  # the reader is gone: nobody to tell
        sys.exit(f"error: {e.filename or 'cannot write the output'}: {e.strerror}")
