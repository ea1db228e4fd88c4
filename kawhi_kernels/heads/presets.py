"""Published vision-critical query heads (KAWHI paper, Appendix A) and lookup by model.

The paper masks head index h in every decoder layer, re-runs MME and keeps the heads whose
removal drops the score by more than 100; α_t then uses these head indices in the final layer.
"""
from __future__ import annotations

import re

PRESETS: dict[str, tuple[int, ...]] = {
    "qwen2.5-vl-7b": (0, 1, 3, 22, 23, 24, 25, 26, 27),
    "qwen3-vl-4b": (2, 3, 4, 12, 13, 19, 25, 27),
}

# (model_type, num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size) of the
# text model → preset, to recognise a checkpoint whose name was lost (e.g. a local fine-tune).
_TEXT_SHAPES = {
    ("qwen2_5_vl", 28, 28, 4, 3584): "qwen2.5-vl-7b",
    ("qwen3_vl", 36, 32, 8, 2560): "qwen3-vl-4b",
}


def normalize_model_name(name: str) -> str:
    """"Qwen/Qwen2.5-VL-7B-Instruct" → "qwen2.5-vl-7b"."""
    base = name.strip().rstrip("/").split("/")[-1].lower()
    base = re.sub(r"[-_](instruct|thinking|chat|base)$", "", base)
    return base.replace("_", "-")


def _preset_from_config(config) -> str | None:
    text = getattr(config, "text_config", None) or config
    model_type = getattr(config, "model_type", None)
    key = (model_type, getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None),
           getattr(text, "num_key_value_heads", None), getattr(text, "hidden_size", None))
    if key in _TEXT_SHAPES:
        return _TEXT_SHAPES[key]
    name = getattr(config, "_name_or_path", "") or ""
    return normalize_model_name(name) if name and normalize_model_name(name) in PRESETS else None


def vision_critical_heads(model_or_name) -> list[int]:
    """Head preset for a model name ("Qwen/Qwen2.5-VL-7B-Instruct"), a preset key, a
    transformers config or a model. Raises ``ValueError`` when no preset is known."""
    if isinstance(model_or_name, str):
        key = normalize_model_name(model_or_name)
        described = repr(model_or_name)
    else:
        config = getattr(model_or_name, "config", model_or_name)
        key = _preset_from_config(config)
        described = f"config of model_type {getattr(config, 'model_type', '?')!r}"
    if key not in PRESETS:
        raise ValueError(f"model: no vision-critical head preset for {described}; known presets: "
                         f"{sorted(PRESETS)}. Pass heads=[...] explicitly or find them with "
                         "`kawhi-kernels heads` (attention-mass profile / head ablation).")
    return list(PRESETS[key])
