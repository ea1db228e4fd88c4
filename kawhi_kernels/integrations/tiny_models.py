"""Tiny random-initialised Qwen-VL models and matching inputs, for tests, examples and benchmarks.

Nothing is downloaded: models are built from configs (text: hidden 64, 2 layers, 4 query heads /
2 KV heads = GQA; vision: depth 1) with a 512-token vocabulary whose special ids all lie inside it.
``tiny_vl_inputs`` lays out token ids the way the Qwen processors do (``<vision_start>``,
``<image_pad>`` × (t·h·w / merge²), ``<vision_end>``) and returns the model inputs a processor would
(``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``).
"""
from __future__ import annotations

from typing import Sequence

import torch

# Special token ids shared by the three tiny models (all < VOCAB_SIZE).
VOCAB_SIZE = 512
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 500
VIDEO_TOKEN_ID = 501
VISION_START_TOKEN_ID = 502
VISION_END_TOKEN_ID = 503
# Plain text tokens are drawn from [FIRST_TEXT_ID, LAST_TEXT_ID).
FIRST_TEXT_ID = 3
LAST_TEXT_ID = 500

_SPECIAL_IDS = dict(
    image_token_id=IMAGE_TOKEN_ID,
    video_token_id=VIDEO_TOKEN_ID,
    vision_start_token_id=VISION_START_TOKEN_ID,
    vision_end_token_id=VISION_END_TOKEN_ID,
)


def _text_config(hidden: int, heads: int, kv_heads: int, layers: int, mrope_section: list[int]) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def _split_overrides(overrides: dict) -> tuple[dict, dict, dict]:
    """Split ``overrides`` into (text, vision, top-level) config updates.

    ``text_config={...}`` / ``vision_config={...}`` update the sub-configs; other keys go to the
    top-level config."""
    overrides = dict(overrides)
    text = dict(overrides.pop("text_config", {}) or {})
    vision = dict(overrides.pop("vision_config", {}) or {})
    return text, vision, overrides


def _build(model_cls, config_cls, text: dict, vision: dict, top: dict, seed: int, attn_implementation: str,
           dtype: torch.dtype):
    config = config_cls(text_config=text, vision_config=vision, attn_implementation=attn_implementation,
                        **{**_SPECIAL_IDS, **top})
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(dtype).eval()


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                    **overrides):
    """Random-initialised tiny ``Qwen2_5_VLForConditionalGeneration`` (eval mode).

    Text: hidden 64, 2 layers, Hq 4, Hk 2, head_dim 16 (mrope_section [2, 3, 3]); vision: depth 1,
    patch 14, merge 2 (one LLM token per 28×28 px). ``seed`` fixes the weights (the global RNG state
    is restored afterwards); ``overrides``: ``text_config={...}``, ``vision_config={...}`` or
    top-level config keys."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision, top = _split_overrides(overrides)
    text = {**_text_config(64, 4, 2, 2, [2, 3, 3]), **text}
    vision = {**dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[0]), **vision}
    return _build(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, text, vision, top, seed,
                  attn_implementation, dtype)


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **overrides):
    """Random-initialised tiny ``Qwen2VLForConditionalGeneration`` (eval mode).

    Text: hidden 64, 2 layers, Hq 4, Hk 2, head_dim 16; vision: depth 1, embed_dim 32, patch 14,
    merge 2. Same ``seed`` / ``overrides`` rules as :func:`tiny_qwen2_5_vl`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text, vision, top = _split_overrides(overrides)
    text = {**_text_config(64, 4, 2, 2, [2, 3, 3]), **text}
    vision = {**dict(depth=1, embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2, num_heads=2,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **vision}
    return _build(Qwen2VLForConditionalGeneration, Qwen2VLConfig, text, vision, top, seed,
                  attn_implementation, dtype)


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **overrides):
    """Random-initialised tiny ``Qwen3VLForConditionalGeneration`` (eval mode).

    Text: hidden 64, 2 layers, Hq 4, Hk 2, head_dim 16 (q_norm/k_norm, interleaved M-RoPE); vision:
    depth 1, patch 16, merge 2 (one LLM token per 32×32 px), one deepstack layer. Same ``seed`` /
    ``overrides`` rules as :func:`tiny_qwen2_5_vl`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text, vision, top = _split_overrides(overrides)
    base = _text_config(64, 4, 2, 2, [2, 3, 3])
    base["head_dim"] = 16
    base["rope_parameters"]["mrope_interleaved"] = True
    text = {**base, **text}
    vision = {**dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                     patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                     deepstack_visual_indexes=[0]), **vision}
    return _build(Qwen3VLForConditionalGeneration, Qwen3VLConfig, text, vision, top, seed,
                  attn_implementation, dtype)


def _grid_list(image_grid, num_images: int) -> list[tuple[int, int, int]]:
    """Normalise ``image_grid`` ((h, w), (t, h, w) or a list of those, one per image) to a list of
    (t, h, w) patch grids."""
    def one(g) -> tuple[int, int, int]:
        g = tuple(int(x) for x in g)
        if len(g) == 2:
            g = (1,) + g
        if len(g) != 3 or min(g) <= 0:
            raise ValueError(f"image_grid: expected (h, w) or (t, h, w) positive patch counts, got {g}")
        return g

    if isinstance(image_grid, (list, tuple)) and image_grid and isinstance(image_grid[0], (list, tuple)):
        if len(image_grid) != num_images:
            raise ValueError(f"image_grid: expected one grid per image ({num_images}), got {len(image_grid)}")
        return [one(g) for g in image_grid]
    return [one(image_grid)] * num_images


def tiny_vl_inputs(
    model,
    images_per_sample: Sequence[int] = (1, 2),
    text_lens: Sequence[int] | None = None,
    image_grid=(4, 6),
    padding_side: str = "right",
    seed: int = 0,
    prefix_len: int = 2,
) -> dict[str, torch.Tensor]:
    """Random but valid inputs for a tiny (or real) Qwen2-VL / Qwen2.5-VL / Qwen3-VL model.

    Sample b is ``prefix_len`` text tokens, then ``images_per_sample[b]`` images, each as
    ``<vision_start> <image_pad> × (t·h·w / merge²) <vision_end>``, then ``text_lens[b]`` text tokens
    (default 6 + 3·b). Rows are padded with ``PAD_TOKEN_ID`` on ``padding_side`` ("right" or "left").
    ``image_grid``: patch grid (h, w) or (t, h, w) (h, w multiples of the merge size), or a list with
    one grid per image in batch order.

    Returns dict(input_ids int64 [B, L], attention_mask int64 [B, L] (0 = pad),
    mm_token_type_ids int32 [B, L] (1 = image token), pixel_values [Σ t·h·w, C·T·P·P] in the vision
    tower's dtype, image_grid_thw int64 [num_images, 3]) on the model's device (pixel/grid keys are
    omitted when there is no image).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
    images_per_sample = [int(n) for n in images_per_sample]
    if not images_per_sample or min(images_per_sample) < 0:
        raise ValueError(f"images_per_sample: expected a non-empty list of counts >= 0, got {images_per_sample}")
    batch = len(images_per_sample)
    text_lens = [6 + 3 * b for b in range(batch)] if text_lens is None else [int(n) for n in text_lens]
    if len(text_lens) != batch or min(text_lens) < 0:
        raise ValueError(f"text_lens: expected {batch} counts >= 0, got {text_lens}")

    config = model.config
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grids = _grid_list(image_grid, sum(images_per_sample))
    for g in grids:
        if g[1] % merge or g[2] % merge:
            raise ValueError(f"image_grid: h and w must be multiples of spatial_merge_size={merge}, got {g}")

    gen = torch.Generator().manual_seed(seed)

    def text_tokens(n: int) -> list[int]:
        return torch.randint(FIRST_TEXT_ID, LAST_TEXT_ID, (n,), generator=gen).tolist()

    rows: list[list[int]] = []
    grid_iter = iter(grids)
    for b in range(batch):
        ids = text_tokens(prefix_len)
        for _ in range(images_per_sample[b]):
            t, h, w = next(grid_iter)
            ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge**2)
            ids += [config.vision_end_token_id]
        ids += text_tokens(text_lens[b])
        rows.append(ids)

    length = max(len(r) for r in rows)
    input_ids = torch.full((batch, length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
        input_ids[b, cols] = torch.tensor(r)
        attention_mask[b, cols] = 1
    mm_token_type_ids = (input_ids == config.image_token_id).to(torch.int32)

    device = next(model.parameters()).device
    out = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)
    if grids:
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        num_patches = sum(t * h * w for t, h, w in grids)
        vision_dtype = next(model.model.visual.parameters()).dtype
        out["pixel_values"] = torch.randn(num_patches, patch_dim, generator=gen).to(vision_dtype)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}
