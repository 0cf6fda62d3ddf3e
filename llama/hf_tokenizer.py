"""A Hugging Face tokenizer.json, for tokenizer.py's load_tokenizer: the checkpoints of a Hugging Face folder.

from tokenizer import load_tokenizer
tokenizer = load_tokenizer("path/to/Llama-3.1-8B-Instruct")   # the folder, or its tokenizer.json
"""

import json

from tokenizer import TokenizerError


class HFTokenizer:
    """A Hugging Face tokenizer.json, run by the `tokenizers` library, with tokenizer_config.json (the special
    tokens' names) and generation_config.json (the ids that end a reply) beside it. chat.py reads the chat
    template from the same folder."""

    kind = "Hugging Face"

    def __init__(self, path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(
                f"cannot load {path} as a tokenizer.json ({str(e).splitlines()[0]})"
            ) from None
        self.folder, self.config = (
            path.parent,
            read_json(path.parent / "tokenizer_config.json"),
        )
        # {"bos_token": "<|begin_of_text|>", ...}: names may be strings or {"content": ...} objects.
        self.special_tokens_map = {
            k: v["content"] if isinstance(v, dict) else v
            for k, v in self.config.items()
            if k.endswith("_token") and isinstance(v, (str, dict))
        }
        # A reply ends at every EOS id the generation config names (Llama 3.1: 128001, 128008, 128009).
        eos = read_json(self.folder / "generation_config.json").get("eos_token_id")
        eos_ids = [
            *(eos if isinstance(eos, list) else [eos]),
            self.token_id(self.special_tokens_map.get("eos_token")),
        ]
        self.stop_ids = set(eos_ids) - {None}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token):
        return self.tokenizer.token_to_id(token) if token else None

    def encode(self, text, special_tokens=False):
        """Plain text to ids; special_tokens=True reads "<|eot_id|>" etc. as those tokens (rendered templates)."""
        self.tokenizer.encode_special_tokens = not special_tokens
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, text):
        """BOS and the text, as the tokenizer's own post-processor adds it."""
        self.tokenizer.encode_special_tokens = True
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def read_json(path):
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
