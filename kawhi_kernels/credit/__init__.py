"""KAWHI credit assignment: paragraphs, paragraph weights and advantage reweighting.

DESIGN.md section 1 steps 4-5: ``paragraph_ids`` maps response tokens to "\\n\\n" paragraphs via
tokenizer offsets, ``paragraph_weights`` turns per-token alignment scores α into per-token
paragraph weights (paper Eq. 15), ``reweight_advantages`` multiplies GRPO advantages by them.
"""
from .advantages import (
    STD_MODES,
    group_advantages,
    mask_to_cu_seqlens,
    packed_to_padded,
    padded_to_packed,
    reweight_advantages,
)
from .paragraphs import paragraph_ids, paragraph_ids_batch, split_paragraphs
from .weights import RESCALE_MODES, paragraph_weights

__all__ = [
    "RESCALE_MODES",
    "STD_MODES",
    "group_advantages",
    "mask_to_cu_seqlens",
    "packed_to_padded",
    "padded_to_packed",
    "paragraph_ids",
    "paragraph_ids_batch",
    "paragraph_weights",
    "reweight_advantages",
    "split_paragraphs",
]
