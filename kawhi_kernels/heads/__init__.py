"""Vision-critical heads: published presets, attention-mass profiles and the head-masking protocol."""
from .ablation import (
    AblationResult,
    ablate_heads,
    attention_blocks,
    mask_heads,
    model_fingerprint,
    num_query_heads,
)
from .plots import plot_ablation, plot_profile
from .presets import PRESETS, normalize_model_name, vision_critical_heads
from .profile import HeadProfile, profile_heads, text_after_image_mask
from .scoring import MultipleChoiceScorer, load_multiple_choice

__all__ = [
    "PRESETS", "normalize_model_name", "vision_critical_heads",
    "HeadProfile", "profile_heads", "text_after_image_mask",
    "AblationResult", "ablate_heads", "attention_blocks", "mask_heads", "model_fingerprint",
    "num_query_heads", "MultipleChoiceScorer", "load_multiple_choice", "plot_ablation", "plot_profile",
]
