"""Plain-PyTorch references (the oracle for every backend) and naive benchmark baselines."""
from .attention_mass import attention_mass_naive, attention_mass_reference
from .cosine_alignment import cosine_alignment_reference
from .grid_pyramid import grid_cell_ids, grid_pyramid_reference

__all__ = [
    "attention_mass_reference",
    "attention_mass_naive",
    "cosine_alignment_reference",
    "grid_pyramid_reference",
    "grid_cell_ids",
]
