"""α as a per-token model output of verl 0.9.1's engine worker, and both trainers fetching it.

Applied by :mod:`~kawhi_kernels.integrations.verl_plugin` when verl imports the modules concerned
(so inside the Ray worker and TaskRunner actors too):

* ``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.forward_step`` — when the
  micro-batch carries the non-tensor flag ``kawhi_alpha=True`` (set by the trainers below), the
  policy forward that already runs (the old-log-prob forward) is wrapped with the α tap of the
  model family (:mod:`~kawhi_kernels.integrations.verl_actor`): Qwen2/2.5-VL under verl's patch →
  ``VerlQwen2VLAlphaTap`` (sp ≥ 1); text attention ``flash_attention_2/3`` (e.g. Qwen3-VL) →
  ``VerlFlashAttentionAlphaTap`` at verl's Ulysses flash path (sp ≥ 1); ``sdpa`` / ``eager`` →
  :func:`~kawhi_kernels.integrations.verl.capture_kawhi_alpha` (sp = 1; sp > 1 raises
  ``NotImplementedError``: verl's all-to-all only runs on the flash path);
* ``FSDPEngineWithLMHead.prepare_model_outputs`` — adds ``kawhi_alpha``: float32 nested (jagged,
  the offsets of ``input_ids``) in verl's predicting-position layout
  (:func:`~kawhi_kernels.integrations.verl.to_verl_token_layout`), like ``entropy`` / ``log_probs``;
* v1 ``PPOTrainer._compute_old_log_prob`` (``verl.trainer.ppo.v1.trainer_base``) — with
  ``algorithm.adv_estimator=grpo_kawhi`` it puts the flags into ``KVBatchMeta.extra_info``, runs
  verl's step, fetches ``kawhi_alpha`` (plus ``response_mask``, ``responses``, ``kawhi_key_mask``)
  from the TransferQueue and puts ``kawhi_token_weights`` (nested [B, r]) there;
* legacy ``RayPPOTrainer._compute_old_log_prob`` (``verl.trainer.ppo.ray_trainer``) — the flags go
  in ``batch.meta_info`` (verl's ``DataProto.to_tensordict`` makes them non-tensor data of the
  worker batch); the worker's ``kawhi_alpha`` is padded with verl's ``no_padding_2_padding`` and
  ``kawhi_token_weights`` [B, R] is returned with the old log-probs.

Worker input ``kawhi_key_mask`` (from the agent loop, :mod:`~kawhi_kernels.integrations.verl_agent_loop`):
bool nested [B, P+R] like ``input_ids`` (v1), or padded [B, P+R] like the legacy ``input_ids``
(unpadded here with the batch's ``attention_mask``). The query tokens are the last
``len(response_mask[b])`` tokens of each sequence (the response).
"""
from __future__ import annotations

import torch

from ._patching import patch_attribute, temporarily

__all__ = ["ALPHA_KEY", "FLAG_KEY", "KEY_MASK_KEY", "patch_engine", "patch_legacy_old_log_prob", "patch_v1_old_log_prob"]

ALPHA_KEY = "kawhi_alpha"
FLAG_KEY = "kawhi_alpha"            # non-tensor flag in the micro-batch (bool)
HEADS_KEY = "kawhi_heads"           # non-tensor str: comma-separated global query heads ("" = all)
LAYER_KEY = "kawhi_layer"           # non-tensor: decoder layer (−1 = last)
KEY_MASK_KEY = "kawhi_key_mask"     # tensor field: bool nested [B, P+R]
_QWEN2_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _non_tensor(micro_batch, key, default=None):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def heads_flag(heads) -> str:
    """The non-tensor form of a head list (a string: a list would be split per sample by verl)."""
    return "" if heads is None else ",".join(str(int(h)) for h in heads)


def _parse_heads(value) -> list[int] | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"{HEADS_KEY}: expected a comma-separated string of head indices, got {type(value).__name__}")
    return [int(h) for h in value.split(",")]


def _query_mask(micro_batch, cu: torch.Tensor) -> torch.Tensor | None:
    """bool [total]: the response tokens (the last r_b of each sequence); None = all tokens."""
    if "response_mask" not in micro_batch.keys():
        return None
    resp = micro_batch["response_mask"]
    lengths = resp.offsets().diff() if resp.is_nested else torch.full((resp.shape[0],), resp.shape[1])
    total = int(cu[-1])
    mask = torch.zeros(total, dtype=torch.bool, device=cu.device)
    for end, r in zip(cu[1:].tolist(), lengths.tolist()):
        mask[end - r:end] = True
    return mask


def _flat_key_mask(micro_batch, total: int) -> torch.Tensor:
    """bool [total] of the packed row from ``kawhi_key_mask`` in any of verl's layouts: nested
    (v1 TransferQueue rows), padded [b, P+R] like the legacy ``input_ids`` (unpadded with the
    micro-batch's ``attention_mask``), or dense [b, L] when every row has L tokens."""
    key_mask = micro_batch[KEY_MASK_KEY]
    if key_mask.is_nested:
        flat = key_mask.values()
    elif "attention_mask" in micro_batch.keys() and not micro_batch["attention_mask"].is_nested \
            and tuple(micro_batch["attention_mask"].shape) == tuple(key_mask.shape):
        flat = key_mask[micro_batch["attention_mask"].bool()]
    else:
        flat = key_mask.reshape(-1)
    if flat.numel() != total:
        raise ValueError(f"{KEY_MASK_KEY}: expected {total} tokens (as input_ids), got {flat.numel()} "
                         f"(shape {tuple(key_mask.shape)}, nested={key_mask.is_nested})")
    return flat.bool()


def _attn_implementation(model) -> str:
    from .transformers_capture import _find_text_model

    text = _find_text_model(model)
    config = getattr(text, "config", None) or model.config
    return str(getattr(config, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", ""))


def _alpha_tap(engine, micro_batch):
    """The α tap for this engine's model, or None when the flag is off."""
    if not _non_tensor(micro_batch, FLAG_KEY, False):
        return None
    if KEY_MASK_KEY not in micro_batch.keys():
        raise KeyError(f"'{KEY_MASK_KEY}': the KAWHI α output needs the SGUF-selected image tokens (bool, laid out "
                       "like input_ids) in the batch; the plugin's agent-loop patch puts them there with "
                       "algorithm.adv_estimator=grpo_kawhi")
    if not _non_tensor(micro_batch, "use_remove_padding", True):
        raise NotImplementedError("kawhi_alpha: only verl's remove-padding layout (use_remove_padding=True) is supported")
    cu = micro_batch["input_ids"].offsets()
    key_mask = _flat_key_mask(micro_batch, int(cu[-1]))
    heads = _parse_heads(_non_tensor(micro_batch, HEADS_KEY, ""))
    layer = int(_non_tensor(micro_batch, LAYER_KEY, -1))
    query_mask = _query_mask(micro_batch, cu)
    model = getattr(engine.module, "module", engine.module)
    sp = int(getattr(engine, "ulysses_sequence_parallel_size", 1) or 1)
    group = None
    if sp > 1:
        from verl.utils.ulysses import get_ulysses_sequence_parallel_group

        group = get_ulysses_sequence_parallel_group()
    from .verl_actor import VerlFlashAttentionAlphaTap, VerlQwen2VLAlphaTap

    options = dict(key_mask=key_mask, query_mask=query_mask, heads=heads, layer=layer, sp_group=group)
    if getattr(model.config, "model_type", None) in _QWEN2_VL_TYPES:
        return VerlQwen2VLAlphaTap(engine.module, **options)
    attn = _attn_implementation(model)
    if attn.startswith("flash_attention"):
        return VerlFlashAttentionAlphaTap(engine.module, **options)
    if sp > 1:
        raise NotImplementedError(
            f"kawhi_alpha under Ulysses sp={sp} with attn_implementation={attn!r}: verl's all-to-all only runs on "
            "the flash-attention path, so the attention of this model does not see all tokens; use "
            "attn_implementation='flash_attention_2' (or sp=1)")
    from .verl import capture_kawhi_alpha

    return capture_kawhi_alpha(engine.module, cu_seqlens=cu, key_mask=key_mask, query_mask=query_mask,
                               heads=heads, layer=layer)


def _make_forward_step(original):
    def forward_step(self, micro_batch, loss_function, forward_only):
        tap = _alpha_tap(self, micro_batch)
        if tap is None:
            return original(self, micro_batch, loss_function, forward_only)
        self._kawhi_tap = tap
        try:
            with tap:
                return original(self, micro_batch, loss_function, forward_only)
        finally:
            self._kawhi_tap = None
    return forward_step


def _make_prepare_model_outputs(original):
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        from .verl import to_verl_token_layout

        model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        tap = getattr(self, "_kawhi_tap", None)
        if tap is not None:
            if tap.alpha is None:
                raise RuntimeError("kawhi_alpha: the α tap did not fire during the policy forward (layer "
                                   f"{_non_tensor(micro_batch, LAYER_KEY, -1)}); is the model's attention patched "
                                   "by something the tap does not know?")
            cu = micro_batch["input_ids"].offsets()
            alpha = tap.alpha.float()[: int(cu[-1])]
            model_output[ALPHA_KEY] = torch.nested.nested_tensor_from_jagged(to_verl_token_layout(alpha, cu), cu)
        return model_output
    return prepare_model_outputs


def patch_engine(module) -> None:
    """Patch ``FSDPEngineWithLMHead`` of ``verl.workers.engine.fsdp.transformer_impl`` (idempotent)."""
    cls = module.FSDPEngineWithLMHead
    patch_attribute(cls, "forward_step", _make_forward_step)
    patch_attribute(cls, "prepare_model_outputs", _make_prepare_model_outputs)


def _flags(algorithm) -> dict:
    from .verl import kawhi_from_config

    kawhi, layer = kawhi_from_config(algorithm)
    return {FLAG_KEY: True, HEADS_KEY: heads_flag(kawhi.heads), LAYER_KEY: layer}


def weights_from_fetched(data, tokenizer, algorithm_config) -> torch.Tensor:
    """``kawhi_token_weights`` nested [B, r] from the TransferQueue fields of the old-log-prob step.

    Args:
        data: TensorDict with ``kawhi_alpha`` (nested [B, P+R], verl's layout), ``response_mask``
            and ``responses`` (nested [B, r]) and optionally ``kawhi_key_mask`` (rows without a
            selected image key get weight 1).
        tokenizer: the trainer's tokenizer (paragraphs come from the decoded responses).
        algorithm_config: ``algorithm`` (reads ``algorithm.kawhi.*``).
    """
    from verl.workers.utils.padding import response_from_nested

    from .rl import response_texts_and_offsets
    from .verl import kawhi_from_config, kawhi_token_weights_from_alpha

    kawhi, _ = kawhi_from_config(algorithm_config)
    resp_mask = data["response_mask"]
    alpha = response_from_nested(data[ALPHA_KEY], resp_mask).to_padded_tensor(0.0).float()
    mask = resp_mask.to_padded_tensor(0).bool()
    responses = data["responses"].to_padded_tensor(0)
    texts, offsets = response_texts_and_offsets(tokenizer, responses, mask)
    has_image = None
    if KEY_MASK_KEY in data.keys():
        has_image = torch.stack([row.bool().any() for row in data[KEY_MASK_KEY].unbind()])
    weights = kawhi_token_weights_from_alpha(alpha, mask, texts, offsets, has_image=has_image, delimiter=kawhi.delimiter,
                                             **kawhi.weight_params)
    lengths = resp_mask.offsets().diff().tolist()
    return torch.nested.as_nested_tensor([weights[i, :n] for i, n in enumerate(lengths)], layout=torch.jagged)


def _make_v1_old_log_prob(module):
    def make(original):
        def _compute_old_log_prob(self, batch, metrics):
            from tensordict import TensorDict

            from .verl import ESTIMATOR_NAME, WEIGHTS_KEY

            algorithm = self.config.algorithm
            if getattr(algorithm.adv_estimator, "value", algorithm.adv_estimator) != ESTIMATOR_NAME:
                return original(self, batch, metrics)
            rollout_corr = algorithm.get("rollout_correction", None)
            if rollout_corr and rollout_corr.get("bypass_mode", False):
                raise NotImplementedError("grpo_kawhi needs the old-log-prob forward for α; "
                                          "algorithm.rollout_correction.bypass_mode=true skips it")
            flags = _flags(algorithm)
            batch.extra_info.update(flags)
            try:
                out = original(self, batch, metrics)
            finally:
                for key in flags:
                    batch.extra_info.pop(key, None)
            for key in flags:                                   # later steps (ref, update) must not tap
                out.extra_info.pop(key, None)
            fields = [ALPHA_KEY, "response_mask", "responses"]
            if KEY_MASK_KEY in (out.fields or batch.fields or []):
                fields.append(KEY_MASK_KEY)
            data = module.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
            weights = weights_from_fetched(data, self.tokenizer, algorithm)
            return module.tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                                          fields=TensorDict({WEIGHTS_KEY: weights}, batch_size=[len(batch.keys)]))
        return _compute_old_log_prob
    return make


def patch_v1_old_log_prob(module) -> None:
    """Patch ``PPOTrainer._compute_old_log_prob`` of ``verl.trainer.ppo.v1.trainer_base`` (idempotent)."""
    patch_attribute(module.PPOTrainer, "_compute_old_log_prob", _make_v1_old_log_prob(module))


def _make_legacy_old_log_prob(module):
    def make(original):
        def _compute_old_log_prob(self, batch):
            from verl.utils import tensordict_utils as tu

            from .rl import response_texts_and_offsets
            from .verl import ESTIMATOR_NAME, WEIGHTS_KEY, kawhi_from_config, kawhi_token_weights_from_alpha

            algorithm = self.config.algorithm
            if getattr(algorithm.adv_estimator, "value", algorithm.adv_estimator) != ESTIMATOR_NAME:
                return original(self, batch)
            if KEY_MASK_KEY not in batch.batch.keys():
                raise KeyError(f"'{KEY_MASK_KEY}' is not in the rollout batch: grpo_kawhi needs the SGUF key mask "
                               "[B, prompt+response] from the agent loop (patched by the kawhi-kernels plugin)")
            flags = _flags(algorithm)
            seen = {}

            def keep_alpha(worker_call):               # the worker group's own call, its α kept
                def compute_log_prob(data, *args, **kwargs):
                    output = worker_call(data, *args, **kwargs)
                    seen["alpha"], seen["data"] = tu.get(output, ALPHA_KEY), data
                    return output
                return compute_log_prob

            batch.meta_info.update(flags)                      # → non-tensor data of the worker's batch
            try:
                with temporarily(self.actor_rollout_wg, "compute_log_prob", keep_alpha):
                    old_log_prob, mfu = original(self, batch)
            finally:
                for key in flags:
                    batch.meta_info.pop(key, None)
            if seen.get("alpha") is None:
                raise RuntimeError(f"'{ALPHA_KEY}': the actor worker returned no α (is the kawhi-kernels plugin "
                                   "loaded in the worker processes?)")
            mask = batch.batch["response_mask"].bool()
            alpha = module.no_padding_2_padding(seen["alpha"], seen["data"]).float() * mask
            kawhi, _ = kawhi_from_config(algorithm)
            texts, offsets = response_texts_and_offsets(self.tokenizer, batch.batch["responses"], mask)
            has_image = batch.batch[KEY_MASK_KEY].bool().any(-1)
            weights = kawhi_token_weights_from_alpha(alpha, mask, texts, offsets, has_image=has_image,
                                                     delimiter=kawhi.delimiter, **kawhi.weight_params)
            old_log_prob.batch[WEIGHTS_KEY] = weights
            return old_log_prob, mfu
        return _compute_old_log_prob
    return make


def patch_legacy_old_log_prob(module) -> None:
    """Patch ``RayPPOTrainer._compute_old_log_prob`` of ``verl.trainer.ppo.ray_trainer`` (legacy
    trainer, ``trainer.use_v1=false``; idempotent). With ``grpo_kawhi`` it sends the α flags in
    ``batch.meta_info`` (verl turns meta_info into the worker batch's non-tensor data), keeps the
    worker's ``kawhi_alpha``, pads it with verl's ``no_padding_2_padding`` and returns
    ``kawhi_token_weights`` [B, R] with the old log-probs (the trainer unions them into the batch)."""
    patch_attribute(module.RayPPOTrainer, "_compute_old_log_prob", _make_legacy_old_log_prob(module))
