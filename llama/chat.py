"""`llama.py --chat`: a conversation (a list of {"role", "content"} messages) as the
token ids a model was tuned on, ending where the assistant's reply begins, and the loop
that keeps one key/value cache for it.

- Llama 2 (SentencePiece): Meta's `[INST] ... [/INST]`, the system message inside the
  first one between <<SYS>> and <</SYS>>, each finished exchange wrapped in BOS ... EOS.
- Llama 3: Meta's header tokens,
  <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>.
- Hugging Face folders: the chat template (chat_template.jinja, or
  tokenizer_config.json's chat_template), rendered as transformers renders it, then
  tokenized reading the special tokens in it; a Llama 3 tokenizer.json without one gets
  Meta's format.

    from chat import chat_tokens
    system = {"role": "system", "content": "Be brief."}
    ids = chat_tokens(tokenizer, [system, {"role": "user", "content": "Hi"}])
"""

import json
import os
import sys
from datetime import datetime

from tokenizer import TokenizerError

LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class ChatFormatError(TokenizerError):
    """A tokenizer without a known chat format, or a template that refuses the
    conversation."""


def llama2_chat(tokenizer, messages):
    """Meta's Llama 2 chat_completion: the roles must go (system,) user, assistant,
    user, ..., user."""
    roles = [m["role"] for m in messages]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ChatFormatError(
            "Llama 2's chat format needs the roles (system,) user, assistant, user, "
            f"..., user, not {', '.join(m['role'] for m in messages)}"
        )
    if messages[0]["role"] == "system":
        first = (
            f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
        )
        messages = [{"role": "user", "content": first}] + messages[2:]
    ids = []
    for user, answer in zip(messages[::2], messages[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    return (
        ids
        + [tokenizer.bos_id]
        + tokenizer.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]")
    )


def llama3_chat(tokenizer, messages):
    """Meta's Llama 3 ChatFormat.encode_dialog_prompt."""
    start, end, eot = (tokenizer.token_id(token) for token in LLAMA3_HEADER_TOKENS)

    def header(role):
        return [start] + tokenizer.encode(role) + [end] + tokenizer.encode("\n\n")

    ids = [tokenizer.token_id("<|begin_of_text|>")]
    for message in messages:
        ids += (
            header(message["role"])
            + tokenizer.encode(message["content"].strip())
            + [eot]
        )
    return ids + header("assistant")


def hf_template(tokenizer):
    """A Hugging Face tokenizer's chat template (transformers >= 4.43 saves it apart),
    or None; read again for each turn, as a file of a few kilobytes."""
    jinja = tokenizer.folder / "chat_template.jinja"
    try:
        template = (
            jinja.read_text()
            if jinja.is_file()
            else tokenizer.config.get("chat_template")
        )
    except (OSError, ValueError) as e:  # not UTF-8 text, say
        raise ChatFormatError(f"cannot read {jinja}: {e}") from None
    if isinstance(template, list):  # several named templates: the default one
        named = [t for t in template if isinstance(t, dict)]
        default = [t.get("template") for t in named if t.get("name") == "default"]
        if not default:
            raise ChatFormatError(
                f"the chat_template of {tokenizer.folder} is a list without a "
                'template named "default"'
            )
        template = default[0]
    if template is not None and not isinstance(template, str):
        raise ChatFormatError(
            f"the chat_template of {tokenizer.folder} must be text, not {template!r}"
        )
    return template


def render_template(template, messages, special_tokens_map):
    """A Hugging Face chat template rendered as transformers' apply_chat_template
    renders it (a sandboxed Jinja environment that trims blocks, with its tojson,
    raise_exception and strftime_now)."""
    import jinja2.ext  # a submodule: `import jinja2` alone does not load it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatFormatError(f"the chat template refuses this conversation: {message}")

    class AssistantTracker(jinja2.ext.Extension):
        """transformers' {% generation %} ... {% endgeneration %}, which marks the
        assistant's text for training: rendered as its body, as transformers does."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[AssistantTracker, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: (
        json.dumps(
            x,
            ensure_ascii=False,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )
    )
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
    )
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, **special_tokens_map
        )
    except ChatFormatError:
        raise
    except Exception as e:  # a template's own error: 1/0, range(10**8), a bad tag
        raise ChatFormatError(f"cannot render the chat template: {e!r}") from None


def chat_tokens(tokenizer, messages):
    """The conversation's token ids in the tokenizer's chat format, ready for the
    assistant's reply. The roles go (system,) user, assistant, user, ..., user."""
    if tokenizer.kind == "SentencePiece":
        return llama2_chat(tokenizer, messages)
    template = hf_template(tokenizer) if tokenizer.kind == "Hugging Face" else None
    if template:
        text = render_template(template, messages, tokenizer.special_tokens_map)
        ids = tokenizer.encode(text, special_tokens=True)
        if not ids:
            raise ChatFormatError(
                "the chat template renders this conversation to no tokens"
            )
        return ids
    if all(tokenizer.token_id(t) is not None for t in LLAMA3_HEADER_TOKENS):
        return llama3_chat(tokenizer, messages)
    raise ChatFormatError(
        f"this {tokenizer.kind} tokenizer has no known chat format (no chat_template "
        "in tokenizer_config.json or chat_template.jinja beside it); give it plain "
        "text, not --chat or messages"
    )


def chat(model, tokenizer, reply, prompt=None, system=None, lines=None):
    """A conversation in the tokenizer's chat format: one reply to `prompt`, or, without
    one, a reply to each line read from `lines` (stdin) until its end (Ctrl-D at a
    terminal). reply(tokens, cache, context) is llama.py's generate: it streams the
    reply to `tokens`, which continue `context`, the tokens in `cache`.

    The key/value cache stays between turns. Each turn formats the whole conversation
    again, keeps the cached positions that agree with it (normally everything so far),
    and runs the model on the rest: a turn costs its new tokens, and the model always
    sees exactly the format's tokens."""
    messages = [{"role": "system", "content": system}] if system else []
    cache, cached = (
        model.make_cache(),
        [],
    )  # cached: the tokens whose keys and values the cache holds
    for text in (
        [prompt] if prompt is not None else user_lines(lines or sys.stdin.buffer)
    ):
        messages.append({"role": "user", "content": text})
        tokens = chat_tokens(tokenizer, messages)
        common = len(
            os.path.commonprefix([cached, tokens[:-1]])
        )  # leading tokens equal in both lists
        for layer_cache in cache:
            layer_cache.offset = (
                common  # forget the positions from the first that differs on
            )
        answer, generated = reply(tokens[common:], cache, tokens[:common])
        cached = (tokens + generated)[: cache[0].offset]  # what the cache really holds
        messages.append({"role": "assistant", "content": tokenizer.decode(answer)})


def user_lines(lines):
    """The lines of `lines` that are not blank, each asked for by "> " on stderr; UTF-8
    text only."""
    print("> ", end="", file=sys.stderr, flush=True)
    try:
        for line in lines:
            # Bytes are decoded line by line (a text stdin decodes ahead, so a bad line
            # would spoil those before it); a text line that was not UTF-8 holds lone
            # surrogates, which cannot be encoded.
            line = line.decode() if isinstance(line, bytes) else line
            line.encode()
            if line.strip():
                yield line.rstrip("\n")
            print("> ", end="", file=sys.stderr, flush=True)
    except UnicodeError:
        print(file=sys.stderr)  # after the "> "
        raise ChatFormatError(
            "a line on stdin is not UTF-8 text; the chat ends"
        ) from None
    print(file=sys.stderr)
