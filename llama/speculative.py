"""Faster decoding without changing a token: propose a few tokens cheaply, then check
them all in one pass of the model.

A decoding step costs about the same whether it reads 1 token or 6: the time goes to
reading the weights and to the host building and launching the step. So K proposed
tokens are checked in one pass over [last token, proposal 1, ..., proposal K]; the
model's own choice at each position says how many are kept, and the position after the
last one kept gives one more token. Two ways to propose (llama.py --prompt-lookup K,
--draft-model PATH):

- PromptLookup (n-gram speculation): the tokens that followed the latest earlier
  occurrence of the last `ngram_size` tokens, in the prompt or the reply. It pays where
  the reply copies its input (editing code, quoting a document, rewriting a paragraph).
- DraftModel: a small model with the same tokenizer proposes K tokens, one at a time.

Greedy decoding keeps a proposed token only if it is the model's argmax, so the text is
plain decoding's. Sampling keeps a proposed token x with probability min(1, p(x) / q(x))
and after a rejection samples from max(0, p - q), normalised (Leviathan et al. 2023;
Chen et al. 2023): p is the model's distribution, q the proposer's (a point mass for
prompt lookup), both with model.sample's temperature and top-p, so each token has the
distribution plain sampling gives it.

Pipelining. Building and launching a pass takes the host about as long as the device
takes to run it, so, as model.generate does, the host builds the next pass while the
device runs the current one; only then does it read the current one. The next pass
needs the current one's outcome: it starts from the model's token after the proposals
kept (taken lazily, on the device), at the position their number gives. So the host
guesses that number: all proposals kept if the last block kept all (prompt lookup's
copy goes on: the next proposals are known on the host), none otherwise (then the next
pass is a plain step on the model's own token). A wrong guess costs one pass: it is
dropped, the cache offsets are set back to the first position it wrote (positions
past an offset are never read), and the right pass is built from the tokens read,
the kept proposals it overwrote fed again. A draft
model's proposals come from the device, so its blocks are not built ahead.

    from speculative import PromptLookup, speculative_generate
    for token in speculative_generate(model, prompt_tokens, PromptLookup(10)):
        ...  # as model.generate: one int at a time, forever
"""

import mlx.core as mx
import numpy as np
from model import WeightsError, load_model, sample


class Proposer:
    """What both ways of proposing share: up to num_tokens proposals at a time, and the
    counts of tokens proposed and accepted since speculative_generate last started.
    propose(tokens, n, temp, top_p) gives (proposals, q); on_host: the proposals are a
    list (q a point mass on each, None), known before any pass runs."""

    on_host = True

    def __init__(self, num_tokens):
        self.num_tokens, self.proposed, self.accepted = num_tokens, 0, 0

    def ready(self, tokens):
        """Whether there is something to propose after `tokens`."""
        return True

    def summary(self):
        """What stderr's speed line adds: the share of the proposed tokens accepted."""
        share = self.accepted / max(self.proposed, 1)
        return f", {share:.0%} of {self.proposed} proposed accepted"


class PromptLookup(Proposer):
    """Propose the tokens that followed the last n-gram where it occurred before; while
    the sequence goes on copying that place, go on proposing from there."""

    def __init__(self, num_tokens, ngram_size=2):
        super().__init__(num_tokens)
        self.ngram_size = ngram_size
        self.tokens, self.index = None, {}  # n-gram -> the position that followed it

    def match(self, tokens):
        """The position whose tokens to propose after `tokens`, or None."""
        n = self.ngram_size
        if tokens is not self.tokens:  # another sequence: index it from its start
            self.tokens, self.index, self.indexed, self.copy = tokens, {}, n, None
        # Each n-gram followed by a token is indexed once: its latest occurrence wins.
        for i in range(self.indexed, len(tokens)):
            self.index[tuple(tokens[i - n : i])] = i
        self.indexed = max(self.indexed, len(tokens))
        if self.copy is not None:  # (where the last match pointed, the length then)
            start, length = self.copy
            copied = len(tokens) - length
            if tokens[length:] == tokens[start : start + copied]:
                return start + copied
        start = self.index.get(tuple(tokens[-n:]))
        self.copy = None if start is None else (start, len(tokens))
        return start

    def ready(self, tokens):
        return self.match(tokens) is not None

    def propose(self, tokens, n, temp, top_p):
        """(n proposed tokens, None: q is a point mass on each). A copy that reaches
        the end of `tokens` goes on copying what it copied: a repeating pattern goes on
        repeating."""
        start = self.match(tokens)
        period = len(tokens) - start
        return [tokens[start + i % period] for i in range(n)], None


class DraftModel(Proposer):
    """Propose the tokens a small model with the same tokenizer decodes next.

    The draft keeps its own key/value cache; each call keeps the cached positions that
    agree with the sequence (a rejected proposal, another chat turn are forgotten) and
    runs the draft on the rest."""

    on_host = False  # its proposals come from the device with the model's check

    def __init__(self, draft, num_tokens):
        super().__init__(num_tokens)
        self.model = draft
        self.cache, self.cached, self.last_proposal = draft.make_cache(), [], None

    def propose(self, tokens, n, temp, top_p):
        """(n proposed tokens, their distributions q (n, vocab) or None when greedy),
        lazily: the draft's n steps are evaluated with the model's check of them."""
        if self.last_proposal is not None:  # evaluated by now, with the model's check
            self.cached += self.last_proposal.tolist()[:-1]
        common = min(common_length(self.cached, tokens), len(tokens) - 1)
        for layer_cache in self.cache:
            layer_cache.offset = common  # forget the positions from there on
        rest = mx.array(tokens[common:])[None]
        logits = self.model(rest, self.cache, last_only=True)
        drafts, qs = [], []
        for i in range(n):
            if temp == 0:
                drafts.append(mx.argmax(logits[:, -1], axis=-1))
            else:
                qs.append(probabilities(logits[:, -1], temp, top_p))
                drafts.append(mx.random.categorical(mx.log(qs[-1])))
            if i < n - 1:  # the last proposal is fed next time, if it is kept
                logits = self.model(drafts[-1][:, None], self.cache)
        self.cached, self.last_proposal = list(tokens), mx.concatenate(drafts)
        return self.last_proposal, mx.concatenate(qs) if qs else None


def common_length(a, b):
    """How many leading tokens the lists a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.array(a[:n], np.int64) != np.array(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


def probabilities(logits, temp, top_p):
    """(T, vocab) logits -> the (T, vocab) distributions model.sample draws from:
    softmax(logits / temp) over the most likely tokens whose probabilities add up to
    top_p, normalised."""
    probs = mx.softmax(logits.astype(mx.float32) / temp, axis=-1)
    if top_p < 1.0:
        order = mx.argsort(-probs, axis=-1)  # most likely first
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # As model.sample: keep a token if those more likely add up to less than top_p.
        keep = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        keep = mx.take_along_axis(keep, mx.argsort(order, axis=-1), axis=-1)
        probs = mx.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def speculative_sampling(logits, drafts, q, temp, top_p):
    """(whether each proposal is kept, the token that follows i kept proposals for each
    i), lazily. Proposal i is kept with probability min(1, p_i(x) / q_i(x)); after a
    rejection the next token comes from max(0, p_i - q_i), normalised; after all n are
    kept, from p_n. All rows are sampled; the caller takes the first rejection's."""
    n = drafts.shape[0]
    p = probabilities(logits, temp, top_p)  # (n + 1, vocab)
    if q is None:  # prompt lookup: q_i is a point mass on the proposed token
        q = (mx.arange(p.shape[-1]) == drafts[:, None]).astype(mx.float32)
    rows = mx.arange(n)
    keep = mx.random.uniform(shape=(n,)) * q[rows, drafts] < p[rows, drafts]
    residual = mx.maximum(p[:n] - q, 0.0)
    # A rejection needs p < q somewhere: the residual is not 0 (rounding aside: use p).
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:n])
    choices = mx.random.categorical(mx.log(mx.concatenate([residual, p[n:]])))
    return keep, choices


class Pass:
    """A pass of the model started on the device and not read yet: over the tokens the
    cache lacked, the last of them the sequence's last token (at position `pos`), then
    n proposals. keep (n,): whether the model keeps each proposal (None without any);
    choices (n + 1,): its token after the last token and after each proposal; lazy."""

    def __init__(self, pos, drafts, keep, choices):
        self.pos, self.drafts, self.keep, self.choices = pos, drafts, keep, choices
        self.n = len(drafts)

    def read(self):
        """(how many proposals are kept, the tokens the pass gives: those proposals,
        then the model's next token). Waits for this pass, not for one started later."""
        if self.n == 0:
            return 0, [self.choices.item()]
        drafts = self.drafts
        if isinstance(drafts, mx.array):  # a draft model's, evaluated with the pass
            drafts = drafts.tolist()
        keep, choices = self.keep.tolist(), self.choices.tolist()
        kept = keep.index(False) if False in keep else self.n
        return kept, drafts[:kept] + [choices[kept]]


def start_pass(model, cache, inputs, drafts, q, temp, top_p):
    """Build the model's pass over `inputs` (1-D, the tokens the cache lacks: they go
    from position cache[0].offset to the sequence's last token), then over `drafts` (a
    list, or a draft model's lazy array) with their distributions q, and start it on
    the device. Without proposals it is a plain decoding step. Returns a Pass."""
    pos = cache[0].offset + inputs.shape[0] - 1
    n = len(drafts)
    if n == 0:
        logits = model(inputs[None], cache, last_only=True)[:, -1]
        choices = sample(logits, temp, top_p)
        mx.async_eval(choices)
        return Pass(pos, drafts, None, choices)
    proposed = mx.array(drafts) if isinstance(drafts, list) else drafts
    logits = model(mx.concatenate([inputs, proposed])[None], cache)[0, -n - 1 :]
    if temp == 0:  # keep the proposals up to the first that is not the argmax
        choices = mx.argmax(logits, axis=-1)
        keep = proposed == choices[:n]
    else:
        keep, choices = speculative_sampling(logits, proposed, q, temp, top_p)
    # An async_eval of its own: reading the pass then waits for it alone, not for the
    # pass built after it (that would be one graph with it), so the two overlap.
    mx.async_eval(proposed, keep, choices)
    return Pass(pos, drafts, keep, choices)


def start_known(model, cache, tokens, proposer, temp, top_p):
    """Start the pass over the tokens the cache lacks (from cache[0].offset on), with
    the proposer's proposals after them if it has some and they fit the context."""
    room = model.args.max_seq_len - len(tokens)  # proposals that fit
    n = min(proposer.num_tokens, room)
    drafts, q = [], None
    if n > 0 and proposer.ready(tokens):
        drafts, q = proposer.propose(tokens, n, temp, top_p)
    inputs = mx.array(tokens[cache[0].offset :])
    return start_pass(model, cache, inputs, drafts, q, temp, top_p)


def start_ahead(model, cache, tokens, pending, guess, proposer, temp, top_p):
    """Start the pass after `pending` as if `guess` of its proposals were kept, before
    pending is read: its first token is pending's choice after them, lazily. It
    proposes only if all are guessed kept: the proposals after `tokens` that go on past
    pending's, the first of them standing for that lazy token (a copy goes on). None
    past the context's end, or where proposals are not known on the host."""
    pos = pending.pos + 1 + guess  # the lazy token's position
    room = model.args.max_seq_len - 1 - pos  # proposals that fit
    if room < 0 or not proposer.on_host:
        return None
    skip = pending.n + 1  # pending's proposals and the lazy token
    n = min(proposer.num_tokens, room)
    drafts = []
    if guess == pending.n and n > 0 and proposer.ready(tokens):
        drafts = proposer.propose(tokens, skip + n, temp, top_p)[0][skip:]
    for layer_cache in cache:
        layer_cache.offset = pos  # pending's guessed rejections are overwritten
    token = pending.choices[guess : guess + 1]
    return start_pass(model, cache, token, drafts, None, temp, top_p)


def speculative_generate(
    model, prompt, proposer, temp=0.0, top_p=1.0, cache=None, context=()
):
    """Yield the next token (an int) after `prompt` (a list of ints), forever, as
    model.generate does, checking what `proposer` proposes a block at a time; the caller
    decides when to stop. With `cache`, the prompt continues `context`, the tokens the
    cache holds. proposer.proposed and .accepted count the proposals. No proposal goes
    past the context's end (model.args.max_seq_len).

    When the caller stops after a token, the cache holds the prompt and every token
    before it; cache[0].offset may count more (a block's kept tokens enter the cache
    together, and the pass under way its proposals): a caller keeps the tokens it has
    up to cache[0].offset."""
    cache = model.make_cache() if cache is None else cache
    proposer.proposed = proposer.accepted = 0
    tokens = [*context, *prompt]
    # The first token: one pass over the prompt, as model.generate.
    logits = model(mx.array(prompt)[None], cache, last_only=True)[:, -1]
    tokens.append(sample(logits, temp, top_p).item())
    yield tokens[-1]
    pending, all_kept = None, False  # at first, guess a plain step: cheap if wrong
    while True:
        if pending is None:  # the cache holds tokens[: cache[0].offset]
            pending = start_known(model, cache, tokens, proposer, temp, top_p)
        # While the device runs `pending`, the host builds the pass after it on a
        # guess: a block keeps all its proposals if the last block did, else none.
        guess = pending.n if all_kept else 0
        ahead = start_ahead(model, cache, tokens, pending, guess, proposer, temp, top_p)
        kept, new = pending.read()
        if pending.n > 0:
            proposer.proposed += pending.n
            proposer.accepted += kept
            all_kept = kept == pending.n
        if ahead is not None and kept == guess:
            pending = ahead
        else:  # drop `ahead`: it wrote the cache from pending.pos + 1 + guess on
            valid = kept if ahead is None else min(kept, guess)
            for layer_cache in cache:
                layer_cache.offset = pending.pos + 1 + valid
            pending = None
        for token in new:
            tokens.append(token)
            yield token


def proposer_for(args, model):
    """The proposer llama.py's flags ask for: --prompt-lookup K [--ngram-size N], or
    --draft-model PATH [--num-draft-tokens K]. A draft must share the model's vocabulary
    size."""
    if args.prompt_lookup:
        return PromptLookup(args.prompt_lookup, args.ngram_size)
    draft = load_model(args.draft_model)
    if draft.args.vocab_size != model.args.vocab_size:
        raise WeightsError(
            f"the draft model's vocabulary has {draft.args.vocab_size} tokens, the "
            f"model's {model.args.vocab_size}: a draft must use the model's tokenizer"
        )
    return DraftModel(draft, args.num_draft_tokens)
