"""Capture post-RoPE Q/K of chosen text decoder layers of a Qwen-VL model in the forward that runs.

``capture_qk(model, layers)`` is a context manager. Inside it the *text* model's attention
implementation (``eager``, ``sdpa`` or ``flash_attention_2/3/4``) is swapped for a registered
wrapper named ``"kawhi_capture_<impl>"`` that hands the very same arguments to the original function
and, on the side and under ``torch.no_grad``, copies the post-RoPE queries and keys the layer
attends with into the packed variable-length layout of the ops (DESIGN.md §2). The original mask
function is registered under the same name, so transformers builds the same causal/padding mask.
The vision tower keeps its own implementation. No second forward pass; logits are bit-identical.

Layout of one forward (``B`` rows of length ``L`` as seen by the text model):

* sequences: one per batch row, or, for packed rows (``[1, L]`` with several sequences), split by
  the ``cu_seqlens`` argument, by ``cu_seq_lens_q/k`` given to the forward (flash varlen), or
  where the text position ids (row 0 of 4-row ``position_ids``) restart — transformers' own rule;
* keys: every non-pad token of each sequence (pads = zeros of the 2-D ``attention_mask``);
* queries: the non-pad tokens selected by ``query_mask`` [B, L] (default: all non-pad tokens).

With ``capture_lse=True`` each record also carries the softmax normaliser the layer's own
attention computed (``QKRecord.lse``, fp32 [Hq, total_q], natural log; see
:mod:`kawhi_kernels.integrations.attention_lse` for which kernels provide it), or ``None`` with the
reason in ``QKRecord.lse_source``. Off by default: then nothing but the Q/K copy is added.

Note: with ``sdpa``/``eager`` transformers itself only honours packing (restarting position ids
without an attention mask) when ``use_cache=False``; the capture always splits sequences.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .._validation import check_cu_seqlens, check_tensor

__all__ = ["CAPTURE_PREFIX", "SUPPORTED_ATTN_IMPLEMENTATIONS", "QKRecord", "QKCapture", "capture_qk"]

CAPTURE_PREFIX = "kawhi_capture_"
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")

# id(attention module) -> (module, session, layer index) for every layer captured right now.
_ACTIVE_LAYERS: dict[int, tuple[torch.nn.Module, "QKCapture", int]] = {}
_WRAPPERS: dict[str, Callable] = {}


@dataclass(frozen=True)
class QKRecord:
    """Post-RoPE Q/K of one decoder layer in one forward, packed varlen (S sequences).

    Attributes:
        layer: decoder layer index (non-negative).
        q: [total_q, Hq, D] selected query rows, model dtype and device.
        k: [total_k, Hk, D] all non-pad keys of every sequence (no GQA repeat).
        cu_seqlens_q, cu_seqlens_k: int32 [S+1] row offsets of each sequence in ``q`` / ``k``.
        q_batch, q_pos: int64 [total_q] batch row and column (in the [B, L] input) of each q row.
        k_batch, k_pos: int64 [total_k] batch row and column of each key.
        softmax_scale: the scale the layer uses (``module.scaling``, 1/sqrt(D) for Qwen).
        lse: with ``capture_lse``, fp32 [Hq, total_q] natural-log softmax normaliser of each q row
            over the keys the model let it see, as the layer's attention computed it (the layout of
            ``attention_mass(lse=...)``); None when not captured or not available.
        lse_source: None without ``capture_lse``; else the op it came from ("sdpa_flash",
            "sdpa_flash_cpu", "flash_attn", "flash_attn_varlen", "eager_scores") or
            "none: <why no lse was available>".
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    q_batch: torch.Tensor
    q_pos: torch.Tensor
    k_batch: torch.Tensor
    k_pos: torch.Tensor
    softmax_scale: float
    lse: torch.Tensor | None = None
    lse_source: str | None = None

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    def queries_are_suffix(self) -> bool:
        """True when the q rows of every sequence are its last keys (e.g. response tokens at the
        end). Then bottom-right causal alignment (``causal=True`` in the ops) reproduces the
        model's causal mask exactly; otherwise rows see too many keys."""
        nq = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).tolist()
        cq, ck = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        for s, n in enumerate(nq):
            if n == 0:
                continue
            q_cols = self.q_pos[cq[s]:cq[s + 1]]
            k_cols = self.k_pos[ck[s + 1] - n:ck[s + 1]]
            q_rows = self.q_batch[cq[s]:cq[s + 1]]
            k_rows = self.k_batch[ck[s + 1] - n:ck[s + 1]]
            if ck[s + 1] - ck[s] < n or not (torch.equal(q_cols, k_cols) and torch.equal(q_rows, k_rows)):
                return False
        return True


@dataclass(frozen=True)
class _Layout:
    """Row/key selection of one forward, shared by all captured layers."""

    batch: int
    length: int
    q_batch: torch.Tensor
    q_pos: torch.Tensor
    k_batch: torch.Tensor
    k_pos: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    lse_targets: object = None      # attention_lse.LSETargets when the lse is captured


def _text_model_classes() -> tuple[type, ...]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    return (Qwen2VLTextModel, Qwen2_5_VLTextModel, Qwen3VLTextModel)


def _find_text_model(model) -> torch.nn.Module:
    """The decoder (``...TextModel``) of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model, or TypeError."""
    classes = _text_model_classes()
    for candidate in (model, getattr(model, "language_model", None),
                      getattr(getattr(model, "model", None), "language_model", None)):
        if isinstance(candidate, classes):
            return candidate
    raise TypeError(
        "model: expected a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model (…ForConditionalGeneration, …Model or "
        f"…TextModel), got {type(model).__name__}"
    )


def _normalise_layers(layers, num_layers: int) -> list[int]:
    if isinstance(layers, str) and layers == "all":
        return list(range(num_layers))
    if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"layers: expected a list of ints (negative = from the end) or 'all', got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers: expected at least one layer index, got an empty list")
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"layers: indices must be in [-{num_layers}, {num_layers}) for a text model with "
                         f"{num_layers} decoder layers, got {bad}")
    norm = [i % num_layers for i in layers]
    if len(set(norm)) != len(norm):
        raise ValueError(f"layers: indices must name distinct layers, got {list(layers)}")
    return norm


def _original_attention(module: torch.nn.Module, impl: str) -> Callable:
    """The function ``module`` itself would call for ``impl`` (its modeling file's eager function
    for "eager", else the file's ``ALL_ATTENTION_FUNCTIONS`` entry)."""
    modeling = sys.modules[type(module).__module__]
    if impl == "eager":
        return modeling.eager_attention_forward
    return modeling.ALL_ATTENTION_FUNCTIONS[impl]


def _wrapper_for(impl: str) -> Callable:
    """The attention function registered as ``CAPTURE_PREFIX + impl`` (one per implementation)."""
    if impl in _WRAPPERS:
        return _WRAPPERS[impl]

    def kawhi_capture_attention(module, query, key, value, attention_mask, **kwargs):
        entry = _ACTIVE_LAYERS.get(id(module))
        pending = None
        if entry is not None and entry[0] is module:
            pending = entry[1]._capture(entry[2], module, query, key)
        original = _original_attention(module, impl)
        # The original may read the implementation name from the config (flash picks its kernel
        # from it), so it sees its own name while it runs.
        config = module.config
        wrapped = config._attn_implementation_internal
        config._attn_implementation_internal = impl
        try:
            if pending is None:
                return original(module, query, key, value, attention_mask, **kwargs)
            # capture_lse: the same call, watched for the normaliser its kernel returns.
            from .attention_lse import run_watched

            targets = dataclasses.replace(entry[1]._layout.lse_targets, q_rows=pending.q)
            out, found = run_watched(original, targets, eager=impl == "eager",
                                     args=(module, query, key, value, attention_mask), kwargs=kwargs)
        finally:
            config._attn_implementation_internal = wrapped
        entry[1]._deliver(dataclasses.replace(pending, lse=found.lse, lse_source=found.source))
        return out

    kawhi_capture_attention.__qualname__ = f"kawhi_capture_attention[{impl}]"
    _WRAPPERS[impl] = kawhi_capture_attention
    return kawhi_capture_attention


def _register(impl: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = CAPTURE_PREFIX + impl
    AttentionInterface.register(name, _wrapper_for(impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def _sequence_ids(batch: int, length: int, device, cu_seqlens: torch.Tensor | None,
                  text_position_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sequence id of every position (int64 [B, L], non-decreasing in row-major order) and the
    number of sequences S."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        flat = torch.arange(batch * length, device=device)
        seq = torch.searchsorted(cu[1:], flat, right=True).view(batch, length)
        return seq, cu.numel() - 1
    if text_position_ids is not None:
        pos = text_position_ids.to(device).expand(batch, length)
        starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
        starts[:, 0] = True
        seq = starts.reshape(-1).long().cumsum(0).sub(1).view(batch, length)
        return seq, int(starts.sum())
    return torch.arange(batch, device=device)[:, None].expand(batch, length), batch


def _build_layout(batch: int, length: int, device, attention_mask: torch.Tensor | None,
                  cu_seqlens: torch.Tensor | None, text_position_ids: torch.Tensor | None,
                  query_mask: torch.Tensor | None, lse_heads: int | None = None) -> _Layout:
    seq, num_seq = _sequence_ids(batch, length, device, cu_seqlens, text_position_ids)
    valid = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
             else attention_mask.to(device).bool())
    seq_flat = seq.reshape(-1)

    def pick(mask: torch.Tensor):
        idx = mask.reshape(-1).nonzero().squeeze(1)
        counts = torch.bincount(seq_flat[idx], minlength=num_seq)
        cu = torch.zeros(num_seq + 1, dtype=torch.int32, device=device)
        cu[1:] = counts.cumsum(0)
        return idx // length, idx % length, cu

    k_batch, k_pos, cu_k = pick(valid)
    # Query rows = query_mask AND the non-pad tokens: a query_mask that marks pad positions (e.g.
    # all True over a padded batch) must not turn pads into q rows. Pads are never keys, so the
    # q rows are always a subset of the k rows of their sequence.
    q_sel = valid
    if query_mask is not None:
        q_sel = valid & query_mask.to(device=device, dtype=torch.bool)
    q_batch, q_pos, cu_q = pick(q_sel)
    targets = None
    if lse_heads is not None:
        from .attention_lse import LSETargets

        # Index of each q row among the keys (both row-major, q ⊂ k): the token order of varlen kernels.
        q_in_k = torch.searchsorted(k_batch * length + k_pos, q_batch * length + q_pos)
        targets = LSETargets(batch, length, lse_heads, q_batch, q_pos, q_in_k, cu_k)
    return _Layout(batch, length, q_batch, q_pos, k_batch, k_pos, cu_q, cu_k, targets)


class QKCapture:
    """Context manager returned by :func:`capture_qk`; see there.

    After a forward inside the context, ``records`` maps each captured layer index (non-negative)
    to its :class:`QKRecord` (only the most recent forward is kept; with ``on_layer`` nothing is
    stored). ``num_forwards`` counts the text-model forwards seen."""

    def __init__(self, model, layers, *, query_mask=None, cu_seqlens=None, on_layer=None, capture_lse=False):
        self.text_model = _find_text_model(model)
        if capture_lse not in (False, True, "require"):
            raise ValueError(f"capture_lse: expected False, True or 'require', got {capture_lse!r}")
        self.capture_lse = capture_lse
        self.layers = _normalise_layers(layers, len(self.text_model.layers))
        if query_mask is not None:
            check_tensor("query_mask", query_mask, ndim=2, dtypes=(torch.bool,))
        if cu_seqlens is not None:
            check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if on_layer is not None and not callable(on_layer):
            raise TypeError(f"on_layer: expected a callable on_layer(layer_idx, record), got {type(on_layer).__name__}")
        self.query_mask = query_mask
        self.cu_seqlens = cu_seqlens
        self.on_layer = on_layer
        self.records: dict[int, QKRecord] = {}
        self.num_forwards = 0
        self._layout: _Layout | None = None
        self._done: set[int] = set()
        self._saved_impl: list[tuple[object, str]] = []
        self._hook = None
        self._attn_modules = [self.text_model.layers[i].self_attn for i in self.layers]
        self._configs = self._text_configs()
        impls = {c._attn_implementation for c in self._configs}
        impl = impls.pop() if len(impls) == 1 else None
        if impl is not None and impl.startswith(CAPTURE_PREFIX):
            raise RuntimeError("capture_qk: this model is already inside a capture_qk context (nesting is not supported)")
        if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation: the text model uses {impl!r}; capture_qk supports "
                             f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}")
        self.attn_implementation = impl
        self._forward_params = list(inspect.signature(self.text_model.forward).parameters)

    def _text_configs(self) -> list:
        """Distinct config objects read by the text model and its attention layers."""
        configs = [self.text_model.config] + [layer.self_attn.config for layer in self.text_model.layers]
        unique: dict[int, object] = {}
        for c in configs:
            unique.setdefault(id(c), c)
        return list(unique.values())

    # -- context protocol -------------------------------------------------------------------------
    def __enter__(self) -> "QKCapture":
        name = _register(self.attn_implementation)
        for module, layer in zip(self._attn_modules, self.layers):
            if id(module) in _ACTIVE_LAYERS:
                raise RuntimeError("capture_qk: this model is already inside a capture_qk context")
        try:
            for c in self._configs:
                self._saved_impl.append((c, c._attn_implementation_internal))
                c._attn_implementation_internal = name
            self._hook = self.text_model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            for module, layer in zip(self._attn_modules, self.layers):
                _ACTIVE_LAYERS[id(module)] = (module, self, layer)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        for module in self._attn_modules:
            entry = _ACTIVE_LAYERS.get(id(module))
            if entry is not None and entry[1] is self:
                del _ACTIVE_LAYERS[id(module)]
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for c, impl in reversed(self._saved_impl):
            c._attn_implementation_internal = impl
        self._saved_impl.clear()
        self._layout = None

    # -- per forward --------------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        inputs = dict(zip(self._forward_params, args))
        inputs.update(kwargs)
        embeds, ids = inputs.get("inputs_embeds"), inputs.get("input_ids")
        ref = embeds if embeds is not None else ids
        batch, length = ref.shape[0], ref.shape[1]
        device = ref.device

        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask: capture_qk needs a 2-D padding mask [B, L] or None, got {shape}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask: expected shape {(batch, length)}, got {tuple(attention_mask.shape)}")
        cache = inputs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("past_key_values: capture_qk captures full forwards only (prefill / training), "
                             "not incremental decoding with a non-empty cache")
        if self.query_mask is not None and tuple(self.query_mask.shape) != (batch, length):
            raise ValueError(f"query_mask: expected shape {(batch, length)} (the input's [B, L]), "
                             f"got {tuple(self.query_mask.shape)}")

        cu = self._packed_cu_seqlens(inputs, batch, length)
        position_ids = inputs.get("position_ids")
        text_positions = None
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            text_positions = position_ids[0]
        heads = self._attn_modules[0].config.num_attention_heads if self.capture_lse else None
        self._layout = _build_layout(batch, length, device, attention_mask, cu,
                                     text_positions if attention_mask is None else None, self.query_mask,
                                     lse_heads=heads)
        self._done = set()
        self.num_forwards += 1
        if self.on_layer is None:
            self.records = {}

    def _packed_cu_seqlens(self, inputs: dict, batch: int, length: int) -> torch.Tensor | None:
        if self.cu_seqlens is not None:
            return check_cu_seqlens("cu_seqlens", self.cu_seqlens, batch * length)
        cu_q, cu_k = inputs.get("cu_seq_lens_q"), inputs.get("cu_seq_lens_k")
        if cu_q is None and cu_k is None:
            return None
        if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError("cu_seq_lens_q/cu_seq_lens_k: capture_qk needs both, and equal (self-attention)")
        return check_cu_seqlens("cu_seq_lens_q", cu_q, batch * length)

    def _capture(self, layer: int, module, query: torch.Tensor, key: torch.Tensor) -> QKRecord | None:
        """Called by the wrapper with the layer's post-RoPE query [B, Hq, L, D], key [B, Hk, L, D].
        Delivers the record at once, or, with ``capture_lse``, returns it for the wrapper to
        complete with the lse of the attention call and :meth:`_deliver`."""
        layout = self._layout
        if layout is None:
            raise RuntimeError("capture_qk: attention ran without passing through the text model's forward")
        if layer in self._done:  # activation-checkpoint recomputation of the same forward
            return None
        b, _, lq, _ = query.shape
        if (b, lq) != (layout.batch, layout.length) or key.shape[2] != lq \
                or (layout.lse_targets is not None and query.shape[1] != layout.lse_targets.num_heads):
            raise ValueError(f"capture_qk: layer {layer} got query {tuple(query.shape)} and key {tuple(key.shape)}; "
                             f"expected batch {layout.batch} and {layout.length} query and key positions")
        dev = query.device
        with torch.no_grad():
            q = query.detach()[layout.q_batch.to(dev), :, layout.q_pos.to(dev)]
            k = key.detach()[layout.k_batch.to(dev), :, layout.k_pos.to(dev)]
        record = QKRecord(layer=layer, q=q, k=k, cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_k=layout.cu_seqlens_k,
                          q_batch=layout.q_batch, q_pos=layout.q_pos, k_batch=layout.k_batch, k_pos=layout.k_pos,
                          softmax_scale=float(module.scaling))
        self._done.add(layer)
        if self.capture_lse:
            return record
        self._deliver(record)
        return None

    def _deliver(self, record: QKRecord) -> None:
        if self.capture_lse == "require" and record.lse is None:
            raise RuntimeError(f"capture_lse='require': layer {record.layer} ({self.attn_implementation}) gave no "
                               f"lse: {record.lse_source[len('none: '):]}")
        if self.on_layer is not None:
            self.on_layer(record.layer, record)
        else:
            self.records[record.layer] = record


def capture_qk(model, layers: Sequence[int] | str, *, query_mask: torch.Tensor | None = None,
               cu_seqlens: torch.Tensor | None = None,
               on_layer: Callable[[int, QKRecord], None] | None = None,
               capture_lse: bool | str = False) -> QKCapture:
    """Context manager capturing post-RoPE Q/K of ``layers`` of a Qwen-VL text model, in the forward
    that runs (no extra pass), under ``torch.no_grad`` (tensors detached).

    Args:
        model: ``Qwen2VL``/``Qwen2_5_VL``/``Qwen3VL`` ``…ForConditionalGeneration``, ``…Model`` or
            ``…TextModel`` whose text attention is eager, sdpa or flash_attention_2/3/4.
        layers: list of decoder-layer indices (negative from the end: -1 = last) or ``"all"``.
        query_mask: optional bool [B, L] selecting the q rows to keep (e.g. response tokens);
            pad positions are never kept. Default: every non-pad row.
        cu_seqlens: optional int32/int64 [S+1] splitting the flattened B·L positions (normally a
            packed ``[1, L]`` batch) into S sequences; otherwise taken from ``cu_seq_lens_q/k``
            forward kwargs or restarting text position ids, else one sequence per batch row.
        on_layer: optional ``on_layer(layer_idx, record)`` called for each captured layer during
            the forward; nothing is stored in ``records`` then.
        capture_lse: False (default: no watcher, nothing extra), True (each record also carries
            the normaliser the layer's attention computed, ``record.lse`` fp32 [Hq, total_q], or
            None with the reason in ``record.lse_source``) or "require" (RuntimeError when a layer
            gives none). The attention call is then run under a pass-through dispatch mode; its
            outputs are unchanged. Consumers that use cosine alignment only need no lse.

    Returns a :class:`QKCapture`; use ``with capture_qk(model, [-1]) as cap: model(**inputs)`` and
    read ``cap.records[layer]`` (:class:`QKRecord`, packed varlen q [total_q, Hq, D],
    k [total_k, Hk, D], cu_seqlens int32 [S+1], index maps). The text config's attention
    implementation is restored on exit, also on exceptions.

    Raises TypeError for an unsupported model or wrongly typed argument, ValueError for a layer
    index out of range, a wrong ``query_mask`` / ``cu_seqlens`` shape (checked at the forward) or
    an unsupported attention implementation.
    """
    return QKCapture(model, layers, query_mask=query_mask, cu_seqlens=cu_seqlens, on_layer=on_layer,
                     capture_lse=capture_lse)
