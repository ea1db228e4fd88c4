"""Actor-side α inside verl's own attention path, after verl's ``apply_monkey_patch``.

The taps share :class:`_AlphaTap`: while the chosen decoder layer's attention runs, one or more
module globals of verl's attention path are wrapped (:func:`~kawhi_kernels.integrations._patching.temporarily`);
the wrapper sees that layer's post-RoPE q/k and computes α with
:func:`~kawhi_kernels.integrations.verl.kawhi_alpha_packed` (head-sharded partial sums reduced
over the Ulysses group when sp > 1). After the forward, ``alpha`` is float32 [total] in the
own-position convention, 0 off the query mask, identical on every rank of the SP group.

* :class:`VerlQwen2VLAlphaTap` — Qwen2/2.5-VL: verl replaces the attention forward with
  ``verl.models.transformers.qwen2_vl.qwen2_vl_attn_forward`` (transformers' attention interface,
  hence :func:`~kawhi_kernels.integrations.capture_qk`, never runs). Taps of that module:
  ``_custom_flash_attention_forward`` (sp = 1; q/k [1, total, H, D]) and
  ``flash_attn_varlen_func`` (Ulysses sp > 1, after verl's all-to-all: all tokens of the padded
  packed row, query heads ``[rank·H/sp, (rank+1)·H/sp)``).
* :class:`VerlFlashAttentionAlphaTap` — models that keep transformers' attention interface
  under verl's patch (Qwen3-VL) with ``flash_attention_2/3``: verl binds
  ``_ulysses_flash_attention_forward`` into ``transformers.integrations.flash_attention``; it does
  the all-to-all (sp > 1) and calls ``verl.models.transformers.monkey_patch._flash_attention_forward``
  with q/k [1, L, H/sp, D] of all tokens — the tap (sp = 1 and sp > 1).
* Under ``sdpa`` / ``eager`` (sp = 1 only) the engine uses
  :func:`~kawhi_kernels.integrations.verl.capture_kawhi_alpha` (transformers' attention interface).
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ._patching import temporarily
from .transformers_capture import _find_text_model
from .verl import kawhi_alpha_packed

__all__ = ["VerlFlashAttentionAlphaTap", "VerlQwen2VLAlphaTap"]


def _boundaries_from_position_ids(position_ids: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens of a packed row from its text position ids (a sequence starts where they are 0),
    as verl's / transformers' ``prepare_fa2_from_position_ids``."""
    pos = position_ids.reshape(-1)[:total]
    starts = (pos == 0).nonzero().view(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=torch.int32, device=pos.device), starts])
    return torch.cat([starts, torch.tensor([total], dtype=torch.int32, device=pos.device)])


def _packed_qk(query_states: torch.Tensor, key_states: torch.Tensor, cu_seqlens, position_ids):
    """q [T, Hq, D], k [T, Hk, D] and int32 cu_seqlens of a packed flash-attention call whose q/k
    arrive as [1, T, H, D]: the call's own cu_seqlens when given, else derived from the position
    ids, else one sequence."""
    q = query_states.reshape(-1, *query_states.shape[-2:])
    k = key_states.reshape(-1, *key_states.shape[-2:])
    if cu_seqlens is None:
        cu_seqlens = _boundaries_from_position_ids(position_ids, q.shape[0]) if position_ids is not None \
            else torch.tensor([0, q.shape[0]], dtype=torch.int32)
    return q, k, cu_seqlens


class _AlphaTap:
    """Base of the α taps: layer gating, the α computation and the temporary module-global wraps.

    Args:
        model: the policy (unwrapped or FSDP-wrapped) after verl's ``apply_monkey_patch``.
        key_mask: bool [total] SGUF-selected image tokens of the packed row (unpadded).
        query_mask: bool [total] tokens whose α is wanted (response tokens); None = all.
        heads: global query heads to average (None = all); layer: decoder layer (−1 = last).
        sp_group: the Ulysses process group when sp > 1 (verl's
            ``get_ulysses_sequence_parallel_group()``); None = no sequence parallelism.
        backend: ``cosine_alignment`` backend.
    """

    module_name: str = ""                 # the module whose globals are wrapped
    targets: tuple[str, ...] = ()         # their names

    def __init__(self, model, *, key_mask: torch.Tensor, query_mask: torch.Tensor | None = None, heads=None,
                 layer: int = -1, sp_group=None, backend: str = "auto"):
        if key_mask.dtype != torch.bool or key_mask.dim() != 1:
            raise ValueError(f"key_mask: expected a 1-D bool tensor, got {key_mask.dtype} {tuple(key_mask.shape)}")
        if query_mask is not None and tuple(query_mask.shape) != tuple(key_mask.shape):
            raise ValueError(f"query_mask: expected shape {tuple(key_mask.shape)} (as key_mask), "
                             f"got {tuple(query_mask.shape)}")
        layers = _find_text_model(model).layers
        self.attention = layers[layer].self_attn
        self.key_mask = key_mask
        self.query_mask = query_mask
        self.heads = heads
        self.sp_group = sp_group
        self.backend = backend
        self.alpha: torch.Tensor | None = None
        self.seen: tuple[int, int] | None = None       # (tokens, local query heads) the tap saw last
        self._active = False
        self._stack: contextlib.ExitStack | None = None

    # -- shared pieces ---------------------------------------------------------------------------

    def _sp_rank_size(self) -> tuple[int, int]:
        if self.sp_group is None:
            return 0, 1
        import torch.distributed as dist

        return dist.get_rank(self.sp_group), dist.get_world_size(self.sp_group)

    def _compute(self, q: torch.Tensor, k: torch.Tensor, cu: torch.Tensor) -> None:
        """α from q [L, H_local, D], k [L, Hk_local, D] of all L ≥ total tokens of the packed row
        (L > total: Ulysses padding at the end), ``cu`` [S+1] its boundaries."""
        total, padded = self.key_mask.shape[0], q.shape[0]
        if padded < total:
            raise ValueError(f"key_mask: {total} tokens but the attention saw {padded}")
        rank, size = self._sp_rank_size()
        self.seen = (int(padded), int(q.shape[1]))
        device = q.device
        key_mask = torch.zeros(padded, dtype=torch.bool, device=device)
        key_mask[:total] = self.key_mask.to(device)
        query_mask = torch.zeros(padded, dtype=torch.bool, device=device)
        query_mask[:total] = True if self.query_mask is None else self.query_mask.to(device)
        alpha = kawhi_alpha_packed(q, k, cu.to(device), key_mask, query_mask, heads=self.heads,
                                   head_offset=rank * q.shape[1], num_heads=q.shape[1] * size, group=self.sp_group,
                                   backend=self.backend)
        self.alpha = alpha[:total]

    def _wrapper(self, name: str):
        """make_wrapper for global ``name``: returns a function (original) -> tapped function."""
        raise NotImplementedError

    # -- context ---------------------------------------------------------------------------------

    def __enter__(self):
        module = importlib.import_module(self.module_name)
        stack = contextlib.ExitStack()
        try:
            for name in self.targets:
                stack.enter_context(temporarily(module, name, self._wrapper(name)))

            def start(*_):
                self._active = True

            def stop(*_):
                self._active = False

            stack.callback(self.attention.register_forward_pre_hook(start).remove)
            stack.callback(self.attention.register_forward_hook(stop).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        if self._stack is not None:
            self._stack.close()
            self._stack = None


class VerlQwen2VLAlphaTap(_AlphaTap):
    """α of one decoder layer during a verl-patched Qwen2/2.5-VL forward (sp = 1 and Ulysses sp > 1);
    arguments as :class:`_AlphaTap`."""

    module_name = "verl.models.transformers.qwen2_vl"
    targets = ("_custom_flash_attention_forward", "flash_attn_varlen_func")

    def __enter__(self):
        module = importlib.import_module(self.module_name)
        if getattr(module, "flash_attn_varlen_func", None) is None:
            raise RuntimeError(f"{self.module_name}.flash_attn_varlen_func is missing: verl's Qwen2-VL remove-padding "
                               "path needs flash-attn (or a varlen stand-in bound there)")
        return super().__enter__()

    def _wrapper(self, name: str):
        if name == "_custom_flash_attention_forward":
            def wrap(original):
                def _custom_flash_attention_forward(query_states, key_states, *args, **kwargs):
                    if self._active and self.sp_group is None:
                        self._compute(*_packed_qk(query_states, key_states, None, kwargs.get("position_ids")))
                    return original(query_states, key_states, *args, **kwargs)
                return _custom_flash_attention_forward
            return wrap

        def wrap(original):
            def flash_attn_varlen_func(q, k, *args, **kwargs):
                if self._active and self.sp_group is not None:
                    self._compute(q, k, kwargs["cu_seqlens_q"])
                return original(q, k, *args, **kwargs)
            return flash_attn_varlen_func
        return wrap


class VerlFlashAttentionAlphaTap(_AlphaTap):
    """α of one decoder layer at ``verl.models.transformers.monkey_patch._flash_attention_forward``
    (after verl's Ulysses all-to-all when sp > 1): models on transformers' flash-attention interface
    under verl's patch, e.g. Qwen3-VL with ``attn_implementation="flash_attention_2"``; arguments as
    :class:`_AlphaTap`."""

    module_name = "verl.models.transformers.monkey_patch"
    targets = ("_flash_attention_forward",)

    def _wrapper(self, name: str):
        def wrap(original):
            def _flash_attention_forward(query_states, key_states, *args, **kwargs):
                if self._active:
                    self._compute(*_packed_qk(query_states, key_states, kwargs.get("cu_seq_lens_q"),
                                              kwargs.get("position_ids")))
                return original(query_states, key_states, *args, **kwargs)
            return _flash_attention_forward
        return wrap
