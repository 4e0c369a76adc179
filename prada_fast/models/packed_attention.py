"""Attention over packed rows (several sequences laid end to end in one row, each with
position ids restarting at 0), never across a sequence boundary:
- flash_attention_2: the rows are flattened into one, whose position ids give
  flash-attn's variable-length path its sequence boundaries;
- a model whose masks transformers builds (`masking_utils.create_causal_mask`, with
  sdpa, eager or flex attention): no 2-D mask, the position ids alone; transformers then
  builds a causal mask that is also block-diagonal over the runs of increasing positions;
- otherwise: an explicit block-diagonal causal 4-D mask (`block_causal_mask`).
tests/test_packing.py checks that each packed sequence's logits equal those of the
sequence run alone, for each of these paths that runs on the CPU. The rows themselves are
built by prada_fast.trainer.packing."""
from __future__ import annotations

import sys

import torch

def packed_next_targets(labels: torch.Tensor, attention_mask: torch.Tensor, seq_index: torch.Tensor,
                        ignore_index: int) -> torch.Tensor:
    """Each position's next-token target in packed rows: the next position's label when it
    belongs to the same sequence (`seq_index`), ignore_index for a sequence's last token,
    prompt slots and padding (attention_mask 0)."""
    targets = torch.full_like(labels, ignore_index)
    same = (seq_index[:, 1:] == seq_index[:, :-1]) & (attention_mask[:, :-1] != 0)
    targets[:, :-1] = torch.where(same, labels[:, 1:], targets[:, 1:])
    return targets


def position_runs(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, T) number of each position's run of consecutive position ids in its row (a
    new run wherever the id is not the previous one + 1), as transformers reads them."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, T, T) additive mask: 0 where query i may read key j (j <= i, the same
    run of `position_runs`), the dtype's lowest value elsewhere."""
    seg = position_runs(position_ids)
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


MODES = ("flash", "positions", "mask4d")


def attention_mode(model) -> str:
    """How packed rows are kept apart in `model` (a transformers model or its backbone);
    see the module docstring."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl.startswith("flash_attention"):
        return "flash"
    builds_masks = hasattr(sys.modules.get(type(model).__module__), "create_causal_mask")
    if builds_masks and impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return "positions"
    return "mask4d"


def backbone_forward(backbone, position_ids: torch.Tensor, mode: str | None = None, **inputs):
    """Last hidden states (rows, T, H) of `backbone` on packed rows (`inputs`: input_ids or
    inputs_embeds), no attention across sequences. mode: one of MODES (default:
    `attention_mode(backbone)`)."""
    mode = mode or attention_mode(backbone)
    if mode not in MODES:
        raise ValueError(f"packed attention mode {mode!r}: expected one of {MODES}")
    (name, x), = inputs.items()
    rows, T = position_ids.shape
    if mode == "flash":  # flash-attn's varlen path reads boundaries from one flattened row
        flat = x.reshape(1, rows * T, *x.shape[2:])
        out = backbone(**{name: flat}, position_ids=position_ids.reshape(1, -1), use_cache=False)
        return out.last_hidden_state.reshape(rows, T, -1)
    mask = None
    if mode == "mask4d":
        dtype = x.dtype if x.is_floating_point() else backbone.get_input_embeddings().weight.dtype
        mask = block_causal_mask(position_ids, dtype)
    out = backbone(**{name: x}, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state
