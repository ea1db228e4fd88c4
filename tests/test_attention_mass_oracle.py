"""Oracle: ``attention_mass_reference`` applied to captured Q/K equals transformers' own eager
attention weights (``output_attentions=True``) summed by hand over key regions and query segments,
on a tiny random Qwen2.5-VL with a multi-image, padded batch."""
import pytest
import torch

from kawhi_kernels.integrations import capture_qk, tiny_qwen2_5_vl, tiny_vl_inputs
from kawhi_kernels.reference import attention_mass_reference

# Sample 0: two images (4x6 and 2x4 patches), sample 1: one image (4x4); different text lengths.
IMAGES = [2, 1]
GRIDS = [(4, 6), (2, 4), (4, 4)]
TEXT_LENS = [7, 11]
RESPONSE = [5, 6]  # last rows of each sequence = the response


def region_maps(input_ids, attention_mask, image_token_id):
    """[B, L] int64 maps: image index within the row (per-image regions) and image-token index
    within the row (per-token regions); -1 for text and pads."""
    is_img = (input_ids == image_token_id) & attention_mask.bool()
    per_token = torch.where(is_img, is_img.long().cumsum(1) - 1, -1)
    starts = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
    per_image = torch.where(is_img, starts.long().cumsum(1) - 1, -1)
    return per_image, per_token


def response_segments(attention_mask):
    """Response rows (last RESPONSE[b] valid rows) as bool [B, L], and their segment ids [B, L]:
    first half of row b's response -> 2b, second half -> 2b+1, one row ignored (-1)."""
    mask = attention_mask.bool()
    response = torch.zeros_like(mask)
    segment = torch.full(mask.shape, -1, dtype=torch.long)
    for b, n in enumerate(RESPONSE):
        cols = mask[b].nonzero().squeeze(1)[-n:]
        response[b, cols] = True
        segment[b, cols[: n // 2]] = 2 * b
        segment[b, cols[n // 2:]] = 2 * b + 1
    segment[0, mask[0].nonzero().squeeze(1)[-RESPONSE[0]]] = -1   # ignored row
    return response, segment


def mass_from_eager(weights, response, segment, region, num_regions, num_segments, heads):
    """Sum eager attention weights [B, Hq, L, L] by hand: out[seg, h, r] = Σ rows of seg Σ keys of r."""
    out = torch.zeros(num_segments, len(heads), num_regions, dtype=torch.float64)
    for b, p in response.nonzero().tolist():
        s = int(segment[b, p])
        if s < 0:
            continue
        for slot, h in enumerate(heads):
            for c in range(weights.shape[-1]):
                r = int(region[b, c])
                if r >= 0:
                    out[s, slot, r] += float(weights[b, h, p, c])
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("regions", ["per_image", "per_token"])
def test_attention_mass_reference_matches_eager_weights(side, regions):
    model = tiny_qwen2_5_vl(seed=1, attn_implementation="eager")
    inputs = tiny_vl_inputs(model, IMAGES, TEXT_LENS, image_grid=GRIDS, padding_side=side, seed=2)
    per_image, per_token = region_maps(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    region = per_image if regions == "per_image" else per_token
    num_regions = int(region.max()) + 1
    response, segment = response_segments(inputs["attention_mask"])
    num_segments = 2 * len(IMAGES)
    heads = [0, 2, 3]

    with torch.no_grad(), capture_qk(model, [0, -1], query_mask=response) as cap:
        out = model(**inputs, output_attentions=True)

    for layer, weights in ((0, out.attentions[0]), (1, out.attentions[-1])):
        rec = cap.records[layer]
        assert rec.queries_are_suffix()
        key_region = region[rec.k_batch, rec.k_pos].to(torch.int32)
        query_segment = segment[rec.q_batch, rec.q_pos].to(torch.int32)
        got = attention_mass_reference(rec.q, rec.k, rec.cu_seqlens_q, rec.cu_seqlens_k, key_region, num_regions,
                                       query_segment=query_segment, num_segments=num_segments, heads=heads,
                                       causal=True, softmax_scale=rec.softmax_scale)
        expected = mass_from_eager(weights, response, segment, region, num_regions, num_segments, heads)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert float(expected.sum()) > 0.1            # the image regions do receive mass
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)

        # Per-row output (no segments), all heads: row i of the reference = eager row mass.
        per_row = attention_mass_reference(rec.q, rec.k, rec.cu_seqlens_q, rec.cu_seqlens_k, key_region,
                                           num_regions, softmax_scale=rec.softmax_scale)
        onehot = torch.nn.functional.one_hot(region.clamp(min=0), num_regions).to(weights.dtype)
        onehot = onehot * (region >= 0)[..., None]                       # [B, L, R]
        eager_rows = torch.einsum("bhqk,bkr->bqhr", weights, onehot)   # [B, L, Hq, R]
        torch.testing.assert_close(per_row, eager_rows[rec.q_batch, rec.q_pos], atol=2e-6, rtol=1e-5)
