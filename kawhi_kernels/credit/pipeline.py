"""The KAWHI pipeline object: SGUF regions + alignment + paragraph weights → per-token advantages.

One call per training step, after the policy's log-prob forward has run under
:func:`kawhi_kernels.integrations.capture_qk` (final decoder layer) so that q (response rows)
and k (all tokens) are available in packed varlen layout::

    kawhi = KAWHI(heads="qwen2.5-vl-7b")
    regions = kawhi.select_regions(images, grids_hw)            # once per prompt, shared by G
    key_region = kawhi.key_region_for_batch(image_token_mask, image_of_key, regions)
    out = kawhi.reweight(advantages, q, k, cu_seqlens_q, cu_seqlens_k, key_region,
                         texts, offsets, response_mask)
    loss_advantages = out.advantages                            # [B, T]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validation as V
from ..ops.cosine_alignment import cosine_alignment
from ..regions.sguf import KeyRegions, select_key_regions
from .advantages import reweight_advantages
from .paragraphs import paragraph_ids_batch
from .weights import paragraph_weights


@dataclass
class KAWHIOutput:
    """Result of :meth:`KAWHI.reweight` (B responses, packed total T_r response tokens).

    advantages: float32 [B, T] reweighted per-token advantages (0 outside the response mask).
    token_weights: float32 [B, T] paragraph weight of every response token (1 elsewhere).
    alpha: float32 [T_r] spatial alignment α_t of every response token, packed.
    paragraph_ids: int32 [T_r] paragraph of every response token (−1: no paragraph / no image).
    cu_seqlens: int32 [B+1] response lengths, cumulative.
    """

    advantages: torch.Tensor
    token_weights: torch.Tensor
    alpha: torch.Tensor
    paragraph_ids: torch.Tensor
    cu_seqlens: torch.Tensor


def _resolve_heads(heads) -> list[int] | None:
    if heads is None or isinstance(heads, (list, tuple, torch.Tensor)):
        return None if heads is None else [int(h) for h in heads]
    from ..heads.presets import vision_critical_heads

    return vision_critical_heads(heads)


class KAWHI:
    """Key-Region Aligned Weighted Harmonic Incentive, as in DESIGN.md section 1.

    Args:
        heads: vision-critical query heads: a list of indices, a preset name
            ("qwen2.5-vl-7b", "Qwen/Qwen3-VL-4B-Instruct", …), a config/model with a known preset,
            or None for all heads.
        sigma, delta_s, delta_l, beta, skip_ratio: SGUF parameters (see ``select_key_regions``).
        tau, lam, w_min, w_max, rescale: paragraph-weight parameters (see ``paragraph_weights``).
        delimiter: paragraph delimiter.
        seed: seed of the background-token sampling generator (None: nondeterministic).
        backend: backend of ``cosine_alignment``.
    """

    def __init__(self, heads=None, *, sigma: float = 1.0, delta_s: float = 0.5, delta_l: float = 30.0,
                 beta: float = 0.1, skip_ratio: float = 0.7, tau: float = 0.05, lam: float = 0.1,
                 w_min: float = 0.1, w_max: float = 1.0, rescale: str | None = None,
                 delimiter: str = "\n\n", seed: int | None = None, backend: str = "auto"):
        self.heads = _resolve_heads(heads)
        self.sguf_params = dict(sigma=sigma, delta_s=delta_s, delta_l=delta_l, beta=beta,
                                skip_ratio=skip_ratio)
        self.weight_params = dict(tau=tau, lam=lam, w_min=w_min, w_max=w_max, rescale=rescale)
        self.delimiter = delimiter
        self.backend = backend
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    # ------------------------------------------------------------------ regions

    def select_regions(self, images, grids_hw) -> list[KeyRegions]:
        """SGUF key regions for a list of prompt images (uint8 [H, W, 3] each, grid (gh, gw) each).

        Call once per prompt and reuse the result for all G responses of that prompt."""
        if not isinstance(images, (list, tuple)):
            images = [images]
            grids_hw = [grids_hw]
        if len(grids_hw) != len(images):
            raise ValueError(f"grids_hw: expected one (gh, gw) per image ({len(images)}), got {len(grids_hw)}")
        return [select_key_regions(img, tuple(g), generator=self.generator, **self.sguf_params)
                for img, g in zip(images, grids_hw)]

    @staticmethod
    def key_region_for_batch(image_token_mask: torch.Tensor, image_of_key: torch.Tensor,
                             regions: list[KeyRegions]) -> torch.Tensor:
        """``key_region`` int32 [total_k]: 0 at image-token keys SGUF selected, −1 elsewhere.

        Args:
            image_token_mask: bool [total_k], True at image-token keys (packed over sequences).
            image_of_key: int [total_k], index into ``regions`` of the image each key belongs to
                (ignored where ``image_token_mask`` is False). The tokens of one image appear in
                raster order; G responses of a prompt point at the same image entry.
            regions: KeyRegions per image.
        """
        V.check_tensor("image_token_mask", image_token_mask, ndim=1, dtypes=(torch.bool,))
        V.check_tensor("image_of_key", image_of_key, ndim=1, dtypes=V.INDEX_DTYPES,
                       device=image_token_mask.device)
        if image_of_key.shape != image_token_mask.shape:
            raise ValueError(f"image_of_key: expected shape {tuple(image_token_mask.shape)}, "
                             f"got {tuple(image_of_key.shape)}")
        key_region = torch.full(image_token_mask.shape, -1, dtype=torch.int32, device=image_token_mask.device)
        positions = image_token_mask.nonzero().squeeze(1)
        owners = image_of_key[positions]
        for index, region in enumerate(regions):
            keys = positions[owners == index]
            if keys.numel() == 0:
                continue
            # A prompt shared by several responses repeats the image once per response.
            n = region.selected.numel()
            if keys.numel() % n != 0:
                raise ValueError(f"image_of_key: image {index} has {keys.numel()} tokens, not a multiple "
                                 f"of its grid size {n}")
            selected = region.selected.to(keys.device).repeat(keys.numel() // n)
            key_region[keys[selected]] = 0
        return key_region

    # ------------------------------------------------------------------ alignment and weights

    def alignment(self, q, k, cu_seqlens_q, cu_seqlens_k, key_region) -> torch.Tensor:
        """α_t: float32 [total_q], mean cosine over the preset heads and the selected keys."""
        return cosine_alignment(q, k, cu_seqlens_q, cu_seqlens_k, key_region, 1, heads=self.heads,
                                backend=self.backend)[:, 0]

    def reweight(self, advantages, q, k, cu_seqlens_q, cu_seqlens_k, key_region, texts, offsets,
                 response_mask) -> KAWHIOutput:
        """Per-token KAWHI advantages for B responses.

        Args:
            advantages: float [B] (group-normalised, e.g. ``group_advantages``) or [B, T].
            q: [total_q, Hq, D] final-layer post-RoPE queries of the response tokens, packed in the
                order of ``response_mask`` (row-major over its True entries).
            k: [total_k, Hk, D] keys of every token of each sequence; cu_seqlens_q/k int [B+1].
            key_region: int [total_k], 0 at selected image keys, −1 elsewhere
                (:meth:`key_region_for_batch`).
            texts: B decoded response strings; offsets: B per-token (start, end) spans into them.
            response_mask: bool [B, T] response-token positions (T_b True entries in row b).
        """
        V.check_tensor("response_mask", response_mask, ndim=2)
        if not isinstance(texts, (list, tuple)) or len(texts) != response_mask.shape[0]:
            raise ValueError(f"texts: expected a list of {response_mask.shape[0]} strings")
        mask = response_mask.to(torch.bool)
        lengths = mask.sum(1).to(torch.int64)
        cu_resp = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        if not torch.equal(cu_resp.to(cu_seqlens_q.device, torch.int64), cu_seqlens_q.to(torch.int64)):
            raise ValueError("cu_seqlens_q: must match the response lengths of response_mask "
                             f"({cu_resp.tolist()}), got {cu_seqlens_q.tolist()}")
        alpha = self.alignment(q, k, cu_seqlens_q, cu_seqlens_k, key_region)
        para, cu_para = paragraph_ids_batch(list(texts), list(offsets), self.delimiter)
        if not torch.equal(cu_para.to(torch.int64), cu_resp.to(torch.int64)):
            raise ValueError(f"offsets: expected {lengths.tolist()} token spans per response "
                             f"(as response_mask), got {(cu_para[1:] - cu_para[:-1]).tolist()}")
        para = para.to(alpha.device)
        # Responses whose sequence has no selected image key keep weight 1 (plain GRPO).
        selected_per_seq = torch.zeros(len(texts), dtype=torch.int64, device=key_region.device)
        seq_of_key = torch.repeat_interleave(
            torch.arange(len(texts), device=key_region.device),
            (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64))
        selected_per_seq.index_add_(0, seq_of_key, (key_region >= 0).to(torch.int64))
        no_image = torch.repeat_interleave((selected_per_seq == 0).to(alpha.device), lengths.to(alpha.device))
        para = torch.where(no_image, torch.full_like(para, -1), para)
        weights = paragraph_weights(alpha, para, cu_resp.to(alpha.device), **self.weight_params)
        token_weights = torch.ones(mask.shape, dtype=weights.dtype, device=weights.device)
        token_weights[mask.to(weights.device)] = weights
        reweighted = reweight_advantages(advantages, token_weights, mask.to(weights.device))
        return KAWHIOutput(reweighted, token_weights, alpha, para, cu_resp)
