"""The live teacher: its forward pass on a micro-batch (one function, for the training step
and for `precompute_teacher`, which caches what it gives), and `LiveTeacher`, the teacher
model's engine as a `TeacherSource` (teacher/interface.py), which can keep each training
record's outputs in memory (`TeacherMemo`) so that the frozen teacher runs once per record
and run, not once per epoch."""
from __future__ import annotations

import torch

from prada_fast.common import distributed as dist_util
from prada_fast.models.packed_attention import backbone_forward
from prada_fast.teacher.cache import labelled_spans


def teacher_hidden(t_engine, mb: dict, device):
    """(final hidden states, output-head weight) of the teacher (`t_engine.module`, a causal
    LM) on the collated micro-batch `mb`, or (None, None) without a teacher. Packed rows
    (`teacher_position_ids` in mb): the same rows, sequences kept apart. The weight is a
    ZeRO-3 partition: gather it around its use."""
    if t_engine is None:
        return None, None
    teacher = t_engine.module
    with torch.no_grad():
        backbone = getattr(teacher, teacher.base_model_prefix)
        if "teacher_position_ids" in mb:  # packed rows: the same rows, sequences kept apart
            th = backbone_forward(backbone, mb["teacher_position_ids"].to(device),
                                  input_ids=mb["input_ids"].to(device))
        else:
            th = backbone(input_ids=mb["input_ids"].to(device),
                          attention_mask=mb["attention_mask"].to(device),
                          use_cache=False).last_hidden_state
    return th, teacher.get_output_embeddings().weight


class TeacherMemo:
    """The live teacher's final hidden states at each training record's labelled positions,
    by record (`cache.example_key`), in host memory up to `max_bytes`: what a hidden-state
    cache (`precompute_teacher --mode hidden`) holds on disk, gathered as the run goes. The
    teacher is frozen, so a record's rows are the same whichever batch computed them (up to
    float rounding: another batch shape may sum in another order)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.rows: dict[str, torch.Tensor] = {}
        self.full = False  # a record did not fit: it will be computed again each time

    def has_all(self, spans) -> bool:
        """Whether every example of `spans` (`cache.labelled_spans`) is kept."""
        return all(key in self.rows for _, _, key in spans)

    def add(self, spans, hidden: torch.Tensor) -> None:
        """Keep the rows of `hidden` (B x T x H, the teacher on this batch) of each new record."""
        for b, pos, key in spans:
            if key in self.rows:
                continue
            rows = hidden[b, pos.to(hidden.device)].detach().to("cpu", copy=True)
            size = rows.numel() * rows.element_size()
            if self.bytes + size > self.max_bytes:
                self.full = True
                continue
            self.rows[key] = rows
            self.bytes += size

    def hidden(self, mb: dict, spans, width: int, dtype, device) -> torch.Tensor:
        """The teacher_hidden argument for `mb` from memory: the kept rows at their
        positions, zeros elsewhere (rows the loss op never reads, as in the disk cache)."""
        out = torch.zeros(*mb["input_ids"].shape, width, dtype=dtype)
        for b, pos, key in spans:
            out[b, pos] = self.rows[key].to(dtype)
        return out.to(device)


class LiveTeacher:
    """A frozen teacher model's DeepSpeed engine (trainer/engines.py builds it) as the
    step's teacher: its hidden states on each micro-batch and its LM head weight, which
    the step gathers (`partitioned`) around the student's forward. With `memo_bytes` > 0 a
    micro-batch whose records the teacher has all seen before (on every rank) skips the
    teacher's forward and reads its rows from memory (`TeacherMemo`)."""

    def __init__(self, engine, memo_bytes: int = 0):
        self.engine = engine
        self.partitioned = [engine.module.get_output_embeddings().weight]
        self.memo = TeacherMemo(memo_bytes) if memo_bytes > 0 else None
        self.forwards = self.skipped = 0  # micro-batches run through the teacher / read from memory

    def op_inputs(self, mb: dict, device) -> dict:
        weight = self.partitioned[0]
        if self.memo is not None:
            spans = labelled_spans(mb)
            # ZeRO-3's teacher forward is a collective: every rank runs it, or none
            if not dist_util.any_rank(not self.memo.has_all(spans)):
                self.skipped += 1
                width = self.engine.module.config.hidden_size
                return {"teacher_hidden": self.memo.hidden(mb, spans, width, weight.dtype, device),
                        "teacher_weight": weight}
        th, tw = teacher_hidden(self.engine, mb, device)
        self.forwards += 1
        if self.memo is not None:
            self.memo.add(spans, th)
        return {"teacher_hidden": th, "teacher_weight": tw}
