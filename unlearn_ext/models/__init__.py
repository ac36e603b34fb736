"""Models that ship with (or are loaded offline by) unlearn_ext."""

from unlearn_ext.models.smollm2 import load_smollm2, smollm2_gguf_path

__all__ = ["load_smollm2", "smollm2_gguf_path"]
