"""Models: the bundled small classifiers (MLP, CNN) with mnemonic codes and checkpoints, and the
real SmolLM2-135M loaded offline."""

from unlearn_ext.models.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from unlearn_ext.models.heads import features_and_logits, final_linear
from unlearn_ext.models.initial_head import INITIAL_HEAD_BUFFER, attach_initial_head, get_initial_head, head_matrix
from unlearn_ext.models.mnemonic_codes import CODES_BUFFER, attach_codes, get_codes, make_codes
from unlearn_ext.models.random_features import RandomFourierFeatures
from unlearn_ext.models.smollm2 import load_smollm2, smollm2_gguf_path
from unlearn_ext.models.training import DEFAULT_TRAIN_CONFIGS, TrainConfig, fit, train_classifier
from unlearn_ext.models.vision import ARCHITECTURES, MLP, SmallCNN, build_model, reset_parameters

__all__ = [
    "ARCHITECTURES",
    "CODES_BUFFER",
    "DEFAULT_TRAIN_CONFIGS",
    "INITIAL_HEAD_BUFFER",
    "MLP",
    "RandomFourierFeatures",
    "SmallCNN",
    "TrainConfig",
    "atomic_write_bytes",
    "attach_codes",
    "attach_initial_head",
    "build_model",
    "features_and_logits",
    "final_linear",
    "fit",
    "get_codes",
    "get_initial_head",
    "head_matrix",
    "load_checkpoint",
    "load_smollm2",
    "make_codes",
    "reset_parameters",
    "save_checkpoint",
    "smollm2_gguf_path",
    "train_classifier",
]
