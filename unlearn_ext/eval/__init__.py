"""Evaluation of unlearning: accuracies, membership inference, gaps to the retrained model, and the
deep-forgetting tests of OPC (METHODS.md 4.3): feature-mapping and fine-tuning recovery attacks,
linear CKA and linear probes of the penultimate features, and gradient inversion.

All functions are pure: a model passed in is run in eval mode under ``torch.no_grad()`` and its
parameters, buffers and ``training`` flags are left as they were (the fine-tuning attack trains a
deep copy; gradient inversion differentiates through the model in eval mode without writing ``.grad``).
"""

from unlearn_ext.eval.deep import DEEP_KEYS, deep_forgetting_metrics, take_samples
from unlearn_ext.eval.inversion import gradient_inversion, psnr, ssim, total_variation
from unlearn_ext.eval.mia import entropy_mia, loss_mia, mia_auc
from unlearn_ext.eval.predictions import (
    accuracy,
    accuracy_from_logits,
    entropy,
    per_sample_loss,
    predict,
    true_class_confidence,
)
from unlearn_ext.eval.recovery import (
    FeatureMap,
    feature_mapping_attack,
    feature_mapping_attacks,
    finetune_recovery_attack,
    fit_affine_map,
    fit_feature_map,
    fit_feature_maps,
)
from unlearn_ext.eval.representation import (
    CKAAccumulator,
    linear_cka,
    linear_cka_from_features,
    linear_probe_accuracy,
    penultimate_features,
)
from unlearn_ext.eval.summary import GAP_KEYS, SPLIT_NAMES, average_gap, evaluate

__all__ = [
    "GAP_KEYS",
    "SPLIT_NAMES",
    "CKAAccumulator",
    "DEEP_KEYS",
    "FeatureMap",
    "accuracy",
    "accuracy_from_logits",
    "average_gap",
    "deep_forgetting_metrics",
    "entropy",
    "entropy_mia",
    "evaluate",
    "feature_mapping_attack",
    "feature_mapping_attacks",
    "finetune_recovery_attack",
    "fit_affine_map",
    "fit_feature_map",
    "fit_feature_maps",
    "gradient_inversion",
    "linear_cka",
    "linear_cka_from_features",
    "linear_probe_accuracy",
    "loss_mia",
    "mia_auc",
    "penultimate_features",
    "per_sample_loss",
    "predict",
    "psnr",
    "ssim",
    "take_samples",
    "total_variation",
    "true_class_confidence",
]
