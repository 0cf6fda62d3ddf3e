"""The CUDA dropout kernels, switched on from outside the model: main.py (and benchmark.py) call
use_dropout_kernels(model) when they train on an NVIDIA GPU, as llama/tp.py swaps classes.

model.py's GPT drops out with mlx.nn's Dropout: its residual and embedding dropouts, and
AttentionDropout, the dropout of the attention probabilities (dropout(causal_softmax(scores))).
Here each nn.Dropout becomes dropout.py's Dropout, whose mask is drawn inside one Philox kernel,
and each AttentionDropout becomes attention_dropout.py's, the causal softmax and the dropout in one
kernel each way. Measured on an H100 at nanoGPT's size (benchmark.py --ablation): 13% of the
training step. On the CPU and on Apple GPUs the swapped modules compute what the model's do.
"""

import mlx.nn as nn
import model
from attention_dropout import AttentionDropout
from dropout import Dropout

KERNEL_CLASS = {nn.Dropout: Dropout, model.AttentionDropout: AttentionDropout}


def use_dropout_kernels(gpt):
    """Swap every dropout module of `gpt` for its kernel class, with the same p and train/eval mode."""
    for _, module in gpt.named_modules():
        for name, child in list(module.items()):
            if type(child) in KERNEL_CLASS:
                module[name] = KERNEL_CLASS[type(child)](
                    1 - child._p_1
                )  # nn.Dropout keeps 1 - p as _p_1
                module[name].train(child.training)
    return gpt
