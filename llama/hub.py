"""Files from the Hugging Face Hub, for a checkpoint (convert.py) or a tokenizer
(llama.py) given by name.

from hub import download
folder = download("meta-llama/Llama-3.1-8B-Instruct", ["tokenizer.json"], ValueError)
"""

import re
from pathlib import Path

# The files of a Hugging Face model folder that tokenizer.py reads (convert.py fetches
# them with the weights).
TOKENIZER_FILES = [
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
]


def is_hub_name(name):
    """A Hugging Face repository id: "name" or "org/name", not a path such as ./x, /x,
    ~/x or a/b/c."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name)) is not None and not str(
        name
    ).startswith(".")


def download(name, patterns, error, ignore=None):
    """The local folder of `name`'s files that match `patterns` (downloaded once, then
    from the cache); `error` (an exception class) with one line saying why when they
    cannot be had."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(name, allow_patterns=patterns, ignore_patterns=ignore)
        )
    except Exception as e:  # offline, gated, unknown name, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise error(
            f"cannot get {name!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{first}); pass a local folder or file instead"
        ) from None
