"""Generate text with a converted Llama and its SentencePiece tokenizer.

    python llama/llama.py weights.npz tokenizer.model "Call me Ishmael. Some years ago never mind how long precisely"

Only the continuation goes to stdout, streamed as it is produced; timings and memory go to stderr,
so `> out.txt` captures just the text. Generation stops at the end-of-sequence token, after
--max-tokens tokens, or when the context is full.
"""

import argparse
import sys
import time

import mlx.core as mx

from model import WeightsError, load_model


class TokenizerError(Exception):
    pass


def load_tokenizer(path, vocab_size):
    """A SentencePiece processor for `path`, checked against the model's vocabulary size."""
    from sentencepiece import SentencePieceProcessor

    try:
        sp = SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"cannot load {path} as a SentencePiece model ({str(e).splitlines()[0]}); "
                             "Llama 1 and 2 ship one as tokenizer.model (Llama 3's tiktoken file is not one)") from None
    if sp.vocab_size() != vocab_size:
        raise TokenizerError(f"{path} has {sp.vocab_size()} tokens but the weights expect {vocab_size}; "
                             "use the tokenizer.model that came with the checkpoint")
    return sp


class StreamingDecoder:
    """Turn tokens into text as they arrive, with the spaces right.

    SentencePiece marks a word's leading space on the token ("▁world") and drops it from the first token
    of a decoded list, and a character split across byte tokens decodes only when it is complete. So
    decode the prompt plus everything generated, and print what is new beyond the text printed so far.
    """

    def __init__(self, sp, prompt_tokens):
        self.sp, self.tokens = sp, list(prompt_tokens)
        self.printed = len(sp.decode(self.tokens))

    def add(self, token):
        self.tokens.append(token)
        text = self.sp.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte token
            return ""
        return self.take(text)

    def flush(self):
        """Whatever is still held back (bytes that never formed a character print as \ufffd)."""
        return self.take(self.sp.decode(self.tokens))

    def take(self, text):
        """The part of `text` not printed yet; it counts as printed from now on."""
        new, self.printed = text[self.printed :], len(text)
        return new


def generate(model, sp, prompt, max_tokens, temp, top_p, out=sys.stdout):
    """Stream the continuation of `prompt` to `out`; return timing statistics."""
    prompt_tokens = [sp.bos_id()] + sp.encode(prompt)
    context = model.args.max_seq_len
    if len(prompt_tokens) >= context:
        raise ValueError(f"the prompt is {len(prompt_tokens)} tokens; the model's context is {context}, "
                         "which must also leave room for one new token")
    max_tokens = min(max_tokens, context - len(prompt_tokens))
    decoder = StreamingDecoder(sp, prompt_tokens)
    tic = time.perf_counter()
    n, prompt_seconds = 0, None
    for token in model.generate(mx.array(prompt_tokens), temp, top_p):
        if prompt_seconds is None:  # the first token comes out of the pass over the whole prompt
            prompt_seconds = time.perf_counter() - tic
            tic = time.perf_counter()
        if token == sp.eos_id() or n == max_tokens:
            break
        n += 1
        out.write(decoder.add(token))
        out.flush()
    generation_seconds = time.perf_counter() - tic
    out.write(decoder.flush() + "\n")
    return dict(prompt_tokens=len(prompt_tokens), prompt_seconds=prompt_seconds,
                generated_tokens=n, generation_seconds=generation_seconds)


def main():
    parser = argparse.ArgumentParser(description="Generate text with a converted Llama (see convert.py).")
    parser.add_argument("weights", help="the .npz or .safetensors file written by convert.py")
    parser.add_argument("tokenizer", help="the checkpoint's SentencePiece tokenizer.model")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-tokens", type=int, default=100, help="most tokens to generate (default: 100)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample only from the most likely tokens whose probabilities add up to this (default: 1, all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    args = parser.parse_args()
    if not args.prompt.strip():
        parser.error("the prompt is empty; give some text to continue")
    if args.max_tokens < 1 or args.temp < 0 or not 0 < args.top_p <= 1:
        parser.error("--max-tokens must be at least 1, --temp at least 0, and --top-p in (0, 1]")
    mx.random.seed(args.seed)

    tic = time.perf_counter()
    try:
        model = load_model(args.weights)
        sp = load_tokenizer(args.tokenizer, model.args.vocab_size)
    except (WeightsError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    load_seconds = time.perf_counter() - tic

    try:
        stats = generate(model, sp, args.prompt, args.max_tokens, args.temp, args.top_p)
    except ValueError as e:
        sys.exit(f"error: {e}")
    prompt_rate = stats["prompt_tokens"] / stats["prompt_seconds"]
    rate = stats["generated_tokens"] / stats["generation_seconds"] if stats["generated_tokens"] else 0.0
    print(f"[load {load_seconds:.2f} s | prompt {stats['prompt_tokens']} tokens, {prompt_rate:.1f} tokens/s | "
          f"generation {stats['generated_tokens']} tokens, {rate:.1f} tokens/s | "
          f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB]", file=sys.stderr)


if __name__ == "__main__":
    main()
