"""Actor-side α inside verl's own forward of Qwen2/2.5-VL, after verl's ``apply_monkey_patch``.

verl replaces ``Qwen2VLAttention.forward`` / ``Qwen2_5_VLAttention.forward`` with
``verl.models.transformers.qwen2_vl.qwen2_vl_attn_forward``, which never reaches transformers'
attention interface, so :func:`~kawhi_kernels.integrations.capture_qk` does not fire there. The
post-RoPE, GQA-expanded q/k of that path are seen at two module globals of
``verl.models.transformers.qwen2_vl``:

* sp = 1: ``_custom_flash_attention_forward(query, key, ...)`` with q/k [1, total, H, D] of the
  packed row (cast to bf16 by verl when they were fp32);
* Ulysses sp > 1: ``flash_attn_varlen_func(q, k, ..., cu_seqlens_q=...)`` after verl's
  all-to-all: every rank holds all tokens (the padded packed row) and query heads
  ``[rank·H/sp, (rank+1)·H/sp)``; partial sums over the local heads are all-reduced over the SP
  group (:func:`~kawhi_kernels.integrations.verl.kawhi_alpha_packed`).

Qwen3-VL keeps transformers' attention interface under verl's patch: use
:func:`~kawhi_kernels.integrations.verl.capture_kawhi_alpha` there (sp = 1).
"""
from __future__ import annotations

import importlib

import torch

from .transformers_capture import _find_text_model
from .verl import kawhi_alpha_packed

__all__ = ["VerlQwen2VLAlphaTap"]

_VERL_QWEN2_VL = "verl.models.transformers.qwen2_vl"


def _boundaries_from_position_ids(position_ids: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens of a packed row from its text position ids (a sequence starts where they are 0),
    as verl's ``prepare_fa2_from_position_ids``."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().view(-1).to(torch.int32)
    return torch.cat([starts, torch.tensor([total], dtype=torch.int32, device=pos.device)])


class VerlQwen2VLAlphaTap:
    """Context manager: α of the chosen decoder layer during one verl-patched Qwen2/2.5-VL forward.

    Args:
        model: the ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
            (unwrapped or FSDP-wrapped) after verl's ``apply_monkey_patch``.
        key_mask: bool [total] SGUF-selected image tokens of the packed row (unpadded).
        query_mask: bool [total] tokens whose α is wanted (response tokens); None = all.
        heads: global query heads to average (None = all); layer: decoder layer (−1 = last).
        sp_group: the Ulysses process group when sp > 1 (verl's
            ``get_ulysses_sequence_parallel_group()``); None = no sequence parallelism.
    After the forward, ``alpha`` is float32 [total] (own-position convention; 0 off the query mask),
    identical on every rank of the SP group.
    """

    def __init__(self, model, *, key_mask: torch.Tensor, query_mask: torch.Tensor | None = None, heads=None,
                 layer: int = -1, sp_group=None, backend: str = "auto"):
        text = _find_text_model(model)
        layers = text.layers
        self.attention = layers[layer].self_attn
        self.key_mask = key_mask
        self.query_mask = query_mask
        self.heads = heads
        self.sp_group = sp_group
        self.backend = backend
        self.alpha: torch.Tensor | None = None
        self._active = False
        self._hooks = []
        self._saved = {}

    # -- the taps --------------------------------------------------------------------------------

    def _compute(self, q: torch.Tensor, k: torch.Tensor, cu: torch.Tensor, head_offset: int, num_heads: int):
        total = self.key_mask.shape[0]
        padded = q.shape[0]
        if padded < total:
            raise ValueError(f"key_mask: {total} tokens but the attention saw {padded}")
        device = q.device
        key_mask = torch.zeros(padded, dtype=torch.bool, device=device)
        key_mask[:total] = self.key_mask.to(device)
        query_mask = torch.zeros(padded, dtype=torch.bool, device=device)
        query_mask[:total] = True if self.query_mask is None else self.query_mask.to(device)
        alpha = kawhi_alpha_packed(q, k, cu.to(device), key_mask, query_mask, heads=self.heads,
                                   head_offset=head_offset, num_heads=num_heads, group=self.sp_group,
                                   backend=self.backend)
        self.alpha = alpha[:total]

    def _wrap_custom_forward(self, original):
        def _custom_flash_attention_forward(query_states, key_states, *args, **kwargs):
            if self._active and self.sp_group is None:
                position_ids = kwargs.get("position_ids")
                q = query_states.reshape(-1, query_states.shape[-2], query_states.shape[-1])
                k = key_states.reshape(-1, key_states.shape[-2], key_states.shape[-1])
                cu = _boundaries_from_position_ids(position_ids, q.shape[0]) if position_ids is not None else \
                    torch.tensor([0, q.shape[0]], dtype=torch.int32)
                self._compute(q, k, cu, 0, q.shape[1])
            return original(query_states, key_states, *args, **kwargs)
        return _custom_flash_attention_forward

    def _wrap_varlen(self, original):
        def flash_attn_varlen_func(q, k, *args, **kwargs):
            if self._active and self.sp_group is not None:
                import torch.distributed as dist

                rank, size = dist.get_rank(self.sp_group), dist.get_world_size(self.sp_group)
                self._compute(q, k, kwargs["cu_seqlens_q"], rank * q.shape[1], q.shape[1] * size)
            return original(q, k, *args, **kwargs)
        return flash_attn_varlen_func

    # -- context ---------------------------------------------------------------------------------

    def __enter__(self) -> VerlQwen2VLAlphaTap:
        module = importlib.import_module(_VERL_QWEN2_VL)
        if getattr(module, "flash_attn_varlen_func", None) is None:
            raise RuntimeError(f"{_VERL_QWEN2_VL}.flash_attn_varlen_func is missing: verl's Qwen2-VL remove-padding "
                               "path needs flash-attn (or a varlen stand-in bound there)")
        for name, wrap in (("_custom_flash_attention_forward", self._wrap_custom_forward),
                           ("flash_attn_varlen_func", self._wrap_varlen)):
            self._saved[name] = getattr(module, name)
            setattr(module, name, wrap(self._saved[name]))

        def start(*_):
            self._active = True

        def stop(*_):
            self._active = False

        self._hooks = [self.attention.register_forward_pre_hook(start),
                       self.attention.register_forward_hook(stop)]
        return self

    def __exit__(self, *exc) -> None:
        module = importlib.import_module(_VERL_QWEN2_VL)
        for name, fn in self._saved.items():
            setattr(module, name, fn)
        self._saved.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
