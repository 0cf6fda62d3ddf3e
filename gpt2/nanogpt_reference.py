"""The reference MLX is measured against: the same GPT in PyTorch, and nanoGPT's
Shakespeare-char training recipe (Karpathy's nanoGPT, config/train_shakespeare_char.py
with train.py).

    python gpt2/nanogpt_reference.py --data input.txt  # train to val <= 1.47, timed

The model is gpt2/model.py's GPT in PyTorch (tanh GELU, biases, tied head), so
benchmark.py times one architecture in both frameworks. The recipe is nanoGPT's: batches
of 64 windows of 256 characters at random offsets, AdamW (betas 0.9/0.99, weight decay
0.1 on matrices only, fused), learning rate 1e-3 with 100 warm-up steps and cosine decay
to 1e-4 at step 5000, gradient clipping at 1.0, dropout 0.2, bfloat16 autocast and
torch.compile. Only the evaluation differs: every --eval-interval steps (61, one epoch
of main.py) the mean loss over every non-overlapping window of the validation text,
exactly as main.py measures it, instead of 200 random batches.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


class TorchBlock(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.dropout = c["n_head"], c["dropout"]
        self.ln_1, self.ln_2 = tnn.LayerNorm(c["n_embd"]), tnn.LayerNorm(c["n_embd"])
        self.c_attn = tnn.Linear(c["n_embd"], 3 * c["n_embd"])
        self.attn_proj = tnn.Linear(c["n_embd"], c["n_embd"])
        self.c_fc = tnn.Linear(c["n_embd"], 4 * c["n_embd"])
        self.mlp_proj = tnn.Linear(4 * c["n_embd"], c["n_embd"])
        self.drop = tnn.Dropout(c["dropout"])

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in (q, k, v)
        )
        # Flash attention with dropout on the attention probabilities inside the kernel
        # (as nanoGPT).
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(
            self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        )


class TorchGPT(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte, self.wpe = (
            tnn.Embedding(c["vocab_size"], c["n_embd"]),
            tnn.Embedding(c["block_size"], c["n_embd"]),
        )
        self.drop = tnn.Dropout(c["dropout"])
        self.h = tnn.ModuleList(TorchBlock(c) for _ in range(c["n_layer"]))
        self.ln_f = tnn.LayerNorm(c["n_embd"])
        for (
            name,
            p,
        ) in self.named_parameters():  # GPT-2's initialisation, as nanoGPT and model.py
            if name.endswith("bias"):
                tnn.init.zeros_(p)
            elif p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * c["n_layer"])
                    if name.endswith("proj.weight")
                    else 0.02
                )
                tnn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.drop(
            self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        )
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied head
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1)
        )  # reshape: targets may be a slice


def make_step(model, optimizer, device, nanogpt=True, grad_clip=0.0):
    """step(x, y) -> loss: forward, backward and AdamW update. nanogpt=True is nanoGPT's
    way (bfloat16 autocast, torch.compile); False is plain eager float32."""
    forward = torch.compile(model) if nanogpt else model
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=nanogpt)

    def step(x, y):
        with autocast:
            loss = forward(x, y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def nanogpt_optimizer(model, lr, weight_decay, betas, device):
    """nanoGPT's configure_optimizers: weight decay on matrices only, fused AdamW on
    CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device == "cuda")


def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay_iters=5000):
    """nanoGPT's get_lr: linear warm-up, then cosine decay to min_lr at decay_iters."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, device):
    """Mean cross-entropy over every non-overlapping window of `data`, as main.py's
    evaluate."""
    model.eval()
    starts = np.arange(0, len(data) - block_size - 1, block_size)
    total = 0.0
    for i in range(0, len(starts), batch_size):
        index = starts[i : i + batch_size, None] + np.arange(block_size)
        x, y = (torch.from_numpy(data[index + s]).long().to(device) for s in (0, 1))
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            total += model(x, y).item() * len(index)
    model.train()
    return total / len(starts)


def race(
    data_path, target=1.47, max_iters=5000, eval_interval=61, device="cuda", seed=1337
):
    """Train with nanoGPT's recipe until the validation loss is <= target (or
    max_iters). Returns a list of (step, val, seconds since training started)."""
    text = Path(data_path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = {ch: i for i, ch in enumerate(chars)}
    data = np.array([ids[ch] for ch in text], dtype=np.int64)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    c = dict(
        vocab_size=len(chars),
        block_size=256,
        n_layer=6,
        n_head=6,
        n_embd=384,
        dropout=0.2,
    )
    batch_size = 64
    torch.manual_seed(seed)
    model = TorchGPT(c).to(device).train()
    optimizer = nanogpt_optimizer(model, 1e-3, 0.1, (0.9, 0.99), device)
    step = make_step(model, optimizer, device, nanogpt=True, grad_clip=1.0)
    rng = np.random.default_rng(seed)
    history, start = [], time.perf_counter()
    for it in range(1, max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it - 1)
        ix = rng.integers(
            0, len(train_data) - c["block_size"], batch_size
        )  # nanoGPT's get_batch
        index = ix[:, None] + np.arange(c["block_size"])
        x, y = (
            torch.from_numpy(train_data[index + s])
            .pin_memory()
            .to(device, non_blocking=True)
            for s in (0, 1)
        )
        step(x, y)
        if it % eval_interval == 0 or it == max_iters:
            val = evaluate(model, val_data, c["block_size"], batch_size, device)
            history.append((it, val, time.perf_counter() - start))
            print(f"step {it} | val = {val:.4f} | {history[-1][2]:.1f} s", flush=True)
            if val <= target:
                break
    return history


def main():
    parser = argparse.ArgumentParser(
        description="Train nanoGPT's Shakespeare-char recipe in PyTorch until a "
        "validation loss; print the wall time."
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="Tiny Shakespeare's input.txt (or any UTF-8 text)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=1.47,
        help="stop at this validation loss (default: 1.47)",
    )
    parser.add_argument(
        "--max-iters",
        type=int,
        default=5000,
        help="nanoGPT's step count (default: 5000)",
    )
    parser.add_argument(
        "--eval-interval",
        type=int,
        default=61,
        help="steps between evaluations (default: 61)",
    )
    args = parser.parse_args()
    if not (
        args.target > 0 and args.max_iters > 0 and args.eval_interval > 0
    ):  # NaN fails this too
        sys.exit("error: --target, --max-iters and --eval-interval must be above 0")
    if not torch.cuda.is_available():
        sys.exit(
            "error: nanoGPT's recipe (bfloat16 autocast, fused AdamW, flash attention) "
            "needs a CUDA GPU"
        )
    if not args.data.is_file():
        sys.exit(f"error: {args.data} does not exist")
    history = race(args.data, args.target, args.max_iters, args.eval_interval)
    step, val, seconds = history[-1]
    print(
        f"{'reached' if val <= args.target else 'did not reach'} val <= {args.target} "
        f"at step {step} after {seconds:.1f} s ({torch.cuda.get_device_name()})"
    )


if __name__ == "__main__":
    main()
