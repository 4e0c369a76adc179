"""Experiments built on the trainer.

``python -m prada_fast.experiments.compare`` trains plain CoT distillation, domain-adversarial
distillation and full PRADA with the same steps, data and seeds (leave-one-domain-out), and
writes a report (markdown + JSON + PNG plots). ``--help`` explains every flag.
"""
from .analysis import aggregate, load_metrics, pca_2d, probe_accuracy

__all__ = ["aggregate", "load_metrics", "pca_2d", "probe_accuracy"]
