"""Framework integrations: transformers Q/K capture (TRL and verl hooks build on it) and tiny
random Qwen-VL models for tests and examples."""
from .tiny_models import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl, tiny_vl_inputs
from .transformers_capture import (
    CAPTURE_PREFIX,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    QKCapture,
    QKRecord,
    capture_qk,
)

__all__ = [
    "capture_qk",
    "QKCapture",
    "QKRecord",
    "CAPTURE_PREFIX",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_vl_inputs",
]
