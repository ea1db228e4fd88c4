"""kawhi_kernels: visual credit-assignment ops for RL from verifiable rewards on VLMs.

Autograd-free ops (torch custom ops, packed varlen layout) plus the KAWHI pipeline:

- ``attention_mass``: softmax mass of query rows on key regions, without an attention map.
- ``AttentionMassPlan`` / ``CosineAlignmentPlan``: validate a batch layout once, run per layer.
- ``cosine_alignment``: mean cosine of query rows to region keys (KAWHI's α_t).
- ``grid_pyramid``: multi-scale sums over image token grids; ``image_key_regions``,
  ``llm_grid_thw``: region ids from Qwen-VL ``image_grid_thw``.
- ``select_key_regions``: SGUF key regions of an image.
- ``paragraph_ids``, ``paragraph_weights``, ``group_advantages``, ``reweight_advantages``, ``KAWHI``.
- ``capture_qk``: post-RoPE q/k of chosen layers from a transformers Qwen-VL forward.
"""
__version__ = "0.1.0"

from .credit import (
    group_advantages,
    paragraph_ids,
    paragraph_ids_batch,
    paragraph_weights,
    reweight_advantages,
)
from .credit.pipeline import KAWHI, KAWHIOutput
from .heads import vision_critical_heads
from .ops.attention_mass import attention_mass, attention_mass_naive
from .ops.cosine_alignment import cosine_alignment
from .ops.grid_pyramid import grid_pyramid
from .ops.plan import AttentionMassPlan, CosineAlignmentPlan
from .regions.grids import image_key_regions, llm_grid_thw
from .regions.sguf import KeyRegions, select_key_regions


def __getattr__(name):
    # transformers is heavy and optional for the ops: import the capture lazily.
    if name in ("capture_qk", "QKRecord"):
        from .integrations import transformers_capture

        return getattr(transformers_capture, name)
    raise AttributeError(f"module 'kawhi_kernels' has no attribute {name!r}")


__all__ = [
    "KAWHI", "AttentionMassPlan", "CosineAlignmentPlan", "KAWHIOutput", "KeyRegions", "QKRecord", "attention_mass", "attention_mass_naive",
    "capture_qk", "cosine_alignment", "grid_pyramid", "group_advantages", "image_key_regions",
    "llm_grid_thw", "paragraph_ids", "paragraph_ids_batch", "paragraph_weights",
    "reweight_advantages", "select_key_regions", "vision_critical_heads",
]
