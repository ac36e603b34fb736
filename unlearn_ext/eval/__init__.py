"""Evaluation of unlearning: accuracies, membership inference, and gaps to the retrained model.

All functions are pure: a model passed in is run in eval mode under ``torch.no_grad()`` and its
parameters, buffers and ``training`` flags are left as they were.
"""

from unlearn_ext.eval.mia import entropy_mia, loss_mia, mia_auc
from unlearn_ext.eval.predictions import (
    accuracy,
    accuracy_from_logits,
    entropy,
    per_sample_loss,
    predict,
    true_class_confidence,
)
from unlearn_ext.eval.summary import GAP_KEYS, SPLIT_NAMES, average_gap, evaluate

__all__ = [
    "GAP_KEYS",
    "SPLIT_NAMES",
    "accuracy",
    "accuracy_from_logits",
    "average_gap",
    "entropy",
    "entropy_mia",
    "evaluate",
    "loss_mia",
    "mia_auc",
    "per_sample_loss",
    "predict",
    "true_class_confidence",
]
