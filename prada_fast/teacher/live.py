"""The live teacher: its forward pass on a micro-batch (one function, for the training step
and for `precompute_teacher`, which caches what it gives), and `LiveTeacher`, the teacher
model's engine as a `TeacherSource` (teacher/interface.py)."""
from __future__ import annotations

import torch

from prada_fast.models.packed_attention import backbone_forward


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


class LiveTeacher:
    """A frozen teacher model's DeepSpeed engine (trainer/engines.py builds it) as the
    step's teacher: its hidden states on each micro-batch and its LM head weight, which
    the step gathers (`partitioned`) around the student's forward."""

    def __init__(self, engine):
        self.engine = engine
        self.partitioned = [engine.module.get_output_embeddings().weight]

    def op_inputs(self, mb: dict, device) -> dict:
        th, tw = teacher_hidden(self.engine, mb, device)
        return {"teacher_hidden": th, "teacher_weight": tw}
