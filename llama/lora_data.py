"""LoRA's data: .jsonl files read, checked and tokenized, then batched.

A data folder holds train.jsonl, valid.jsonl and, for --test, test.jsonl: one JSON
object per line,
    {"text": "The quick brown fox."}                  BOS, the text, EOS
    {"prompt": "What is 2 + 2?", "completion": " 4."}   BOS, prompt, completion, EOS
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]}
The messages are put in the model's chat format (chat.py, as llama.py --chat does). Each
token but the first counts in the loss, or with --mask-prompt only the completions and
the assistant's replies (each with its end-of-turn token).

    python llama/lora_data.py data    # writes an example data folder (sums to complete)
"""

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from chat import ChatFormatError, chat_tokens
from tokenizer import TokenizerError

PAD_MULTIPLE = 32  # few shapes, so a compiled step is rarely compiled again


class DataError(TokenizerError):
    """A data file that is missing, empty, or has a line that cannot be tokenized for
    training."""


def messages_problem(messages):
    """What is wrong with a "messages" list, or None."""
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        return (
            '"messages" is not a non-empty list of {"role": ..., "content": ...} '
            "objects with string values"
        )
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    if roles[:2] != ["user", "assistant"] or roles != [
        ("user", "assistant")[i % 2] for i in range(len(roles))
    ]:
        return (
            "the roles must go (system,) user, assistant, user, assistant, ... with at "
            "least one assistant reply"
        )
    return None


def example_problem(example):
    """What is wrong with one line's object, or None."""
    keys = example.keys() if isinstance(example, dict) else set()
    if "text" in keys:
        if isinstance(example["text"], str) and example["text"]:
            return None
        return '"text" is not a non-empty string'
    if {"prompt", "completion"} <= keys:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) and isinstance(completion, str) and completion:
            return None
        return '"prompt" and "completion" are not strings, the completion non-empty'
    if "messages" in keys:
        return messages_problem(example["messages"])
    return (
        'expected an object with "text", with "prompt" and "completion", or "messages"'
    )


def read_jsonl(path):
    """[(line number, object)] of a .jsonl file (blank lines skipped); DataError naming
    the first bad line."""
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; --data must be a folder with train.jsonl and "
            "valid.jsonl (and test.jsonl for --test): python llama/lora_data.py "
            f"{path.parent} writes an example one"
        )
    examples = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line.decode("utf-8"))
                # a lone surrogate ("\ud800") is valid JSON but not text
                json.dumps(example, ensure_ascii=False).encode("utf-8")
            except UnicodeError:
                raise DataError(f"{path} line {number} is not UTF-8 text") from None
            except (ValueError, RecursionError) as e:
                reason = "it nests too deeply" if isinstance(e, RecursionError) else e
                raise DataError(f"{path} line {number} is not JSON: {reason}") from None
            problem = example_problem(example)
            if problem:
                raise DataError(f"{path} line {number}: {problem}")
            examples.append((number, example))
    if not examples:
        raise DataError(
            f"{path} is empty; write one JSON object per line (lora.py --help)"
        )
    return examples


def eos_id(tokenizer):
    """The id that ends a text: SentencePiece's EOS, Llama 3's <|end_of_text|>, a
    tokenizer.json's eos_token."""
    if tokenizer.kind == "SentencePiece":
        return tokenizer.eos_id
    if tokenizer.kind == "Llama 3":
        return tokenizer.token_id("<|end_of_text|>")
    return tokenizer.token_id(tokenizer.special_tokens_map.get("eos_token"))


def conversation(tokenizer, messages):
    """(tokens, [is an assistant's token]) of a whole conversation in the tokenizer's
    chat format. chat.py's chat_tokens gives the tokens up to where a reply begins; the
    conversation with one more user message gives them all, and each reply runs from its
    beginning to its first stop token, inclusive."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    tokens = chat_tokens(tokenizer, messages + [{"role": "user", "content": "."}])
    assistant, end = [False] * len(tokens), 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = chat_tokens(tokenizer, messages[:i])
        start = len(prefix)
        stops = [
            j for j in range(start, len(tokens)) if tokens[j] in tokenizer.stop_ids
        ]
        if tokens[:start] != prefix or not stops:
            raise TokenizerError(
                "this chat format does not give each reply as the continuation of the "
                "conversation before it, ended by a stop token; train on "
                "prompt/completion lines"
            )
        end = stops[0] + 1
        assistant[start:end] = [True] * (end - start)
    return tokens[:end], assistant[:end]


def encode(example, tokenizer, mask_prompt):
    """(token ids, [does the token count in the loss]) of one example."""
    eos = [eos_id(tokenizer)]
    if eos[0] is None:
        eos = []
    if "text" in example:
        tokens = tokenizer.prompt(example["text"]) + eos
        return tokens, [True] * len(tokens)
    if "prompt" in example:
        prompt = tokenizer.prompt(example["prompt"])
        completion = tokenizer.encode(example["completion"]) + eos
        counted = [not mask_prompt] * len(prompt) + [True] * len(completion)
        return prompt + completion, counted
    tokens, assistant = conversation(tokenizer, example["messages"])
    return tokens, [a or not mask_prompt for a in assistant]


def encode_line(path, number, example, tokenizer, mask_prompt):
    """encode(), with DataError naming the line for anything it cannot train on."""
    if mask_prompt and "text" in example:
        raise DataError(
            f'{path} line {number}: --mask-prompt needs "prompt"/"completion" or '
            '"messages" lines, not "text" (every token of a text counts)'
        )
    try:
        tokens, counted = encode(example, tokenizer, mask_prompt)
    except ChatFormatError as e:  # chat.py's advice is for llama.py: keep its reason
        reason = str(e).split("; ")[0]
        raise DataError(
            f"{path} line {number}: {reason}; give text or prompt/completion lines"
        ) from None
    except TokenizerError as e:
        raise DataError(f"{path} line {number}: {e}") from None
    if len(tokens) < 2:
        raise DataError(
            f"{path} line {number} gives {len(tokens)} token(s); an example needs at "
            "least two (does the chat template render this conversation to nothing?)"
        )
    return tokens, counted


def load_data(path, tokenizer, mask_prompt, max_length):
    """[(tokens, counted)] of a .jsonl file, each cut to `max_length` tokens; examples
    left with no counted token are dropped. Says what it holds."""
    examples, cut, dropped = [], 0, 0
    for number, example in read_jsonl(path):
        tokens, counted = encode_line(path, number, example, tokenizer, mask_prompt)
        cut += len(tokens) > max_length
        tokens, counted = tokens[:max_length], counted[:max_length]
        if any(counted[1:]):  # the first token is never predicted
            examples.append((tokens, counted))
        else:
            dropped += 1
    if not examples:
        raise DataError(
            f"{path}: no token counts in the loss (each completion cut off at "
            f"{max_length} tokens?)"
        )
    n_tokens = sum(len(t) for t, _ in examples)
    n_counted = sum(sum(c[1:]) for _, c in examples)
    notes = f"; {cut} longer than {max_length} tokens, cut there" if cut else ""
    if dropped:
        notes += f"; {dropped} left out, no token of theirs counted after the cut"
    print(
        f"{path}: {len(examples)} examples, {n_tokens} tokens, {n_counted} of them "
        f"counted in the loss{notes}",
        flush=True,
    )
    return examples


def batch_indices(examples, batch_size, drop_last):
    """Lists of `batch_size` indices of examples of similar length (sorted by length,
    cut in order)."""
    order = np.argsort([len(t) for t, _ in examples], kind="stable")
    end = len(order) - batch_size + 1 if drop_last else len(order)
    return [order[i : i + batch_size] for i in range(0, max(end, 0), batch_size)]


def pad(batch):
    """(inputs, targets, mask), each (B, T), for [(tokens, counted)]: T is the longest
    example's length - 1, rounded up to a multiple of PAD_MULTIPLE; padding has mask 0.
    """
    longest = max(len(t) for t, _ in batch) - 1
    T = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
    tokens = np.zeros((len(batch), T + 1), np.int32)
    mask = np.zeros((len(batch), T), np.float32)
    for row, (t, counted) in enumerate(batch):
        tokens[row, : len(t)] = t
        mask[row, : len(t) - 1] = counted[1:]  # target j is token j + 1
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)


def write_example_data(folder, seed=0):
    """train.jsonl (1,000 lines), valid.jsonl and test.jsonl (100 each) of
    prompt/completion sums, "What is 27 + 38?" " 65.": a task a small model learns in a
    few hundred steps."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 1000), ("valid", 100), ("test", 100)):
        lines = []
        for a, b in rng.integers(0, 100, (n, 2)).tolist():
            example = {"prompt": f"What is {a} + {b}?", "completion": f" {a + b}."}
            lines.append(json.dumps(example) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(lines))
    print(f"wrote {folder}/train.jsonl, valid.jsonl and test.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python llama/lora_data.py FOLDER  (writes example data there)")
    try:
        write_example_data(Path(sys.argv[1]))
    except OSError as e:
        sys.exit(f"error: cannot write {e.filename or sys.argv[1]}: {e.strerror}")
