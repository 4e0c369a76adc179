"""The soft prompt's reparametrisation during training, as in P-tuning (Liu et al. 2021,
"GPT Understands, Too"): the K prompt vectors are not trained directly but produced by a
small encoder from K free input vectors, which couples them and smooths their updates.

    none:  prompt = E                                   (E: the K x H free vectors)
    mlp:   prompt = W2 relu(W1 E)                       (H -> h -> H, row by row)
    lstm:  prompt = W2 relu(W1 BiLSTM(E))               (2 layers, h per direction)

The encoder exists only while training: the export bakes its output into plain vectors,
so a final/ directory loads as a model with `none`. PEFT's PromptEncoder is the same idea;
it is built from a PEFT config around a PEFT model's embedding, which our forward (prompt
in front of `inputs_embeds`, ZeRO-3 gathering by module) does not have, so it is written
here in a few lines.
"""
from __future__ import annotations

import torch
from torch import nn

PROMPT_ENCODERS = ("none", "mlp", "lstm")


class PromptEncoder(nn.Module):
    """(K, H) free vectors -> (K, H) prompt vectors, through an MLP or a BiLSTM + MLP."""

    def __init__(self, hidden: int, kind: str, width: int = 0):
        super().__init__()
        if kind not in PROMPT_ENCODERS[1:]:
            raise ValueError(f"prompt encoder {kind!r}: expected one of {PROMPT_ENCODERS[1:]}")
        self.kind = kind
        width = width or hidden
        if kind == "lstm":
            self.lstm = nn.LSTM(hidden, width, num_layers=2, bidirectional=True, batch_first=True)
        self.inner = nn.Linear(2 * width if kind == "lstm" else hidden, width)
        self.out = nn.Linear(width, hidden)

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        x = free
        if self.kind == "lstm":
            x = self.lstm(free.unsqueeze(0))[0].squeeze(0)
        return self.out(torch.relu(self.inner(x)))
