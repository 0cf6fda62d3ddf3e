"""Chat formats: a conversation (a list of {"role", "content"} messages) as the token ids a model was
tuned on, ending where the assistant's reply begins.

- Llama 2 (SentencePiece): Meta's `[INST] ... [/INST]`, the system message inside the first one
  between <<SYS>> and <</SYS>>, each finished exchange wrapped in BOS ... EOS.
- Llama 3: Meta's header tokens, <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>.
- Hugging Face folders: the chat_template of tokenizer_config.json (Jinja), rendered as transformers
  renders it, then tokenized reading the special tokens in it.

    from chat import chat_tokens
    ids = chat_tokens(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
"""

import json
from datetime import datetime


class ChatFormatError(Exception):
    pass


def llama2_chat(tokenizer, messages):
    """Meta's Llama 2 chat_completion: the roles must go (system,) user, assistant, user, ..., user."""
    if messages[0]["role"] == "system":
        first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
        messages = [{"role": "user", "content": first}] + messages[2:]
    ids = []
    for user, answer in zip(messages[::2], messages[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    return ids + [tokenizer.bos_id] + tokenizer.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]")


def llama3_chat(tokenizer, messages):
    """Meta's Llama 3 ChatFormat.encode_dialog_prompt."""
    special = tokenizer.token_id

    def header(role):
        return [special("<|start_header_id|>")] + tokenizer.encode(role) + [special("<|end_header_id|>")] + tokenizer.encode("\n\n")

    ids = [special("<|begin_of_text|>")]
    for message in messages:
        ids += header(message["role"]) + tokenizer.encode(message["content"].strip()) + [special("<|eot_id|>")]
    return ids + header("assistant")


def render_template(template, messages, special_tokens_map):
    """A Hugging Face chat template rendered as transformers' apply_chat_template renders it (a sandboxed
    Jinja environment that trims blocks, with its tojson, raise_exception and strftime_now)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatFormatError(f"the chat template refuses this conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens_map)
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"cannot render the chat template: {e}") from None


def chat_tokens(tokenizer, messages):
    """The conversation's token ids in the tokenizer's chat format, ready for the assistant's reply."""
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if (not roles or roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2])
            or roles[-1] != "user"):
        raise ChatFormatError("a conversation alternates user and assistant messages and ends with the user's")
    if tokenizer.chat_format == "llama2":
        return llama2_chat(tokenizer, messages)
    if tokenizer.chat_format == "llama3":
        return llama3_chat(tokenizer, messages)
    if tokenizer.chat_format == "template":
        return tokenizer.encode(render_template(tokenizer.chat_template, messages, tokenizer.special_tokens_map),
                                special_tokens=True)
    raise ChatFormatError(f"this {tokenizer.kind} tokenizer has no known chat format (no chat_template in "
                          "tokenizer_config.json or chat_template.jinja beside it); use it without --chat")
