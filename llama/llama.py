"""Generate text, or chat, with a converted Llama and its tokenizer.

    python llama/llama.py weights.npz tokenizer.model "Call me Ishmael. Some years ago never mind how long precisely"
    python llama/llama.py llama-3.1-8b-instruct.safetensors path/to/Llama-3.1-8B-Instruct --chat "Hello"
    python llama/llama.py llama-3.1-8b-instruct.safetensors tokenizer.model --chat --system "Be brief."  # interactive

Only the model's text goes to stdout, streamed as it is produced; timings and memory go to stderr,
so `> out.txt` captures just the text. Generation stops at the tokenizer's stop tokens (EOS; Llama 3's
<|end_of_text|>, <|eom_id|> and <|eot_id|>; every EOS id of a Hugging Face generation config), after
--max-tokens tokens, or when the context is full.
"""

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
from model import WeightsError, in_range, load_model, warn_if_reference_blas
from tokenizer import StreamingDecoder, TokenizerError, load_tokenizer


def generate(model, tokenizer, args, prompt_tokens, cache=None, context=()):
    """Stream the continuation of `prompt_tokens` to stdout until a stop token, args.max_tokens or the end
    of the context, then its speed to stderr; return the reply's tokens (without the stop token) and all
    the tokens generated. With `cache`, prompt_tokens continue what it holds: `context`, the tokens before."""
    length, limit = len(context) + len(prompt_tokens), model.args.max_seq_len
    if length >= limit:
        raise ValueError(
            f"the prompt is {length} tokens; the model's context is {limit}, reply included: shorten it"
        )
    decoder = StreamingDecoder(tokenizer, [*context, *prompt_tokens])
    generated, tic, first = [], time.perf_counter(), None
    # Generation stops one token late: the token after the last one kept is waited for, so `seconds` holds
    # as many steps as the reply has tokens.
    for token in model.generate(
        mx.array(prompt_tokens), args.temp, args.top_p, cache=cache
    ):
        first = (
            first or time.perf_counter()
        )  # the first token comes out of the pass over the whole prompt
        if len(generated) == min(args.max_tokens, limit - length):
            break
        generated.append(token)
        if token in tokenizer.stop_ids:
            break
        print(decoder.add(token), end="", flush=True)
    seconds = time.perf_counter() - first
    print(decoder.add(None), flush=True)
    reply = generated[:-1] if generated[-1] in tokenizer.stop_ids else generated
    cached = f"{len(context)} tokens from the cache | " if cache else ""
    print(
        f"[{cached}prompt {len(prompt_tokens)} tokens, {len(prompt_tokens) / (first - tic):.1f} tokens/s | "
        f"generation {len(reply)} tokens, {len(reply) / seconds:.1f} tokens/s | "
        f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB]",
        file=sys.stderr,
    )
    return reply, generated


def load(args):
    """(model, tokenizer, what the load line adds). Started as N > 1 processes by mlx.launch, the model is
    split over them (tp.py): every process runs all of this script, and a failure on any of them stops all
    of them, with one line from rank 0."""

    def tokenizer_for(model):
        if args.tokenizer is None or args.tokenizer.endswith(".gguf"):  # gguf_file.py
            from gguf_file import GGUFTokenizer

            tokenizer = GGUFTokenizer(args.tokenizer or args.weights)
        else:
            tokenizer = load_tokenizer(args.tokenizer, model.args.vocab_size)
        if (
            args.chat
        ):  # refuse a tokenizer without a chat format before reading any input
            from chat import chat_tokens

            chat_tokens(tokenizer, [{"role": "user", "content": "hi"}])
        return tokenizer

    if args.weights.endswith(".gguf"):  # llama.cpp's files, read by gguf_file.py
        from gguf_file import load_gguf

        model, note = load_gguf(args.weights)
        if args.adapter_path:
            from lora import load_adapters

            note += load_adapters(model, args.adapter_path)
        return model, tokenizer_for(model), note
    if (
        args.adapter_path
    ):  # LoRA adapters from lora.py (one process only), read only when asked for
        from lora import load_with_adapters

        return load_with_adapters(args.weights, args.adapter_path, tokenizer_for)
    if "MLX_RANK" in os.environ:  # mlx.launch sets it in every process it starts
        from tp import load_split

        return load_split(
            args.weights, tokenizer_for, (WeightsError, TokenizerError), args.timeout
        )
    model = load_model(args.weights)
    return model, tokenizer_for(model), ""


def text(argument):
    """An argparse type: text that is UTF-8 (other bytes reach Python as lone surrogates, which cannot be encoded)."""
    argument.encode()
    return argument


def parse_args():
    parser = argparse.ArgumentParser(
        description="Generate text or chat with a converted Llama (see convert.py)."
    )
    parser.add_argument(
        "weights", help="the .npz or .safetensors file written by convert.py"
    )
    parser.add_argument(
        "tokenizer",
        nargs="?",
        help="the checkpoint's tokenizer: SentencePiece or Llama 3 tokenizer.model, a "
        "Hugging Face tokenizer.json, or a model folder (the kind is read from the "
        "file); left out for a .gguf, the file's own tokenizer",
    )
    parser.add_argument(
        "prompt",
        nargs="?",
        type=text,
        help="the text to continue (with --chat: the first message; "
        "without one, --chat reads a message per line from stdin)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the model's chat format (chat.py); "
        "without a prompt, chat interactively (one message per line; Ctrl-D ends)",
    )
    parser.add_argument("--system", type=text, help="a system message for --chat")
    parser.add_argument(
        "--max-tokens",
        type=in_range(int, 1),
        default=100,
        help="most new tokens per reply (default: 100)",
    )
    parser.add_argument(
        "--temp",
        type=in_range(float, 0),
        default=0.0,
        help="temperature; 0: greedy (default)",
    )
    parser.add_argument(
        "--top-p",
        type=in_range(float, 0, 1, above=True),
        default=1.0,
        help="sample only from the "
        "most likely tokens whose probabilities add up to this (default: 1, all)",
    )
    parser.add_argument(
        "--seed",
        type=in_range(int, 0, 2**64 - 1),
        default=0,
        help="seed for sampling (default: 0)",
    )
    parser.add_argument(
        "--timeout",
        type=in_range(float, 0),
        default=600,
        help="with several processes (mlx.launch): "
        "stop them all when the run makes no progress for this many seconds; 0: never (default: 600)",
    )
    parser.add_argument(
        "--adapter-path",
        help="a folder of LoRA adapters from lora.py --train, applied to the model",
    )
    parser.add_argument(
        "--prompts",
        help="instead of a prompt: a file of prompts, one per line (or a .jsonl of "
        '{"prompt": ...} or {"messages": [...]}), generated in batches (batch.py); a JSON line each',
    )
    parser.add_argument(
        "--batch-size",
        type=in_range(int, 1),
        default=16,
        help="prompts generated at once with --prompts (default: 16)",
    )
    args = parser.parse_intermixed_args()  # the optional prompt may come after --chat
    # model.gguf "prompt": the GGUF's tokenizer, and the second word is the prompt.
    gguf = args.weights.endswith(".gguf")
    if gguf and args.prompt is None and not Path(args.tokenizer or "").exists():
        args.tokenizer, args.prompt = None, args.tokenizer
    if args.tokenizer is None and not gguf:
        parser.error("give the tokenizer after the weights (only a .gguf has its own)")
    if args.prompts and (args.prompt is not None or "MLX_RANK" in os.environ):
        parser.error("--prompts replaces the prompt, in one process")
    if args.prompt is None and not args.chat and not args.prompts:
        parser.error(
            "give a prompt to continue, --chat for a conversation, or --prompts"
        )
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; give some text to continue")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    return args


def main():
    args = parse_args()
    mx.random.seed(
        args.seed
    )  # the same on every rank: all of them sample the same tokens
    if args.prompts:  # read before the model, so that a bad file fails at once
        from batch import read_prompts

        prompts = read_prompts(args.prompts)
    tic = time.perf_counter()
    model, tokenizer, split = load(args)
    q = (
        model.args.quantization
    )  # a quantized file (convert.py --quantize) needs no flag: its config says so
    weights = f"{q['bits']}-bit weights in groups of {q['group_size']}, " if q else ""
    print(
        f"[load {time.perf_counter() - tic:.2f} s, {weights}{tokenizer.kind} tokenizer{split}]",
        file=sys.stderr,
    )
    warn_if_reference_blas()
    if args.prompts:
        from batch import run_prompts

        run_prompts(model, tokenizer, args, *prompts)
    elif args.chat:
        from chat import chat

        chat(
            model,
            tokenizer,
            partial(generate, model, tokenizer, args),
            args.prompt,
            args.system,
        )
    else:
        generate(model, tokenizer, args, tokenizer.prompt(args.prompt))
    mx.synchronize()  # the step started ahead is still running: with other ranks, let its all_sums finish


if __name__ == "__main__":
    try:
        main()
    # Bad input: weights or tokenizer that do not fit, a prompt too long for the context, a template's refusal.
    except (WeightsError, TokenizerError, ValueError) as e:
        sys.exit(f"error: {e}")
    except (
        KeyboardInterrupt
    ):  # Ctrl-C while loading or generating (under mlx.launch, tp.py ends the run)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
