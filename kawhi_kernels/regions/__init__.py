"""Image-side regions: SGUF key-region selection (structure-guided union-find).

Public API:
    select_key_regions(image, grid_hw, ...) -> KeyRegions (or a list for a list/batch)
    KeyRegions                       result dataclass (labels, energy, is_key, selected, ...)
    key_regions_from_descriptors(...) SGUF from precomputed patch descriptors
    patch_descriptors(image, grid_hw, ...) -> (lam_max, lam_min, lightness)
    merge_components(...)            the union-find merge step (C++ or NumPy fallback)
"""
from .descriptors import (
    gaussian_smooth,
    patch_descriptors,
    sobel_gradients,
    srgb_to_lightness,
    structure_eigenvalues,
)
from .sguf import KeyRegions, key_regions_from_descriptors, select_key_regions
from .union_find import components_from_edges, merge_components, merge_edges

__all__ = [
    "KeyRegions",
    "components_from_edges",
    "gaussian_smooth",
    "key_regions_from_descriptors",
    "merge_components",
    "merge_edges",
    "patch_descriptors",
    "select_key_regions",
    "sobel_gradients",
    "srgb_to_lightness",
    "structure_eigenvalues",
]
