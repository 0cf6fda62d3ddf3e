"""A Hugging Face tokenizer.json, for tokenizer.py's load_tokenizer: the tokenizer of a
Hugging Face folder, with its tokenizer_config.json and generation_config.json.

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer("path/to/Llama-3.1-8B-Instruct")  # or its tokenizer.json
"""

import json


class HFTokenizer:
    """A tokenizer.json run by the `tokenizers` library, with tokenizer_config.json (the
    special tokens' names) and generation_config.json (the ids that end a reply) beside
    it. chat.py reads the chat template from the same folder. Errors are ValueErrors,
    which load_tokenizer reports."""

    kind = "Hugging Face"

    def __init__(self, path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(
                f"cannot load {path} as a tokenizer.json ({str(e).splitlines()[0]})"
            ) from None
        self.folder = path.parent
        self.config = read_json(self.folder / "tokenizer_config.json")
        # {"bos_token": "<|begin_of_text|>", ...}: a name or {"content": name}.
        self.special_tokens_map = {}
        for key, value in self.config.items():
            if isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                self.special_tokens_map[key] = value
        # A reply ends at every EOS id of the generation config (Llama 3.1: 128001,
        # 128008, 128009) and at the tokenizer's EOS token.
        generation_config = self.folder / "generation_config.json"
        eos = read_json(generation_config).get("eos_token_id", [])
        eos = eos if isinstance(eos, list) else [eos]
        if not all(type(i) is int for i in eos):
            raise ValueError(
                f"{generation_config}: eos_token_id must be a token id or a list of "
                f"them, not {eos!r}"
            )
        eos_token = self.token_id(self.special_tokens_map.get("eos_token"))
        self.stop_ids = set(eos) | ({eos_token} - {None})
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token):
        return self.tokenizer.token_to_id(token) if token else None

    def encode(self, text, special_tokens=False):
        """Plain text to ids; special_tokens=True reads "<|eot_id|>" etc. as those
        tokens (in rendered chat templates)."""
        self.tokenizer.encode_special_tokens = not special_tokens
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, text):
        """BOS and the text, as the tokenizer's own post-processor adds it."""
        self.tokenizer.encode_special_tokens = True
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def read_json(path):
    """The JSON object in `path`, or {} if there is no such file."""
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
