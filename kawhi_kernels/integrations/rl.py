"""KAWHI in a plain PyTorch GRPO / DAPO / GSPO loop, inside the log-prob forward that runs anyway.

A GRPO step already runs the policy over ``[prompt | response]`` to get per-token log-probs. Wrap
that forward with :func:`~kawhi_kernels.integrations.capture_qk` on the final decoder layer, with
the response rows as queries, and hand the capture to :class:`KAWHIStep` — no extra forward pass::

    step = KAWHIStep(KAWHI(heads="qwen2.5-vl-7b"), image_token_id=model.config.image_token_id)
    key_mask = step.key_mask(input_ids, images, grids_hw, row_images)     # SGUF once per image
    with step.capture(model, response_mask, input_ids.shape[1]) as cap:
        logits = model(**inputs).logits                                  # the policy forward
    out = step.advantages(cap, key_mask=key_mask, attention_mask=attention_mask,
                          response_mask=response_mask, texts=texts, offsets=offsets,
                          rewards=rewards, group_size=G)
    loss = grpo_token_loss(logp, old_logp, out.advantages, response_mask)  # [B, T] advantages

Layout: ``input_ids`` [B, L] = prompt (any padding) followed by the response block of the last
T = ``response_mask.shape[1]`` columns (right-padded responses), as in TRL and verl. All per-token
results are [B, T], aligned with ``response_mask``.

Loss helpers (``grpo_token_loss``, ``gspo_token_loss``) take the [B, T] advantages; DAPO is
``grpo_token_loss(..., eps_high=0.28, agg="token-mean")``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _validation as V
from ..credit.advantages import group_advantages
from ..credit.pipeline import KAWHI, KAWHIOutput
from .transformers_capture import QKCapture, QKRecord, capture_qk

__all__ = [
    "AGGREGATIONS",
    "KAWHIStep",
    "grpo_token_loss",
    "gspo_token_loss",
    "kawhi_advantages_from_forward",
    "response_query_mask",
    "response_texts_and_offsets",
    "selected_image_key_mask",
]

AGGREGATIONS = ("seq-mean-token-mean", "token-mean")


# ---------------------------------------------------------------------------------------- layout


def response_query_mask(response_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool [B, seq_len] marking the response tokens of ``[prompt | response]`` rows.

    Args:
        response_mask: bool / 0-1 integer [B, T]: response tokens of the trailing T columns.
        seq_len: L, the full sequence width (prompt width L − T ≥ 0).
    Returns:
        bool [B, L], False on the first L − T columns, ``response_mask`` on the last T; same device.
        Use it as ``capture_qk(..., query_mask=...)`` so that the captured q rows are the response
        tokens in the row-major order of ``response_mask``.
    """
    V.check_tensor("response_mask", response_mask, ndim=2)
    V.check_positive_int("seq_len", seq_len)
    b, t = response_mask.shape
    if t > seq_len:
        raise ValueError(f"seq_len: must be >= the response width {t}, got {seq_len}")
    mask = torch.zeros(b, seq_len, dtype=torch.bool, device=response_mask.device)
    mask[:, seq_len - t:] = response_mask.bool()
    return mask


def selected_image_key_mask(input_ids: torch.Tensor, image_token_id: int, row_regions: Sequence[Sequence]) -> torch.Tensor:
    """bool [B, L]: True at the image-token positions that SGUF selected.

    Args:
        input_ids: int [B, L] token ids.
        image_token_id: id of the image placeholder token (``<|image_pad|>``).
        row_regions: B lists; row b lists the :class:`~kawhi_kernels.KeyRegions` of its images in
            order of appearance (pass the same object for the G responses of one prompt, so the
            selection S is shared). Image i of a row owns the next ``regions.selected.numel()``
            image tokens of that row, in raster order. An empty list: no image (all False).
    Returns:
        bool [B, L] on ``input_ids``' device.
    """
    V.check_tensor("input_ids", input_ids, ndim=2, dtypes=V.INDEX_DTYPES)
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise TypeError(f"image_token_id: expected an int, got {type(image_token_id).__name__}")
    if len(row_regions) != input_ids.shape[0]:
        raise ValueError(f"row_regions: expected one list per row ({input_ids.shape[0]}), got {len(row_regions)}")
    mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for b, regions in enumerate(row_regions):
        positions = (input_ids[b] == image_token_id).nonzero().squeeze(1)
        sizes = [int(r.selected.numel()) for r in regions]
        if sum(sizes) != positions.numel():
            raise ValueError(f"row_regions: row {b} has {positions.numel()} image tokens but its images' grids "
                             f"hold {sizes} tokens")
        start = 0
        for regions_i, size in zip(regions, sizes):
            chunk = positions[start:start + size]
            mask[b, chunk[regions_i.selected.to(chunk.device)]] = True
            start += size
    return mask


def response_texts_and_offsets(tokenizer, completion_ids, response_mask: torch.Tensor | None = None, *,
                               skip_special_tokens: bool = False) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Decoded response texts and exact per-token character spans, for paragraph assignment.

    Works with any HF tokenizer (no offsets of the sampled ids are needed): the text is
    ``tokenizer.decode(ids)``; a token's span is what its decoded piece adds to the text. Fast path:
    per-token pieces whose concatenation equals the text (byte-level BPE such as Qwen's); otherwise
    prefix decoding (exact for any decoder, O(T²) characters).

    Args:
        tokenizer: object with ``decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.
        completion_ids: int tensor [B, T] or B lists of ids.
        response_mask: optional bool / 0-1 [B, T]; only masked tokens are decoded (row-major order),
            the others get no span. Default: all tokens of each row.
        skip_special_tokens: passed to ``decode``; with False (default) EOS and other special tokens
            keep their text, so they join the paragraph they end.
    Returns:
        (texts: B str, offsets: B lists of (start, end), one per kept token).
    """
    if isinstance(completion_ids, torch.Tensor):
        V.check_tensor("completion_ids", completion_ids, ndim=2, dtypes=V.INDEX_DTYPES)
        rows = completion_ids.tolist()
    elif isinstance(completion_ids, (list, tuple)):
        rows = [list(r) for r in completion_ids]
    else:
        raise TypeError(f"completion_ids: expected a [B, T] int tensor or a list of id lists, "
                        f"got {type(completion_ids).__name__}")
    if response_mask is not None:
        V.check_tensor("response_mask", response_mask, ndim=2)
        if response_mask.shape[0] != len(rows):
            raise ValueError(f"response_mask: expected {len(rows)} rows (as completion_ids), got {response_mask.shape[0]}")
        keep = response_mask.bool().tolist()
        if any(len(k) != len(r) for k, r in zip(keep, rows)):
            raise ValueError("response_mask: expected the same width as completion_ids")
        rows = [[i for i, m in zip(r, k) if m] for r, k in zip(rows, keep)]
    texts, offsets = [], []
    for ids in rows:
        text, spans = _decode_with_spans(tokenizer, [int(i) for i in ids], skip_special_tokens)
        texts.append(text)
        offsets.append(spans)
    return texts, offsets


def _decode_with_spans(tokenizer, ids: list[int], skip_special_tokens: bool) -> tuple[str, list[tuple[int, int]]]:
    def decode(x):
        return tokenizer.decode(x, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    text = decode(ids)
    pieces = [decode([i]) for i in ids]
    if "".join(pieces) == text:
        spans, pos = [], 0
        for piece in pieces:
            spans.append((pos, pos + len(piece)))
            pos += len(piece)
        return text, spans
    spans, prev = [], ""
    for n in range(1, len(ids) + 1):
        cur = text if n == len(ids) else decode(ids[:n])
        common = 0
        limit = min(len(prev), len(cur))
        while common < limit and prev[common] == cur[common]:
            common += 1
        start = min(common, len(text))
        spans.append((start, max(start, min(len(cur), len(text)))))
        prev = cur
    return text, spans


# ---------------------------------------------------------------------------------------- advantages


def kawhi_advantages_from_forward(
    record: QKRecord,
    *,
    kawhi: KAWHI,
    key_mask: torch.Tensor,
    response_mask: torch.Tensor,
    texts: Sequence[str],
    offsets: Sequence,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> KAWHIOutput:
    """KAWHI per-token advantages from the final layer's Q/K captured in the policy's forward.

    Args:
        record: :class:`QKRecord` of the final decoder layer from
            ``capture_qk(model, [-1], query_mask=response_query_mask(response_mask, L))`` around the
            forward over ``[prompt | response]`` rows of width L (one sequence per row).
        kawhi: the :class:`~kawhi_kernels.KAWHI` configuration (heads, τ, λ, …).
        key_mask: bool [B, L], True at SGUF-selected image tokens (:func:`selected_image_key_mask`).
        response_mask: bool / 0-1 [B, T], response tokens of the last T columns.
        texts, offsets: B decoded responses and per-token (start, end) spans of the masked tokens
            (:func:`response_texts_and_offsets`).
        advantages: float [B] group-normalised advantages (or [B, T]); or give ``rewards`` [B]
            with ``group_size`` (G consecutive responses per prompt) or ``group_ids`` [B] and they
            are normalised with :func:`~kawhi_kernels.group_advantages` (population std, ε 1e-6).
    Returns:
        :class:`~kawhi_kernels.KAWHIOutput`: ``advantages`` float32 [B, T] (A_g · w_j(t) on
        response tokens, 0 elsewhere), ``token_weights`` [B, T], ``alpha`` [T_r] packed, …
    """
    if not isinstance(record, QKRecord):
        raise TypeError(f"record: expected a QKRecord from capture_qk, got {type(record).__name__}")
    if not isinstance(kawhi, KAWHI):
        raise TypeError(f"kawhi: expected a KAWHI instance, got {type(kawhi).__name__}")
    V.check_tensor("response_mask", response_mask, ndim=2)
    V.check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,))
    b, t = response_mask.shape
    if key_mask.shape[0] != b or key_mask.shape[1] < t:
        raise ValueError(f"key_mask: expected shape [{b}, L] with L >= {t}, got {tuple(key_mask.shape)}")
    seq_len = key_mask.shape[1]
    if record.num_sequences != b:
        raise ValueError(f"record: captured {record.num_sequences} sequences, expected one per row ({b})")
    expected = response_query_mask(response_mask, seq_len).to(record.q_batch.device)
    rows, cols = expected.nonzero(as_tuple=True)
    if not (torch.equal(rows, record.q_batch) and torch.equal(cols, record.q_pos)):
        raise ValueError("record: its query rows are not the response tokens of response_mask; capture with "
                         "query_mask=response_query_mask(response_mask, L) (and no response token may be padding)")
    device = record.k.device
    key_region = torch.where(key_mask.to(record.k_batch.device)[record.k_batch, record.k_pos], 0, -1)
    key_region = key_region.to(device=device, dtype=torch.int32)

    if advantages is None:
        if rewards is None:
            raise ValueError("advantages: give advantages [B], or rewards [B] with group_size / group_ids")
        advantages = group_advantages(rewards, group_size, group_ids=group_ids)
    elif rewards is not None:
        raise ValueError("rewards: give either advantages or rewards, not both")
    return kawhi.reweight(advantages.to(device), record.q, record.k, record.cu_seqlens_q.to(device),
                          record.cu_seqlens_k.to(device), key_region, list(texts), list(offsets),
                          response_mask.to(device))


class KAWHIStep:
    """KAWHI for a plain PyTorch RL loop: SGUF key masks, capture in the policy forward, advantages.

    Args:
        kawhi: the :class:`~kawhi_kernels.KAWHI` configuration (default ``KAWHI()``: all heads).
        image_token_id: id of the image placeholder token of the model (``config.image_token_id``).
        layer: decoder layer whose post-RoPE Q/K are used (paper: the final one, −1).
    """

    def __init__(self, kawhi: KAWHI | None = None, *, image_token_id: int, layer: int = -1):
        if kawhi is not None and not isinstance(kawhi, KAWHI):
            raise TypeError(f"kawhi: expected a KAWHI instance or None, got {type(kawhi).__name__}")
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
            raise TypeError(f"image_token_id: expected an int, got {type(image_token_id).__name__}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        self.kawhi = kawhi if kawhi is not None else KAWHI()
        self.image_token_id = image_token_id
        self.layer = layer

    def key_mask(self, input_ids: torch.Tensor, images, grids_hw, row_images: Sequence[Sequence[int]]) -> torch.Tensor:
        """SGUF on each distinct image (once), then bool [B, L] of selected image tokens.

        Args:
            input_ids: int [B, L].
            images: list of uint8 [H, W, 3] images (each resized to its token grid × patch pixels).
            grids_hw: list of (gh, gw) LLM token grids, one per image.
            row_images: B lists of indices into ``images``, in order of appearance in the row; the
                G responses of a prompt list the same index, so they share the selection.
        """
        regions = self.kawhi.select_regions(list(images), [tuple(g) for g in grids_hw])
        try:
            row_regions = [[regions[i] for i in row] for row in row_images]
        except (IndexError, TypeError) as err:
            raise ValueError(f"row_images: expected lists of indices into images (0..{len(regions) - 1})") from err
        return selected_image_key_mask(input_ids, self.image_token_id, row_regions)

    def capture(self, model, response_mask: torch.Tensor, seq_len: int) -> QKCapture:
        """``capture_qk`` context for the policy forward over ``[prompt | response]`` rows of width
        ``seq_len``, with the response tokens of ``response_mask`` [B, T] as queries."""
        return capture_qk(model, [self.layer], query_mask=response_query_mask(response_mask, seq_len))

    def advantages(self, capture: QKCapture, **kwargs) -> KAWHIOutput:
        """:func:`kawhi_advantages_from_forward` on the record the capture holds (keyword
        arguments as there: key_mask, response_mask, texts, offsets, advantages | rewards + group)."""
        if not isinstance(capture, QKCapture):
            raise TypeError(f"capture: expected the QKCapture of KAWHIStep.capture, got {type(capture).__name__}")
        layer = capture.layers[0]
        if layer not in capture.records:
            raise RuntimeError("capture: no Q/K was recorded; run the policy forward inside `with step.capture(...)`")
        return kawhi_advantages_from_forward(capture.records[layer], kawhi=self.kawhi, **kwargs)


# ---------------------------------------------------------------------------------------- losses


def _check_loss_inputs(logp, old_logp, advantages, mask, eps_low, eps_high, agg):
    V.check_tensor("logp", logp, ndim=2, dtypes=V.FLOAT_DTYPES)
    shape = tuple(logp.shape)
    for name, value in (("old_logp", old_logp), ("advantages", advantages)):
        V.check_tensor(name, value, dtypes=V.FLOAT_DTYPES, device=logp.device)
    if tuple(old_logp.shape) != shape:
        raise ValueError(f"old_logp: expected shape {list(shape)} (as logp), got {tuple(old_logp.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None].expand(shape)
    elif tuple(advantages.shape) != shape:
        raise ValueError(f"advantages: expected shape [{shape[0]}] or {list(shape)}, got {tuple(advantages.shape)}")
    V.check_tensor("mask", mask, ndim=2, device=logp.device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask: expected shape {list(shape)} (as logp), got {tuple(mask.shape)}")
    if not (isinstance(eps_low, (int, float)) and eps_low >= 0):
        raise ValueError(f"eps_low: expected a number >= 0, got {eps_low!r}")
    eps_high = eps_low if eps_high is None else eps_high
    if not (isinstance(eps_high, (int, float)) and eps_high >= 0):
        raise ValueError(f"eps_high: expected a number >= 0 or None, got {eps_high!r}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: expected one of {list(AGGREGATIONS)}, got {agg!r}")
    return advantages.to(logp.dtype), mask.to(logp.dtype), float(eps_high)


def _clipped_objective(ratio, advantages, mask, eps_low, eps_high, agg) -> torch.Tensor:
    loss = -torch.min(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)
    if agg == "token-mean":
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return per_seq.mean()


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    eps_low: float = 0.2, eps_high: float | None = None,
                    agg: str = "seq-mean-token-mean") -> torch.Tensor:
    """Clipped token-level policy loss of GRPO / DAPO with per-token advantages.

    ℓ_t = −min(r_t Â_t, clip(r_t, 1 − eps_low, 1 + eps_high) Â_t), r_t = exp(logp − old_logp).

    Args:
        logp: float [B, T] log π_θ of the response tokens (with grad); old_logp [B, T] of π_old.
        advantages: [B, T] (KAWHI) or [B]; treated as constants.
        mask: [B, T] bool / 0-1 response mask.
        eps_low, eps_high: clip range (eps_high None = eps_low; DAPO's clip-higher: 0.2 / 0.28).
        agg: "seq-mean-token-mean" (GRPO, paper Eq. 4) or "token-mean" (DAPO).
    Returns:
        scalar loss (minimise it). KL and entropy terms are left to the caller.
    """
    adv, m, eps_high = _check_loss_inputs(logp, old_logp, advantages, mask, eps_low, eps_high, agg)
    ratio = torch.exp(logp - old_logp.detach())
    return _clipped_objective(ratio, adv.detach(), m, float(eps_low), eps_high, agg)


def gspo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    eps_low: float = 3e-4, eps_high: float | None = 4e-4,
                    agg: str = "seq-mean-token-mean") -> torch.Tensor:
    """GSPO-token loss: sequence-level ratio, token-level advantages (PAPER-NOTES §4).

    s_g = exp(mean_t (logp − old_logp)) over the response tokens, and per token
    s_{g,t} = sg[s_g] · π_θ(y_t) / sg[π_θ(y_t)], numerically s_g, so clipping is decided per
    sequence while the gradient of token t is weighted by its own Â_{g,t}. With [B] advantages
    this is GSPO.

    Args: as :func:`grpo_token_loss` (defaults: GSPO's clip range 3e-4 / 4e-4).
    Returns: scalar loss.
    """
    adv, m, eps_high = _check_loss_inputs(logp, old_logp, advantages, mask, eps_low, eps_high, agg)
    log_ratio = (logp - old_logp.detach()) * m
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
    ratio = torch.exp(seq_log_ratio.detach() + logp - logp.detach())
    return _clipped_objective(ratio, adv.detach(), m, float(eps_low), eps_high, agg)
