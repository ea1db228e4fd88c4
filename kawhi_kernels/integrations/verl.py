"""verl integration: the ``grpo_kawhi`` advantage estimator and the actor-side α statistic.

Data flow in a verl PPO step (see ``examples/verl_grpo_kawhi.md`` for the full recipe):

1. agent-loop workers, where the raw images are: SGUF once per prompt image → the bool key mask
   ``kawhi_key_mask`` over prompt + response (padded [B, P+R] in the legacy trainer, one unpadded
   row per sample in the v1 TransferQueue; :mod:`~kawhi_kernels.integrations.verl_agent_loop`);
2. actor, inside the old-log-prob forward that already runs (remove-padding layout, one packed
   row, ``cu_seqlens`` from the unpadded lengths): α for every response token from the chosen
   layer's post-RoPE Q/K → ``kawhi_alpha``, a per-token model output like verl's ``entropy``;
   under Ulysses sequence parallelism, with head-sharded Q/K after the all-to-all,
   :func:`kawhi_alpha_packed` reduces partial sums over local heads across the group
   (:mod:`~kawhi_kernels.integrations.verl_engine`, taps in :mod:`~kawhi_kernels.integrations.verl_actor`);
3. trainer: :func:`kawhi_token_weights_from_alpha` → ``kawhi_token_weights`` [B, R] (the patched
   v1 and legacy ``_compute_old_log_prob``);
4. ``algorithm.adv_estimator=grpo_kawhi``: :func:`compute_grpo_kawhi_advantage` — verl's GRPO
   outcome advantage times the weights. verl's generic ``compute_advantage`` passes an estimator
   only ``token_level_rewards``, ``response_mask``, ``index`` and ``config``, so
   :func:`patch_verl_compute_advantage` routes ``grpo_kawhi`` through :func:`compute_kawhi_advantage`,
   which also reads the weights from the batch. The ``verl.plugins`` entry point
   (:mod:`~kawhi_kernels.integrations.verl_plugin`) applies the registration and all patches in
   every process that imports verl, for the v1 and the legacy trainer.

Per-token convention: own position (see :func:`to_verl_token_layout`).

Config keys (``algorithm.kawhi.*``, read by :func:`kawhi_from_config`): ``tau`` (0.05), ``lam``
(0.1), ``w_min`` (0.1), ``w_max`` (1.0), ``rescale`` (null | "mean"), ``heads`` (null = all, a
list, or a preset name such as "qwen2.5-vl-7b"), ``layer`` (−1), ``sigma`` (1.0), ``delta_s``
(0.5), ``delta_l`` (30), ``beta`` (0.1), ``skip_ratio`` (0.7), ``seed`` (null). The estimator also
honours ``algorithm.norm_adv_by_std_in_grpo`` like verl's ``grpo``.

verl is optional: everything here but the registration and the patch works without it;
importing this module registers ``grpo_kawhi`` when ``verl`` is importable.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import _validation as V
from ..credit.advantages import packed_to_padded, padded_to_packed
from ..credit.paragraphs import paragraph_ids_batch
from ..credit.pipeline import KAWHI
from ..credit.weights import paragraph_weights
from ..ops.cosine_alignment import cosine_alignment
from ._patching import patch_attribute
from .distributed import allreduce_head_partial_sums, group_rank_and_size
from .transformers_capture import QKRecord, capture_qk

__all__ = [
    "ESTIMATOR_NAME",
    "KAWHI_CONFIG_DEFAULTS",
    "WEIGHTS_KEY",
    "KAWHIAlphaCapture",
    "capture_kawhi_alpha",
    "compute_grpo_kawhi_advantage",
    "compute_kawhi_advantage",
    "kawhi_alpha_packed",
    "kawhi_from_config",
    "kawhi_token_weights_from_alpha",
    "packed_response_values",
    "patch_verl_compute_advantage",
    "register_verl_estimator",
    "to_verl_token_layout",
]

ESTIMATOR_NAME = "grpo_kawhi"
WEIGHTS_KEY = "kawhi_token_weights"
KAWHI_CONFIG_DEFAULTS = dict(tau=0.05, lam=0.1, w_min=0.1, w_max=1.0, rescale=None, heads=None, layer=-1,
                             sigma=1.0, delta_s=0.5, delta_l=30.0, beta=0.1, skip_ratio=0.7, seed=None)


def _cfg_get(config, key: str, default=None):
    """``config[key]`` for dicts / OmegaConf DictConfig / dataclass-like configs, else default."""
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except TypeError:
            pass
    return getattr(config, key, default)


def kawhi_from_config(algorithm_config) -> tuple[KAWHI, int]:
    """(:class:`~kawhi_kernels.KAWHI`, layer) from ``algorithm.kawhi`` (or the ``kawhi`` mapping
    itself); missing keys take :data:`KAWHI_CONFIG_DEFAULTS`."""
    section = _cfg_get(algorithm_config, "kawhi", None)
    section = algorithm_config if section is None else section
    values = {key: _cfg_get(section, key, default) for key, default in KAWHI_CONFIG_DEFAULTS.items()}
    heads = values.pop("heads")
    if heads is not None and not isinstance(heads, str):
        heads = [int(h) for h in heads]
    layer = int(values.pop("layer"))
    return KAWHI(heads=heads, **values), layer


# ------------------------------------------------------------------------------ advantage estimator


def _group_index(index, batch: int) -> torch.Tensor:
    """int64 [B] dense group ids from verl's ``index`` (np array of uids, list or int tensor)."""
    if isinstance(index, torch.Tensor):
        values = index.tolist()
    elif isinstance(index, (np.ndarray, list, tuple)):
        values = list(index)
    else:
        raise TypeError(f"index: expected an array of group ids (uids), got {type(index).__name__}")
    if len(values) != batch:
        raise ValueError(f"index: expected {batch} group ids (one per response), got {len(values)}")
    dense: dict = {}
    return torch.tensor([dense.setdefault(v, len(dense)) for v in values], dtype=torch.int64)


def compute_grpo_kawhi_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config=None,
    kawhi_token_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``grpo_kawhi``: GRPO outcome advantage × KAWHI token weights.

    The group statistics follow verl's ``grpo`` estimator: score s_i = Σ_t token_level_rewards;
    per group (same ``index``) A_i = (s_i − mean) / (std + ε) with the unbiased std (n − 1), or
    s_i − mean when ``norm_adv_by_std_in_grpo`` is False; a group of one response has mean 0 and
    std 1. Then Â_{i,t} = A_i · w_{i,t} · response_mask_{i,t}.

    Args:
        token_level_rewards: float [B, R]; response_mask: [B, R] (0/1 or bool).
        index: B group ids (verl's ``non_tensor_batch["uid"]``).
        epsilon: ε added to the std.
        norm_adv_by_std_in_grpo: divide by the std; None reads ``config.norm_adv_by_std_in_grpo``
            (default True).
        config: verl ``AlgoConfig`` / mapping (optional).
        kawhi_token_weights: float [B, R] paragraph weights (``data.batch["kawhi_token_weights"]``);
            required — see :func:`patch_verl_compute_advantage`.
    Returns:
        (advantages, returns), both float32 [B, R] (the same tensor, as verl's ``grpo``).
    """
    V.check_tensor("token_level_rewards", token_level_rewards, ndim=2, dtypes=V.FLOAT_DTYPES)
    shape = tuple(token_level_rewards.shape)
    device = token_level_rewards.device
    V.check_tensor("response_mask", response_mask, ndim=2, device=device)
    if tuple(response_mask.shape) != shape:
        raise ValueError(f"response_mask: expected shape {list(shape)}, got {tuple(response_mask.shape)}")
    if kawhi_token_weights is None:
        raise ValueError(
            f"kawhi_token_weights: the '{ESTIMATOR_NAME}' estimator needs data.batch['{WEIGHTS_KEY}'] [B, R]; "
            "verl's compute_advantage does not pass batch fields to registered estimators, so call "
            "kawhi_kernels.integrations.verl.patch_verl_compute_advantage() once in the driver (or use "
            "compute_kawhi_advantage(data))")
    V.check_tensor("kawhi_token_weights", kawhi_token_weights, ndim=2, dtypes=V.FLOAT_DTYPES)
    if tuple(kawhi_token_weights.shape) != shape:
        raise ValueError(f"kawhi_token_weights: expected shape {list(shape)} (as token_level_rewards), "
                         f"got {tuple(kawhi_token_weights.shape)}")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    group = _group_index(index, shape[0]).to(device)
    with torch.no_grad():
        scores = token_level_rewards.to(torch.float32).sum(-1)
        num_groups = int(group.max()) + 1 if group.numel() else 0
        count = torch.zeros(num_groups, device=device).index_add_(0, group, torch.ones_like(scores))
        mean = torch.zeros(num_groups, device=device).index_add_(0, group, scores) / count
        dev = scores - mean[group]
        var = torch.zeros(num_groups, device=device).index_add_(0, group, dev * dev) / (count - 1).clamp_min(1.0)
        single = (count == 1)[group]
        mean_i = torch.where(single, torch.zeros_like(scores), mean[group])
        std_i = torch.where(single, torch.ones_like(scores), var.sqrt()[group])
        adv = scores - mean_i
        if norm_adv_by_std_in_grpo:
            adv = adv / (std_i + epsilon)
        out = adv[:, None] * response_mask.to(torch.float32) * kawhi_token_weights.to(device, torch.float32)
    return out, out


def compute_kawhi_advantage(data, *, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool | None = None,
                            config=None, weights_key: str = WEIGHTS_KEY):
    """Run ``grpo_kawhi`` on a verl ``DataProto`` (or anything with ``.batch`` and
    ``.non_tensor_batch`` mappings): reads ``token_level_rewards``, ``response_mask``,
    ``non_tensor_batch["uid"]`` and ``batch[weights_key]``; writes ``advantages`` and ``returns``
    into ``data.batch``; returns ``data``."""
    batch = data.batch
    for key in ("token_level_rewards", "response_mask", weights_key):
        if key not in batch.keys():
            raise KeyError(f"data.batch: missing '{key}' needed by the '{ESTIMATOR_NAME}' estimator")
    if "uid" not in data.non_tensor_batch:
        raise KeyError("data.non_tensor_batch: missing 'uid' (the prompt group ids)")
    advantages, returns = compute_grpo_kawhi_advantage(
        batch["token_level_rewards"], batch["response_mask"], data.non_tensor_batch["uid"], epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config, kawhi_token_weights=batch[weights_key])
    batch["advantages"] = advantages
    batch["returns"] = returns
    return data


def register_verl_estimator(core_algos=None) -> None:
    """Register :func:`compute_grpo_kawhi_advantage` as ``"grpo_kawhi"`` with verl's
    ``register_adv_est`` (idempotent). ``core_algos``: the module (default
    ``verl.trainer.ppo.core_algos``); ImportError with a clear message when verl is missing."""
    if core_algos is None:
        try:
            from verl.trainer.ppo import core_algos
        except ImportError as err:
            raise ImportError("register_verl_estimator: verl is not installed (pip install verl)") from err
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    existing = registry.get(ESTIMATOR_NAME)
    if existing is compute_grpo_kawhi_advantage:
        return
    if existing is not None and getattr(existing, "__qualname__", "") == compute_grpo_kawhi_advantage.__qualname__ \
            and getattr(existing, "__module__", "") == compute_grpo_kawhi_advantage.__module__:
        registry[ESTIMATOR_NAME] = compute_grpo_kawhi_advantage  # this module was re-imported
        return
    core_algos.register_adv_est(ESTIMATOR_NAME)(compute_grpo_kawhi_advantage)


def patch_verl_compute_advantage(modules=None) -> None:
    """Route ``adv_estimator == "grpo_kawhi"`` in verl's ``compute_advantage`` through
    :func:`compute_kawhi_advantage` (which reads ``data.batch["kawhi_token_weights"]``); every other
    estimator goes to verl's original function. Idempotent.

    Args:
        modules: modules whose ``compute_advantage`` global to wrap; default
            ``verl.trainer.ppo.ray_trainer`` and, when present, ``verl.trainer.ppo.v1.utils``
            (its trainer only fetches fixed fields from the transfer queue: add
            ``"kawhi_token_weights"`` there, or use the legacy trainer).
    """
    if modules is None:
        import importlib

        try:
            modules = [importlib.import_module("verl.trainer.ppo.ray_trainer")]
        except ImportError as err:
            raise ImportError("patch_verl_compute_advantage: verl is not installed (pip install verl)") from err
        try:
            modules.append(importlib.import_module("verl.trainer.ppo.v1.utils"))
        except ImportError:
            pass
    for module in modules:
        patch_attribute(module, "compute_advantage", _make_compute_advantage)


def _make_compute_advantage(original):
    def compute_advantage(data, adv_estimator, *args, **kwargs):
        name = getattr(adv_estimator, "value", adv_estimator)
        if name != ESTIMATOR_NAME:
            return original(data, adv_estimator, *args, **kwargs)
        if "response_mask" not in data.batch.keys():
            # verl derives it from the attention mask when the trainer did not store it.
            return original(data, adv_estimator, *args, **kwargs)
        return compute_kawhi_advantage(data, norm_adv_by_std_in_grpo=kwargs.get("norm_adv_by_std_in_grpo"),
                                       config=kwargs.get("config"))
    return compute_advantage


# ------------------------------------------------------------------------------ actor-side statistic


def kawhi_alpha_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    *,
    heads: Sequence[int] | None = None,
    head_offset: int = 0,
    num_heads: int | None = None,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """α per token of packed (remove-padding) sequences, optionally from head-sharded Q/K.

    α_t = mean over the selected heads h of q̂_t^h · k̄^h, k̄^h = mean unit key of the selected
    image keys of t's own sequence (KAWHI Eq. 13). With ``group`` (Ulysses sequence parallelism,
    after the all-to-all) this rank holds query heads ``[head_offset, head_offset + Hq_local)`` of
    every token; partial sums over its heads are all-reduced with
    :func:`~kawhi_kernels.integrations.distributed.allreduce_head_partial_sums`.

    Args:
        q: [total, Hq_local, D] post-RoPE queries of all packed tokens (one packed row).
        k: [total, Hk_local, D] keys of the same tokens; local query head i reads local KV head
            i // (Hq_local / Hk_local) (standard GQA within the shard).
        cu_seqlens: int32/int64 [B+1] sequence boundaries of the packing (verl:
            ``input_ids.offsets()`` / the unpadded lengths).
        key_mask: bool [total], True at SGUF-selected image keys.
        query_mask: bool [total], True at tokens whose α is wanted (response tokens); None = all.
        heads: global query-head indices to average (None: all ``num_heads``).
        head_offset: global index of local head 0 (:func:`~kawhi_kernels.integrations.distributed.local_head_range`).
        num_heads: total query heads H (default Hq_local × group size).
        group: process group of the head shards (the Ulysses SP group); None: no reduction, this
            process holds all heads (data-parallel ranks must not be reduced over).
        backend: ``cosine_alignment`` backend.
    Returns:
        float32 [total]: α at query tokens, 0 elsewhere (also 0 for a sequence with no selected key).
        Every rank of the group gets the full result; all ranks must call it.
    """
    V.check_qk_pair(q, k)
    total, hq_local = q.shape[0], q.shape[1]
    device = q.device
    if k.shape[0] != total:
        raise ValueError(f"k: expected {total} rows (as q: all packed tokens), got {k.shape[0]}")
    V.check_cu_seqlens("cu_seqlens", cu_seqlens, total, device=device)
    V.check_tensor("key_mask", key_mask, ndim=1, dtypes=(torch.bool,), device=device)
    if key_mask.shape[0] != total:
        raise ValueError(f"key_mask: expected {total} entries, got {key_mask.shape[0]}")
    if query_mask is None:
        query_mask = torch.ones(total, dtype=torch.bool, device=device)
    V.check_tensor("query_mask", query_mask, ndim=1, dtypes=(torch.bool,), device=device)
    if query_mask.shape[0] != total:
        raise ValueError(f"query_mask: expected {total} entries, got {query_mask.shape[0]}")
    size = group_rank_and_size(group)[1] if group is not None else 1
    num_heads = hq_local * size if num_heads is None else V.check_positive_int("num_heads", num_heads)
    V.check_positive_int("head_offset", head_offset, allow_zero=True)
    if head_offset + hq_local > num_heads:
        raise ValueError(f"head_offset: local heads [{head_offset}, {head_offset + hq_local}) exceed num_heads={num_heads}")
    selected = V.check_heads(None if heads is None else list(heads), num_heads)
    local = [h - head_offset for h in selected if head_offset <= h < head_offset + hq_local]

    rows = query_mask.nonzero().squeeze(1)
    seq_of_token = torch.searchsorted(cu_seqlens.to(torch.int64)[1:], torch.arange(total, device=device), right=True)
    counts = torch.bincount(seq_of_token[rows], minlength=cu_seqlens.numel() - 1)
    cu_q = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=device)
    cu_q[1:] = counts.cumsum(0)
    partial = torch.zeros(rows.numel(), dtype=torch.float32, device=device)
    if local and rows.numel():
        key_region = torch.where(key_mask, 0, -1).to(torch.int32)
        per_head = cosine_alignment(q[rows], k, cu_q, cu_seqlens.to(torch.int32), key_region, 1, heads=local,
                                    per_head=True, backend=backend)
        partial = per_head[:, :, 0].sum(dim=1).to(torch.float32)
    if group is not None:
        alpha_rows = allreduce_head_partial_sums(partial, len(local), group=group)
    else:
        alpha_rows = partial / len(local) if local else partial
    alpha = torch.zeros(total, dtype=torch.float32, device=device)
    alpha[rows] = alpha_rows.to(torch.float32)
    return alpha


class KAWHIAlphaCapture:
    """Context manager of :func:`capture_kawhi_alpha`; after the forward, ``alpha`` is float32
    [total] (α at query tokens, 0 elsewhere) and ``nested()`` gives it as a jagged nested tensor
    split by ``cu_seqlens``, the form of verl's per-token outputs."""

    def __init__(self, model, *, cu_seqlens, key_mask, query_mask=None, heads=None, layer: int = -1,
                 backend: str = "auto"):
        self.cu_seqlens = cu_seqlens
        self.key_mask = key_mask
        self.query_mask = query_mask
        self.heads = heads
        self.backend = backend
        self.alpha: torch.Tensor | None = None
        self._capture = capture_qk(model, [layer], cu_seqlens=cu_seqlens, on_layer=self._on_layer)

    def _on_layer(self, layer: int, record: QKRecord) -> None:
        total = record.q.shape[0]
        if record.k.shape[0] != total:
            raise ValueError("capture_kawhi_alpha: expected the packed remove-padding forward (no padding tokens)")
        device = record.q.device
        query_mask = None if self.query_mask is None else self.query_mask.to(device)
        self.alpha = kawhi_alpha_packed(record.q, record.k, record.cu_seqlens_k.to(device), self.key_mask.to(device),
                                        query_mask, heads=self.heads, backend=self.backend)

    def nested(self) -> torch.Tensor:
        if self.alpha is None:
            raise RuntimeError("capture_kawhi_alpha: no forward ran inside the context")
        return torch.nested.nested_tensor_from_jagged(self.alpha, self.cu_seqlens.to(self.alpha.device, torch.int64))

    def __enter__(self) -> KAWHIAlphaCapture:
        self._capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._capture.__exit__(*exc)


def capture_kawhi_alpha(model, *, cu_seqlens: torch.Tensor, key_mask: torch.Tensor,
                        query_mask: torch.Tensor | None = None, heads=None, layer: int = -1,
                        backend: str = "auto") -> KAWHIAlphaCapture:
    """Compute KAWHI's α inside the actor's remove-padding log-prob forward (no extra pass).

    Use around verl's forward over the packed row ``input_ids_rmpad`` [1, total]::

        with capture_kawhi_alpha(module, cu_seqlens=cu, key_mask=key_rmpad, query_mask=resp_rmpad,
                                 heads=kawhi.heads) as tap:
            output = module(input_ids=input_ids_rmpad, attention_mask=None, position_ids=pos_rmpad, ...)
        kawhi_alpha = tap.nested()          # like verl's entropy / log_probs per-token outputs

    Args:
        model: the Qwen-VL policy module (see :func:`~kawhi_kernels.integrations.capture_qk`).
        cu_seqlens: int32/int64 [B+1] boundaries of the packed sequences (``input_ids.offsets()``).
        key_mask: bool [total] SGUF-selected image tokens of the packed row.
        query_mask: bool [total] response tokens (None: all tokens).
        heads: query heads to average (``KAWHI.heads``; None = all); layer: decoder layer (−1).
    Returns:
        :class:`KAWHIAlphaCapture` (``.alpha`` float32 [total] after the forward).

    Without sequence parallelism only: under Ulysses (sp > 1) the attention sees sequence shards;
    take Q/K after the all-to-all instead and call :func:`kawhi_alpha_packed` with
    ``head_offset`` and the SP ``group``.
    """
    return KAWHIAlphaCapture(model, cu_seqlens=cu_seqlens, key_mask=key_mask, query_mask=query_mask, heads=heads,
                             layer=layer, backend=backend)


# ------------------------------------------------------------------------------ driver side


def packed_response_values(values: torch.Tensor, cu_seqlens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, R] response-layout values from a packed per-token statistic (own-position convention:
    the value of response token t is read at t's own position, ``values[end-r:end]``; see
    :func:`to_verl_token_layout` for verl's predicting-position layout).

    Args:
        values: [total] per-token values of packed sequences (e.g. :func:`kawhi_alpha_packed`).
        cu_seqlens: [B+1] packing boundaries; sequence b = prompt_b + response_b, the response
            being its last r_b = response_mask[b].sum() tokens (verl's unpadded layout).
        response_mask: [B, R] right-padded response mask (verl's ``response_mask``).
    Returns:
        [B, R] with values[row b's last r_b tokens] in the first r_b columns, 0 elsewhere.
    """
    V.check_tensor("values", values, ndim=1)
    V.check_cu_seqlens("cu_seqlens", cu_seqlens, values.shape[0], device=values.device)
    V.check_tensor("response_mask", response_mask, ndim=2)
    lengths = response_mask.to(torch.int64).sum(1).to(values.device)
    ends = cu_seqlens[1:].to(torch.int64)
    if lengths.numel() != ends.numel() or bool((lengths > ends - cu_seqlens[:-1].to(torch.int64)).any()):
        raise ValueError("response_mask: expected one row per packed sequence, each response no longer than it")
    index = [torch.arange(int(e) - int(n), int(e), device=values.device) for e, n in zip(ends.tolist(), lengths.tolist())]
    picked = values[torch.cat(index)] if index else values[:0]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=values.device)
    cu[1:] = lengths.cumsum(0)
    return packed_to_padded(picked, cu, response_mask.shape[1])


def to_verl_token_layout(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Shift a packed per-token statistic from KAWHI's convention to verl's, so verl's own slicing
    recovers it.

    Convention (one for the plain, TRL and verl paths): α_t and every KAWHI per-token value belong
    to response token t and sit **at t's own position** (the query of t). verl stores per-token
    model outputs (``log_probs``, ``entropy``) at the position that *predicts* each token and
    slices a response of r tokens ending at ``end`` as ``values[end-r-1:end-1]``
    (``no_padding_2_padding``, ``response_from_nested``). This returns ``out[p] = values[p+1]``
    within each sequence (0 at a sequence's last position), so that verl's slice of ``out`` is
    ``values[end-r:end]`` — what :func:`packed_response_values` reads from ``values``.

    Args:
        values: [total] per-token values of packed sequences, own-position convention.
        cu_seqlens: [B+1] packing boundaries.
    Returns:
        [total], same dtype/device, in verl's predicting-position layout.
    """
    V.check_tensor("values", values, ndim=1)
    V.check_cu_seqlens("cu_seqlens", cu_seqlens, values.shape[0], device=values.device)
    out = torch.zeros_like(values)
    if values.numel() > 1:
        out[:-1] = values[1:]
    last = cu_seqlens[1:].to(torch.int64) - 1
    last = last[last >= 0]
    out[last] = 0
    return out


def kawhi_token_weights_from_alpha(
    alpha: torch.Tensor,
    response_mask: torch.Tensor,
    texts: Sequence[str],
    offsets: Sequence,
    *,
    has_image: torch.Tensor | None = None,
    tau: float = 0.05,
    lam: float = 0.1,
    w_min: float = 0.1,
    w_max: float = 1.0,
    rescale: str | None = None,
    delimiter: str = "\n\n",
) -> torch.Tensor:
    """KAWHI paragraph weights [B, R] from per-response-token α (the driver-side step).

    Args:
        alpha: float [B, R] α of each response token (right-padded, as ``response_mask``).
        response_mask: [B, R] bool / 0-1.
        texts, offsets: B decoded responses and per-token (start, end) spans of the masked tokens
            (:func:`~kawhi_kernels.integrations.rl.response_texts_and_offsets`).
        has_image: optional bool [B]; False rows (no image / no selected key) get weight 1.
        tau, lam, w_min, w_max, rescale, delimiter: as :func:`~kawhi_kernels.paragraph_weights`.
    Returns:
        float32 [B, R]: the paragraph weight of each response token, 1 outside the mask.
    """
    V.check_tensor("alpha", alpha, ndim=2, dtypes=V.FLOAT_DTYPES)
    mask = response_mask.to(alpha.device).bool()
    if tuple(mask.shape) != tuple(alpha.shape):
        raise ValueError(f"response_mask: expected shape {tuple(alpha.shape)} (as alpha), got {tuple(response_mask.shape)}")
    para, cu = paragraph_ids_batch(list(texts), list(offsets), delimiter)
    lengths = mask.sum(1).to(torch.int64).cpu()
    if not torch.equal((cu[1:] - cu[:-1]).to(torch.int64), lengths):
        raise ValueError(f"offsets: expected {lengths.tolist()} token spans per response (as response_mask), "
                         f"got {(cu[1:] - cu[:-1]).tolist()}")
    para = para.to(alpha.device)
    if has_image is not None:
        V.check_tensor("has_image", has_image, ndim=1, dtypes=(torch.bool,))
        no_image = torch.repeat_interleave(~has_image.to(alpha.device), lengths.to(alpha.device))
        para = torch.where(no_image, torch.full_like(para, -1), para)
    packed = padded_to_packed(alpha, mask)
    weights = paragraph_weights(packed, para, cu.to(alpha.device), tau=tau, lam=lam, w_min=w_min, w_max=w_max,
                                rescale=rescale)
    out = torch.ones(mask.shape, dtype=torch.float32, device=alpha.device)
    out[mask] = weights.to(torch.float32)
    return out


# grpo_kawhi is registered (and verl's advantage step patched) when verl imports the modules
# concerned, in this and, through the ``verl.plugins`` entry point, every other process.
from .verl_plugin import install as _install_verl_plugin  # noqa: E402

_install_verl_plugin()
