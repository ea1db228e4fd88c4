"""Synthetic benchmark inputs: packed q/k with region and segment ids, images, response texts.

Everything is generated from a seed, directly on the target device, so a sweep is reproducible and
input generation stays cheap next to the timed work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .shapes import AttentionShape, CosineShape


@dataclass
class PackedInputs:
    """One packed problem: ``copies`` pre-generated (q, k) pairs sharing the index tensors.

    qs[i]: [total_q, Hq, D]; ks[i]: [total_k, Hk, D] (``dtype``, ``device``);
    cu_seqlens_q / cu_seqlens_k: int32 [B+1]; key_region: int32 [total_k] (−1: no region);
    query_segment: int32 [total_q] or None; num_segments: int or None.
    """

    qs: list[torch.Tensor]
    ks: list[torch.Tensor]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    key_region: torch.Tensor
    num_regions: int
    query_segment: torch.Tensor | None
    num_segments: int | None
    causal: bool
    softmax_scale: float
    rows_per_seq: int
    keys_per_seq: int

    @property
    def copies(self) -> int:
        return len(self.qs)

    def op_kwargs(self) -> dict:
        """Keyword arguments shared by every ``attention_mass`` call on these inputs."""
        return dict(query_segment=self.query_segment, num_segments=self.num_segments,
                    causal=self.causal, softmax_scale=self.softmax_scale)


def image_region_ids(grid: tuple[int, int], regions: str) -> tuple[torch.Tensor, int]:
    """Region id of every image token (raster order) and the number of regions.

    regions: "16" / "64" → 4x4 / 8x8 cells of the grid (cell = (r·s // gh)·s + c·s // gw);
    "patch" → one region per token. Returns (int64 [gh·gw], R).
    """
    gh, gw = grid
    r = torch.arange(gh).repeat_interleave(gw)
    c = torch.arange(gw).repeat(gh)
    if regions == "patch":
        return r * gw + c, gh * gw
    side = int(math.isqrt(int(regions)))
    if side * side != int(regions):
        raise ValueError(f"regions: coarse region counts must be squares, got {regions!r}")
    return (r * side // gh) * side + (c * side // gw), side * side


def _cu(lengths: int, batch: int, device) -> torch.Tensor:
    return (torch.arange(batch + 1, dtype=torch.int32) * lengths).to(device)


def _segments(batch: int, rows: int, per_seq: int, generator: torch.Generator) -> torch.Tensor:
    """int32 [batch·rows]: ``per_seq`` contiguous paragraphs of random lengths (≥ 1 row) per
    sequence, numbered b·per_seq + j."""
    out = torch.empty(batch * rows, dtype=torch.int32)
    per_seq = min(per_seq, rows)
    for b in range(batch):
        cuts = torch.randperm(rows - 1, generator=generator)[:per_seq - 1] + 1 if per_seq > 1 else torch.empty(0, dtype=torch.int64)
        bounds = [0] + sorted(cuts.tolist()) + [rows]
        for j in range(per_seq):
            out[b * rows + bounds[j]:b * rows + bounds[j + 1]] = b * per_seq + j
    return out


def _random_qk(total_q: int, total_k: int, hq: int, hk: int, d: int, copies: int, dtype, device,
               seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    qs, ks = [], []
    for _ in range(copies):
        qs.append(torch.randn(total_q, hq, d, generator=gen, device=device, dtype=torch.float32).to(dtype))
        ks.append(torch.randn(total_k, hk, d, generator=gen, device=device, dtype=torch.float32).to(dtype))
    return qs, ks


def attention_inputs(shape: AttentionShape, device: torch.device, dtype: torch.dtype,
                     copies: int, seed: int = 0) -> PackedInputs:
    """Packed inputs for an :class:`AttentionShape`: random normal q/k (scores ~ N(0, 1) at the
    default scale), regions from the image grid (or one per key), optional paragraph segments."""
    hc = shape.head_config
    b, lq, lk = shape.batch, shape.rows, shape.seq_len
    qs, ks = _random_qk(b * lq, b * lk, hc.hq, hc.hk, hc.d, copies, dtype, device, seed)
    if shape.regions == "key":
        region = torch.arange(lk, dtype=torch.int64).repeat(b)
        num_regions = lk
    else:
        ids, num_regions = image_region_ids(shape.grid, shape.regions)
        per_seq = torch.full((lk,), -1, dtype=torch.int64)
        per_seq[shape.prefix:shape.prefix + shape.image_tokens] = ids
        region = per_seq.repeat(b)
    gen = torch.Generator().manual_seed(seed + 1)
    if shape.segments > 0:
        segment = _segments(b, lq, shape.segments, gen).to(device)
        num_segments = b * min(shape.segments, lq)
    else:
        segment, num_segments = None, None
    return PackedInputs(qs, ks, _cu(lq, b, device), _cu(lk, b, device),
                        region.to(device=device, dtype=torch.int32), num_regions, segment, num_segments,
                        shape.causal, 1.0 / math.sqrt(hc.d), lq, lk)


def cosine_inputs(shape: CosineShape, device: torch.device, dtype: torch.dtype, copies: int,
                  seed: int = 0) -> PackedInputs:
    """Packed inputs for a :class:`CosineShape`: region 0 = a random ``select_fraction`` of the
    image tokens of each sequence (R = 1), or one region per image token ("patch")."""
    hc = shape.head_config
    b, lq, lk = shape.batch, shape.rows, shape.seq_len
    qs, ks = _random_qk(b * lq, b * lk, hc.hq, hc.hk, hc.d, copies, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    region = torch.full((b, lk), -1, dtype=torch.int64)
    image = slice(shape.prefix, shape.prefix + shape.image_tokens)
    if shape.regions == "patch":
        region[:, image] = torch.arange(shape.image_tokens)
        num_regions = shape.image_tokens
    else:
        chosen = torch.rand(b, shape.image_tokens, generator=gen) < shape.select_fraction
        region[:, image] = torch.where(chosen, 0, -1)
        num_regions = 1
    return PackedInputs(qs, ks, _cu(lq, b, device), _cu(lk, b, device),
                        region.reshape(-1).to(device=device, dtype=torch.int32), num_regions, None, None,
                        False, 1.0 / math.sqrt(hc.d), lq, lk)


def synthetic_image(grid: tuple[int, int], patch: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB [gh·patch, gw·patch, 3] with structure SGUF can find: a smooth colour gradient,
    random flat rectangles, thin dark strokes (chart-like lines) and mild noise."""
    gh, gw = grid
    h, w = gh * patch, gw * patch
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([200 * xx / max(w - 1, 1), 180 * yy / max(h - 1, 1),
                    np.full_like(xx, 140.0)], axis=-1) + 30
    for _ in range(max(2, gh * gw // 40)):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = min(h, y0 + rng.integers(patch, 4 * patch)), min(w, x0 + rng.integers(patch, 4 * patch))
        img[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    for _ in range(max(1, gh // 4)):
        y = rng.integers(0, h)
        img[y:y + 2, :] = 20
        x = rng.integers(0, w)
        img[:, x:x + 2] = 20
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def response_texts(batch: int, tokens: int, paragraphs: int, seed: int = 0
                   ) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """``batch`` response strings of exactly ``tokens`` tokens each with their character offsets;
    paragraphs are separated by a "\\n\\n" token (counted in ``tokens``)."""
    rng = np.random.default_rng(seed)
    texts, offsets = [], []
    for _ in range(batch):
        n_breaks = max(0, min(paragraphs - 1, (tokens - 1) // 2))
        breaks = set((np.sort(rng.choice(np.arange(1, tokens - 1), size=n_breaks, replace=False))
                      if n_breaks else []).tolist())
        text, spans = "", []
        for t in range(tokens):
            piece = "\n\n" if t in breaks else f" w{int(rng.integers(0, 1000))}"
            spans.append((len(text), len(text) + len(piece)))
            text += piece
        texts.append(text)
        offsets.append(spans)
    return texts, offsets
