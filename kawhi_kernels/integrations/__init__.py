"""Framework integrations: transformers Q/K capture, plain-PyTorch GRPO/DAPO/GSPO helpers, SGUF key
regions of raw images (shared by TRL and verl), TRL and verl hooks, head-sharded reductions, and
tiny random Qwen-VL models for tests and examples.

``KAWHIGRPOTrainer`` (needs ``trl``) and the ``verl`` module are imported lazily.
"""
from .distributed import allreduce_head_partial_sums, local_head_range
from .image_regions import RegionCache, key_mask_for_sequence, regions_for_grids
from .rl import (
    KAWHIStep,
    grpo_token_loss,
    gspo_token_loss,
    kawhi_advantages_from_forward,
    response_query_mask,
    response_texts_and_offsets,
    selected_image_key_mask,
)
from .tiny_models import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl, tiny_vl_inputs
from .transformers_capture import (
    CAPTURE_PREFIX,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    QKCapture,
    QKRecord,
    capture_qk,
)


def __getattr__(name):
    if name == "KAWHIGRPOTrainer":
        from .trl import KAWHIGRPOTrainer

        return KAWHIGRPOTrainer
    raise AttributeError(f"module 'kawhi_kernels.integrations' has no attribute {name!r}")


__all__ = [
    "capture_qk", "QKCapture", "QKRecord", "CAPTURE_PREFIX", "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "KAWHIStep", "kawhi_advantages_from_forward", "response_query_mask", "response_texts_and_offsets",
    "selected_image_key_mask", "grpo_token_loss", "gspo_token_loss",
    "allreduce_head_partial_sums", "local_head_range", "KAWHIGRPOTrainer",
    "tiny_qwen2_5_vl", "tiny_qwen2_vl", "tiny_qwen3_vl", "tiny_vl_inputs",
    "RegionCache", "regions_for_grids", "key_mask_for_sequence",
]
