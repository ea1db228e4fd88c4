"""Vision-critical head presets and head-attribution tooling."""
from .presets import PRESETS, normalize_model_name, vision_critical_heads

__all__ = ["PRESETS", "normalize_model_name", "vision_critical_heads"]
