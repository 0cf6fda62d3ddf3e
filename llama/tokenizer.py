"""Llama's tokenizers, found from a file's content: SentencePiece, Meta's Llama 3 rank file, tokenizer.json.

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer("path/to/tokenizer.model", vocab_size=128256)  # or tokenizer.json, or a folder
    ids = tokenizer.prompt("The capital of France is")   # BOS and the text, as the family does it
    text = tokenizer.decode(ids)

- Llama 1 and 2 ship a SentencePiece `tokenizer.model` (a protobuf).
- Llama 3.x ship a `tokenizer.model` in tiktoken's format: one "base64(token bytes) rank" per line, 128,000
  byte sequences. Meta's tokenizer splits text with a regular expression (words, up to 3 digits, runs of
  punctuation or whitespace), then merges each piece's bytes by byte-pair encoding: repeatedly join the
  adjacent pair whose concatenation has the lowest rank. 256 special tokens follow from id 128,000. Here
  that file becomes a `tokenizers` (Rust) byte-level BPE, as transformers' TikTokenConverter builds it.
- Hugging Face folders ship `tokenizer.json` (run by the same library), with `tokenizer_config.json`
  (BOS/EOS names, the chat template) and `generation_config.json` (the ids that end a reply).

Text given to `encode` and `prompt` is always plain text: "<|eot_id|>" typed by a user is 7 ordinary
tokens, never the end-of-turn token, as in Meta's reference. Only chat formats insert special tokens.
"""

import base64
import json
import re
from pathlib import Path

# Meta's Llama 3 split pattern (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's Llama 3.1 special tokens, ids 128000 to 128255 (Llama 3.0 named 128008 and 128010 reserved).
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL_TOKENS))]
LLAMA3_STOP_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]


class TokenizerError(Exception):
    pass


class SentencePieceTokenizer:
    """Llama 1 and 2: BOS 1, EOS 2, and Meta's [INST] chat format."""

    kind, chat_format = "SentencePiece", "llama2"

    def __init__(self, path):
        from sentencepiece import SentencePieceProcessor

        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load {path} as a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = {self.eos_id}

    def encode(self, text):
        return self.sp.encode(text)

    def prompt(self, text):
        return [self.bos_id] + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


class BPETokenizer:
    """A byte-level BPE run by the `tokenizers` library: Llama 3's rank file or a Hugging Face tokenizer.json.

    chat_format is "template" (a Hugging Face chat_template, rendered by chat.py), "llama3" (Meta's header
    tokens) or None (no known format)."""

    def __init__(self, tokenizer, kind, stop_ids, chat_format=None, chat_template=None, special_tokens_map=None):
        self.tokenizer, self.kind, self.stop_ids = tokenizer, kind, set(stop_ids)
        self.chat_format, self.chat_template = chat_format, chat_template
        self.special_tokens_map = special_tokens_map or {}  # {"bos_token": "<|begin_of_text|>", ...} for templates
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id(self.special_tokens_map.get("bos_token"))

    def token_id(self, token):
        return self.tokenizer.token_to_id(token) if token else None

    def encode(self, text, special_tokens=False):
        """Plain text to ids; special_tokens=True reads "<|eot_id|>" etc. as those tokens (rendered templates)."""
        self.tokenizer.encode_special_tokens = not special_tokens
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, text):
        """BOS and the text: the tokenizer's own post-processor decides (tokenizer.json), or Meta's rule."""
        if self.kind == "Llama 3":
            return [self.bos_id] + self.encode(text)
        self.tokenizer.encode_special_tokens = True
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# ---- Meta's Llama 3 rank file -------------------------------------------------------------------


def read_ranks(path):
    """{token bytes: rank} from a tiktoken-format file, checked: ranks 0..n-1, every single byte present."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path} line {number} is not 'base64 rank'; is it a Llama 3 tokenizer.model?") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: the ranks are not 0 to {len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path} lacks {len(missing)} of the 256 single bytes, so some text could not be encoded")
    return ranks


def bytes_to_unicode():
    """GPT-2's table from the 256 byte values to printable characters, as byte-level BPE vocabularies use:
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def llama3_tokenizer(ranks, special_tokens=LLAMA3_SPECIAL_TOKENS):
    """The rank file as a tokenizers.Tokenizer that encodes exactly as tiktoken does with Meta's pattern.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE with a merge (a, b)
    for every way to split each token into two tokens, ordered by the token's rank, merges the same
    pairs in the same order. ignore_merges: a piece that is itself a token is that token, as in tiktoken."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    symbol = {token: token.decode("latin-1").translate(table) for token in ranks}  # bytes -> the table's characters
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    bpe = models.BPE({symbol[t]: rank for t, rank in ranks.items()}, [(symbol[a], symbol[b]) for a, b in merges],
                     ignore_merges=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # bytes to the table's characters
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def load_llama3(path):
    tokenizer = llama3_tokenizer(read_ranks(path))
    return BPETokenizer(tokenizer, "Llama 3", [tokenizer.token_to_id(t) for t in LLAMA3_STOP_TOKENS], "llama3",
                        special_tokens_map={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})


# ---- Hugging Face tokenizer.json ----------------------------------------------------------------


def read_json(path):
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None


def load_hf(path):
    """tokenizer.json, with tokenizer_config.json, chat_template.jinja and generation_config.json beside it."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"cannot load {path} as a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
    folder = path.parent
    config = read_json(folder / "tokenizer_config.json")
    # Token names may be strings or {"content": ...} objects.
    names = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items()
             if k.endswith("_token") and isinstance(v, (str, dict))}
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 saves the template apart
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    # A reply ends at every EOS id the generation config names (Llama 3.1: 128001, 128008, 128009).
    eos = read_json(folder / "generation_config.json").get("eos_token_id")
    stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.token_to_id(names.get("eos_token") or "") is not None:
        stop_ids.add(tokenizer.token_to_id(names["eos_token"]))
    if template:
        chat_format = "template"
    elif all(tokenizer.token_to_id(t) is not None for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        chat_format = "llama3"  # a Llama 3 tokenizer.json without a template: Meta's format
    else:
        chat_format = None
    return BPETokenizer(tokenizer, "Hugging Face", stop_ids, chat_format, template, names)


# ---- Finding the kind ---------------------------------------------------------------------------

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "tokenizer.model"]
KINDS = ("a SentencePiece tokenizer.model (Llama 1 and 2), Meta's Llama 3 tokenizer.model (a base64 token and "
         "a rank on each line), a Hugging Face tokenizer.json, or a folder holding one")


def resolve(source):
    """A local file or folder; a Hugging Face Hub name is fetched (its tokenizer files only)."""
    path = Path(source)
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(source), allow_patterns=TOKENIZER_FILES))
        except Exception as e:  # offline, gated, unknown name, ...
            raise TokenizerError(f"cannot get {source!r} from the Hugging Face Hub ({type(e).__name__}); "
                                 "pass a local tokenizer file or folder") from None
    raise TokenizerError(f"{source} does not exist; give {KINDS}")


def load_tokenizer(source, vocab_size=None):
    """The tokenizer in `source` (file, folder or Hub name), its kind found from the content, checked
    against the model's vocabulary size when one is given."""
    path = resolve(source)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()]
        if not found:
            raise TokenizerError(f"{path} has no tokenizer.json or tokenizer.model; give {KINDS}")
        path = found[0]
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip().startswith(b"{"):
        tokenizer = load_hf(path)
    elif re.match(rb"[A-Za-z0-9+/]+=* 0\r?\n", head):  # tiktoken: "IQ== 0" is byte 0x21 ("!") at rank 0
        tokenizer = load_llama3(path)
    elif head[:1] == b"\n":  # SentencePiece: a protobuf whose first field (the pieces) has tag 0x0a
        tokenizer = SentencePieceTokenizer(path)
    else:
        raise TokenizerError(f"cannot load {path}: it is not a tokenizer of a known kind; give {KINDS}")
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise TokenizerError(f"{path} has {tokenizer.vocab_size} tokens but the weights expect {vocab_size}; "
                             "use the tokenizer that came with the checkpoint")
    return tokenizer


# ---- Streaming ----------------------------------------------------------------------------------


class StreamingDecoder:
    """Turn tokens into text as they arrive, with the spaces right.

    A token's text can depend on its neighbours (SentencePiece drops the leading space of the first token
    decoded) and one character can span several byte tokens. So decode a short window that starts a few
    tokens back, and print what it adds beyond the same window without the new tokens; hold the text back
    while it ends in an incomplete UTF-8 sequence (decoded as \ufffd). Each step decodes a few tokens only.
    """

    def __init__(self, tokenizer, prompt_tokens):
        self.tokenizer, self.tokens = tokenizer, list(prompt_tokens)
        self.start = max(0, len(self.tokens) - 4)  # the window's first token: context for the new ones
        self.printed = len(self.tokens)  # tokens whose text has been printed

    def add(self, token):
        self.tokens.append(token)
        return self.take(hold_incomplete=True)

    def flush(self):
        """Whatever is still held back (bytes that never formed a character print as \ufffd)."""
        return self.take(hold_incomplete=False)

    def take(self, hold_incomplete):
        window = self.tokenizer.decode(self.tokens[self.start :])
        if hold_incomplete and window.endswith("\ufffd"):  # wait for the character's next byte token
            return ""
        new = window[len(self.tokenizer.decode(self.tokens[self.start : self.printed])) :]
        self.start, self.printed = max(self.start, self.printed - 4), len(self.tokens)
        return new
