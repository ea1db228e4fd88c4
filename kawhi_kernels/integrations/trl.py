"""TRL integration: ``KAWHIGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss sees KAWHI's [B, T]
advantages.

Where the statistics come from — no extra forward pass:

* ``_generate_and_score_completions`` (after TRL's own rollout and reward/advantage code) runs
  SGUF once per distinct prompt image and stores, per rollout row, the selected-image-key mask
  over ``[prompt | completion]`` and the decoded completion text with per-token spans.
* The **loss forward** (``_compute_loss`` → ``_get_per_token_logps_and_entropies``) is the one
  forward TRL always runs (the old-log-prob and reference forwards are skipped in common setups).
  It runs under ``capture_qk`` on the final decoder layer; as soon as the layer's attention runs,
  α_t of every completion token is computed from its post-RoPE q and the selected image keys
  (no_grad, detached). Right after the forward returns — before TRL reads
  ``inputs["advantages"]`` — the [B] advantages are replaced by Â = A_g · w_j(t), [B, T]. TRL's
  loss multiplies per-token advantages natively. With ``num_iterations > 1`` the weights of a
  generation batch are computed once (first pass, π_θ = π_old) and reused.
* Gradient checkpointing: the capture records the layer once per forward (recomputation in
  backward runs outside the capture context, and ``capture_qk`` ignores repeated calls of a layer
  within one forward).

Refused combinations (they silently discard per-token advantages): ``importance_sampling_level=
"sequence"`` (GSPO's sequence ratio: every token's gradient gets the same weight, the mean of Â
over the response) and ``use_liger_kernel=True`` (Liger's fused GRPO loss takes [B] advantages).
GSPO with KAWHI: ``importance_sampling_level="sequence_token"`` (GSPO-token, implemented here:
numerically the sequence ratio s_g, with per-token gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..credit.advantages import reweight_advantages
from ..credit.pipeline import KAWHI
from .image_regions import RegionCache, regions_for_grids
from .rl import response_query_mask, response_texts_and_offsets, selected_image_key_mask
from .transformers_capture import QKRecord, capture_qk

__all__ = ["KAWHIGRPOTrainer", "check_kawhi_grpo_args"]

SEQUENCE_TOKEN = "sequence_token"


def check_kawhi_grpo_args(args) -> None:
    """Raise ``ValueError`` for GRPOConfig settings that would discard KAWHI's per-token advantages."""
    level = getattr(args, "importance_sampling_level", "token")
    if level == "sequence":
        raise ValueError(
            "importance_sampling_level='sequence' is not supported with KAWHI: GSPO's sequence-level ratio "
            "s_g = exp(mean_t log r_t) gives every token of a response the same gradient weight, so KAWHI's "
            "per-token advantages collapse to their mean over the response (the paragraph weights are lost). "
            "Use importance_sampling_level='sequence_token' (GSPO-token: the sequence ratio for clipping with "
            "per-token gradients, implemented by KAWHIGRPOTrainer) or 'token'.")
    if level not in ("token", SEQUENCE_TOKEN):
        raise ValueError(f"importance_sampling_level: expected 'token' or '{SEQUENCE_TOKEN}' with KAWHI, got {level!r}")
    if getattr(args, "use_liger_kernel", False) or getattr(args, "use_liger_loss", False):
        raise ValueError(
            "use_liger_kernel=True is not supported with KAWHI: Liger's fused GRPO loss takes one advantage per "
            "sequence ([B]) and would drop KAWHI's per-token [B, T] advantages. Disable use_liger_kernel.")


@dataclass
class _PendingKAWHI:
    """State of one loss forward whose final-layer Q/K are being turned into advantages."""

    inputs: dict
    prompt_width: int
    base_advantages: torch.Tensor
    advantages: torch.Tensor
    token_weights: torch.Tensor
    rows_seen: int = 0
    alpha: list = field(default_factory=list)


class KAWHIGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with KAWHI credit assignment for Qwen2-VL / Qwen2.5-VL / Qwen3-VL policies.

    Args (in addition to ``GRPOTrainer``'s):
        kawhi: :class:`~kawhi_kernels.KAWHI` configuration (heads, τ, λ, SGUF parameters); default
            ``KAWHI()`` (all heads, paper defaults).
        kawhi_layer: decoder layer whose post-RoPE Q/K are used (paper: the final one, −1).

    Dataset rows carry their image(s) as TRL expects (``"image"`` or ``"images"`` column with
    conversational prompts). Rows without an image keep weight 1 (plain GRPO). After each loss
    pass, ``inputs["advantages"]`` holds the float32 [B, T] KAWHI advantages and
    ``inputs["kawhi_token_weights"]`` the [B, T] weights; metrics ``kawhi/alpha_mean`` and
    ``kawhi/weight_mean`` are logged.
    """

    def __init__(self, *args, kawhi: KAWHI | None = None, kawhi_layer: int = -1, **kwargs):
        grpo_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if grpo_args is not None:
            if not isinstance(grpo_args, GRPOConfig):
                raise TypeError(f"args: expected a trl.GRPOConfig, got {type(grpo_args).__name__}")
            check_kawhi_grpo_args(grpo_args)
        if kawhi is not None and not isinstance(kawhi, KAWHI):
            raise TypeError(f"kawhi: expected a KAWHI instance or None, got {type(kawhi).__name__}")
        if isinstance(kawhi_layer, bool) or not isinstance(kawhi_layer, int):
            raise TypeError(f"kawhi_layer: expected an int, got {type(kawhi_layer).__name__}")
        gspo_token = grpo_args is not None and grpo_args.importance_sampling_level == SEQUENCE_TOKEN
        super().__init__(*args, **kwargs)
        self.kawhi = kawhi if kawhi is not None else KAWHI()
        self.kawhi_layer = kawhi_layer
        # GSPO-token is implemented on top of TRL's token-level path (see _get_per_token_logps_and_entropies).
        self.kawhi_gspo_token = gspo_token
        if gspo_token:
            self.importance_sampling_level = "token"
        self._kawhi_pending: _PendingKAWHI | None = None
        self._kawhi_loss_inputs: dict | None = None

    # ------------------------------------------------------------------------------ rollout side

    def _policy_for_capture(self, model=None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        return model

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rows = [_row_images(example) for example in inputs]
        if not any(rows) or "image_grid_thw" not in output:
            return output
        policy = self._policy_for_capture()
        config = policy.config
        vision = config.vision_config
        grids = output["image_grid_thw"]
        counts = [len(r) for r in rows]
        if sum(counts) != len(grids):
            raise RuntimeError(f"KAWHI: the batch has {sum(counts)} dataset images but the processor produced "
                               f"{len(grids)} image grids")
        # SGUF once per distinct image content: the G rollouts of a prompt share the selection.
        flat = regions_for_grids(self.kawhi, [img for r in rows for img in r], grids,
                                 merge_size=int(vision.spatial_merge_size), patch_size=int(vision.patch_size),
                                 cache=RegionCache())   # per generation batch
        row_regions, index = [], 0
        for n in counts:
            row_regions.append(flat[index:index + n])
            index += n
        prompt_completion = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        image_token_id = int(config.image_token_id)
        output["kawhi_key_mask"] = selected_image_key_mask(prompt_completion, image_token_id, row_regions)
        texts, offsets = response_texts_and_offsets(self._tokenizer, output["completion_ids"],
                                                    output["completion_mask"])
        output["kawhi_texts"] = texts
        output["kawhi_offsets"] = offsets
        return output

    # ------------------------------------------------------------------------------ loss side

    def _compute_loss(self, model, inputs):
        saved_old = inputs.get("old_per_token_logps")
        self._kawhi_loss_inputs = inputs
        try:
            if "kawhi_key_mask" not in inputs:
                return super()._compute_loss(model, inputs)
            mask = inputs["completion_mask"]
            if "kawhi_token_weights" in inputs:  # later iteration on the same generation batch
                inputs["advantages"] = reweight_advantages(inputs["kawhi_base_advantages"],
                                                           inputs["kawhi_token_weights"], mask)
                return super()._compute_loss(model, inputs)
            base = inputs["advantages"]
            if base.dim() != 1:
                raise ValueError(f"advantages: KAWHI expects TRL's [B] advantages, got shape {tuple(base.shape)}")
            inputs["kawhi_base_advantages"] = base
            self._kawhi_pending = _PendingKAWHI(
                inputs=inputs, prompt_width=inputs["prompt_ids"].shape[1], base_advantages=base,
                advantages=torch.zeros(mask.shape, dtype=torch.float32, device=mask.device),
                token_weights=torch.ones(mask.shape, dtype=torch.float32, device=mask.device))
            # TRL's loss forward is one chunk over the whole [prompt | completion] batch: keep only the
            # completion rows as queries (the callback also tolerates all rows).
            query_mask = response_query_mask(mask.bool(), inputs["prompt_ids"].shape[1] + mask.shape[1])
            with capture_qk(self._policy_for_capture(model), [self.kawhi_layer], query_mask=query_mask,
                            on_layer=self._kawhi_on_layer):
                return super()._compute_loss(model, inputs)
        finally:
            self._kawhi_pending = None
            self._kawhi_loss_inputs = None
            if saved_old is not None:
                inputs["old_per_token_logps"] = saved_old

    def _kawhi_on_layer(self, layer: int, record: QKRecord) -> None:
        """Called by the capture when the final layer's attention of one forward chunk runs."""
        pending = self._kawhi_pending
        if pending is None:
            return
        inputs = pending.inputs
        r0 = pending.rows_seen
        r1 = r0 + record.num_sequences
        mask = inputs["completion_mask"]
        if r1 > mask.shape[0]:
            raise RuntimeError("KAWHI: the final layer was captured more often than the loss forward has rows "
                               "(an unexpected extra forward inside _compute_loss?)")
        device = record.q.device
        is_response = record.q_pos >= pending.prompt_width
        q = record.q[is_response]
        counts = torch.bincount(record.q_batch[is_response], minlength=record.num_sequences)
        cu_q = torch.zeros(record.num_sequences + 1, dtype=torch.int32, device=device)
        cu_q[1:] = counts.cumsum(0).to(device)
        key_mask = inputs["kawhi_key_mask"][r0:r1].to(record.k_batch.device)
        key_region = torch.where(key_mask[record.k_batch, record.k_pos], 0, -1).to(device=device, dtype=torch.int32)
        out = self.kawhi.reweight(pending.base_advantages[r0:r1].to(device), q, record.k, cu_q,
                                  record.cu_seqlens_k.to(device), key_region, inputs["kawhi_texts"][r0:r1],
                                  inputs["kawhi_offsets"][r0:r1], mask[r0:r1].to(device))
        pending.advantages[r0:r1] = out.advantages.to(pending.advantages.device)
        pending.token_weights[r0:r1] = out.token_weights.to(pending.token_weights.device)
        pending.alpha.append(out.alpha.detach().float().cpu())
        pending.rows_seen = r1

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        pending = self._kawhi_pending
        if pending is not None:
            self._kawhi_finalize(pending)
            self._kawhi_pending = None
        inputs = self._kawhi_loss_inputs
        if self.kawhi_gspo_token and inputs is not None and inputs.get("old_per_token_logps") is not None:
            # GSPO-token through TRL's token path: with old' = sg[logp] − sg[log s_g], TRL's ratio
            # exp(logp − old') = sg[s_g] · π_θ / sg[π_θ]. The original old logps are restored after the loss.
            logps = result[0].detach()
            old = inputs["old_per_token_logps"]
            mask = inputs["completion_mask"].to(logps.dtype)
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"].to(logps.dtype)
            seq = ((logps - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
            inputs["old_per_token_logps"] = logps - seq
        return result

    def _kawhi_finalize(self, pending: _PendingKAWHI) -> None:
        inputs = pending.inputs
        batch = inputs["completion_mask"].shape[0]
        if pending.rows_seen != batch:
            raise RuntimeError(
                f"KAWHI: captured the final decoder layer for {pending.rows_seen} of {batch} rows in the loss "
                "forward; the policy's text attention must be eager, sdpa or flash_attention_2/3/4 and run "
                "through transformers' attention interface")
        inputs["advantages"] = pending.advantages
        inputs["kawhi_token_weights"] = pending.token_weights
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"].bool()
        alpha = torch.cat(pending.alpha) if pending.alpha else torch.zeros(0)
        if alpha.numel():
            self._metrics[mode]["kawhi/alpha_mean"].append(float(alpha.mean()))
        if bool(mask.any()):
            self._metrics[mode]["kawhi/weight_mean"].append(float(pending.token_weights[mask].mean()))


def _row_images(example: dict) -> list:
    """The images of one dataset row, as TRL reads them (``images`` list or single ``image``)."""
    if example.get("images") is not None:
        return [img for img in example["images"] if img is not None]
    if example.get("image") is not None:
        return [example["image"]]
    return []

