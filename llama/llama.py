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
import traceback

import mlx.core as mx

from chat import ChatFormatError, chat_tokens
from model import WeightsError, load_model
from tokenizer import StreamingDecoder, TokenizerError, load_tokenizer
from tp import ShardingError, init_group, load_sharded, sharding_summary, stop_if_any_failed


def generate(model, tokenizer, prompt_tokens, max_tokens, temp, top_p, out=sys.stdout, cache=None, context=None):
    """Stream the continuation of `prompt_tokens` to `out` until a stop token, max_tokens or the end of the
    context; return the tokens generated (the stop token included) and timing statistics. With `cache`,
    prompt_tokens continue what the cache holds; decoding context is `context` (the tokens before)."""
    context = context or []
    limit = model.args.max_seq_len
    if len(context) + len(prompt_tokens) >= limit:
        raise ValueError(f"the prompt is {len(context) + len(prompt_tokens)} tokens; the model's context is {limit}, "
                         "which must also leave room for one new token")
    max_tokens = min(max_tokens, limit - len(context) - len(prompt_tokens))
    decoder = StreamingDecoder(tokenizer, context + list(prompt_tokens))
    tic = time.perf_counter()
    generated, prompt_seconds = [], None
    for token in model.generate(mx.array(prompt_tokens), temp, top_p, cache=cache):
        if prompt_seconds is None:  # the first token comes out of the pass over the whole prompt
            prompt_seconds = time.perf_counter() - tic
            tic = time.perf_counter()
        if len(generated) == max_tokens:
            break
        generated.append(token)
        if token in tokenizer.stop_ids:
            break
        out.write(decoder.add(token))
        out.flush()
    generation_seconds = time.perf_counter() - tic
    out.write(decoder.flush() + "\n")
    out.flush()
    n = len(generated) - (bool(generated) and generated[-1] in tokenizer.stop_ids)
    return generated, dict(prompt_tokens=len(prompt_tokens), prompt_seconds=prompt_seconds,
                           generated_tokens=n, generation_seconds=generation_seconds)


def report(stats, extra=""):
    prompt_rate = stats["prompt_tokens"] / stats["prompt_seconds"]
    rate = stats["generated_tokens"] / stats["generation_seconds"] if stats["generated_tokens"] else 0.0
    print(f"[{extra}prompt {stats['prompt_tokens']} tokens, {prompt_rate:.1f} tokens/s | "
          f"generation {stats['generated_tokens']} tokens, {rate:.1f} tokens/s | "
          f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB]", file=sys.stderr)


def chat(model, tokenizer, prompt, system, max_tokens, temp, top_p, lines=sys.stdin, out=sys.stdout):
    """A conversation in the tokenizer's chat format: one reply to `prompt`, or, without one, a reply to
    each line read from `lines` until its end (Ctrl-D at a terminal).

    The key/value cache stays between turns. Each turn formats the whole conversation again, keeps the
    cached positions that agree with it (normally everything so far), and runs the model on the rest:
    a turn costs its new tokens, and the model always sees exactly the format's tokens."""
    messages = [{"role": "system", "content": system}] if system else []
    cache, cached = model.make_cache(), []  # cached: the tokens whose keys and values the cache holds
    while True:
        if prompt is None:
            print("> ", end="", file=sys.stderr, flush=True)
            line = lines.readline()
            if not line:  # end of input
                print(file=sys.stderr)
                return
            if not line.strip():
                continue
        messages.append({"role": "user", "content": prompt if prompt is not None else line.rstrip("\n")})
        tokens = chat_tokens(tokenizer, messages)
        common = 0
        while common < min(len(cached), len(tokens) - 1) and cached[common] == tokens[common]:
            common += 1
        for layer_cache in cache:
            layer_cache.trim(common)
        generated, stats = generate(model, tokenizer, tokens[common:], max_tokens, temp, top_p, out, cache,
                                    context=tokens[:common])
        report(stats, f"{common} tokens from the cache | ")
        cached = (tokens + generated)[: cache[0].offset]  # what the cache really holds
        answer = generated[:-1] if generated and generated[-1] in tokenizer.stop_ids else generated
        messages.append({"role": "assistant", "content": tokenizer.decode(answer)})
        if prompt is not None:
            return


def main():
    parser = argparse.ArgumentParser(description="Generate text or chat with a converted Llama (see convert.py).")
    parser.add_argument("weights", help="the .npz or .safetensors file written by convert.py")
    parser.add_argument("tokenizer", help="the checkpoint's tokenizer: SentencePiece or Llama 3 tokenizer.model, "
                                          "a Hugging Face tokenizer.json, or a model folder (the kind is read from the file)")
    parser.add_argument("prompt", nargs="?", help="the text to continue (with --chat: the first message; "
                                                  "without one, --chat reads a message per line from stdin)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat format; without a prompt, chat interactively "
                             "(one message per line; Ctrl-D ends)")
    parser.add_argument("--system", help="a system message for --chat")
    parser.add_argument("--max-tokens", type=int, default=100, help="most tokens to generate per reply (default: 100)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample only from the most likely tokens whose probabilities add up to this (default: 1, all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    args = parser.parse_intermixed_args()  # the optional prompt may come after --chat
    if args.prompt is None and not args.chat:
        parser.error("give a prompt to continue, or --chat for a conversation")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; give some text to continue")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    if args.max_tokens < 1 or args.temp < 0 or not 0 < args.top_p <= 1:
        parser.error("--max-tokens must be at least 1, --temp at least 0, and --top-p in (0, 1]")
    mx.random.seed(args.seed)  # the same on every rank: all of them sample the same tokens

    # Started as N > 1 processes by mlx.launch, the model is split over them (tp.py). Every process runs
    # all of this; a failure on any of them stops all of them, with one line from rank 0.
    tic = time.perf_counter()
    group, error = None, None
    try:
        group = init_group()
        model = load_sharded(args.weights, group) if group is not None else load_model(args.weights)
        tokenizer = load_tokenizer(args.tokenizer, model.args.vocab_size)
        if args.chat:  # refuse a tokenizer without a chat format before reading any input
            chat_tokens(tokenizer, [{"role": "user", "content": "hi"}])
    except (WeightsError, TokenizerError, ChatFormatError, ShardingError) as e:
        error = str(e)
    stop_if_any_failed(group, error)
    split = sharding_summary(model, group) if group is not None else ""
    if group is not None and group.rank() > 0:
        # The other ranks compute what rank 0 does and print nothing; a Python error still shows.
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *error: traceback.print_exception(*error, file=sys.__stderr__)
    q = model.args.quantization  # a quantized file (convert.py --quantize) needs no flag: its config says so
    weights = f"{q['bits']}-bit weights in groups of {q['group_size']}, " if q else ""
    print(f"[load {time.perf_counter() - tic:.2f} s, {weights}{tokenizer.kind} tokenizer{split}]", file=sys.stderr)

    try:
        if args.chat:
            chat(model, tokenizer, args.prompt, args.system, args.max_tokens, args.temp, args.top_p, out=sys.stdout)
        else:
            _, stats = generate(model, tokenizer, tokenizer.prompt(args.prompt), args.max_tokens, args.temp, args.top_p,
                                out=sys.stdout)
            report(stats)
    except (ValueError, ChatFormatError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C in a chat
        sys.exit(1)
    mx.synchronize()  # the step started ahead is still running: with other ranks, let its all_sums finish


if __name__ == "__main__":
    main()
