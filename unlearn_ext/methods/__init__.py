"""Unlearning methods behind one protocol (DESIGN.md 5): ``get_method(name, **hparams).unlearn(model,
forget, retain)`` or :func:`unlearn`. Importing this package registers every implemented method."""

from unlearn_ext.methods._base import (
    PLANNED,
    Unlearner,
    UnlearnResult,
    available_methods,
    get_method,
    method_class,
    unlearn,
)
from unlearn_ext.methods.bad_teacher import BadTeacher
from unlearn_ext.methods.finetune import Finetune
from unlearn_ext.methods.fisher_forgetting import FisherForgetting
from unlearn_ext.methods.mnemonic import Mnemonic, class_fisher_from_codes, mnemonic_delta
from unlearn_ext.methods.muso import MUSO
from unlearn_ext.methods.neggrad import NegGrad, NegGradPlus
from unlearn_ext.methods.opc import OPC
from unlearn_ext.methods.random_label import RandomLabel
from unlearn_ext.methods.retrain import Retrain
from unlearn_ext.methods.salun import SalUn
from unlearn_ext.methods.scrub import Scrub
from unlearn_ext.methods.ssd import SSD

__all__ = [
    "PLANNED",
    "SSD",
    "BadTeacher",
    "Finetune",
    "FisherForgetting",
    "MUSO",
    "Mnemonic",
    "OPC",
    "NegGrad",
    "NegGradPlus",
    "RandomLabel",
    "Retrain",
    "SalUn",
    "Scrub",
    "UnlearnResult",
    "Unlearner",
    "available_methods",
    "class_fisher_from_codes",
    "get_method",
    "method_class",
    "mnemonic_delta",
    "unlearn",
]
