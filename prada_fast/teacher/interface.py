"""What the training step asks of a teacher (trainer/engines.py `micro_step`): the teacher's
arguments of the loss op for one micro-batch. Two kinds give them: a live teacher model
(`teacher.live.LiveTeacher`, its forward pass, under ZeRO-3 across ranks) and its outputs read from a
cache (`teacher.cache.TeacherOutputs`, `--teacher-outputs`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class TeacherSource(Protocol):
    """A teacher as the step sees it."""

    # ZeRO-3 partitioned parameters among the tensors `op_inputs` gives (the live teacher's
    # LM head weight): the step gathers them around the student's forward, which reads them
    partitioned: Sequence

    def op_inputs(self, mb: dict, device) -> dict:
        """The teacher arguments of `prada_loss` for the collated micro-batch `mb` (padded or
        packed rows): teacher_hidden + teacher_weight, or teacher_topk_ids +
        teacher_topk_logprobs."""
