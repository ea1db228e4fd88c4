"""SGUF key regions in verl 0.9.1's agent loop, where the raw images exist.

verl's agent loop holds each sample's raw images in ``multi_modal_data["images"]`` and the
processor output (``multi_modal_inputs["image_grid_thw"]``) next to its token ids; the v1 trainer
drops the raw images before the TransferQueue, so the selected-image-key mask is made here, once
per sample, and carried with the rollout in verl's layout:

* legacy trainer (``trainer.use_v1=false``): ``AgentLoopWorker._postprocess`` returns the padded
  ``DataProto``; the patch adds ``batch["kawhi_key_mask"]`` bool [B, P+R], laid out exactly as
  ``input_ids`` (left-padded prompt | right-padded response);
* v1 trainer: ``AgentLoopWorkerTQ._agent_loop_postprocess`` puts one row per agent-loop output
  into the TransferQueue through ``list_of_dict_to_tensordict``; the patch adds the field
  ``kawhi_key_mask`` bool [P+R] (unpadded, like that row's ``input_ids``), which verl stores
  nested/jagged.

Only with ``algorithm.adv_estimator=grpo_kawhi``. A sample without images gets an all-False mask
(weight 1 downstream). The G responses of a prompt share one SGUF selection (the cache is scoped
by the prompt's ``uid``; SGUF's background sampling is random). SGUF parameters come from
``algorithm.kawhi.*``; the image token id, ``spatial_merge_size`` and ``patch_size`` from the
worker's HF model config.

``AgentLoopWorkerTQ`` is a ``@ray.remote`` class: Ray ships its ``modified_class`` to the worker
actor by value, so the patch is applied to that class (:func:`~kawhi_kernels.integrations._patching.actor_class`)
in the process that creates the actors (the ``TaskRunnerV1``), and the copy carries it.
"""
from __future__ import annotations

import contextvars

import torch

from ._patching import actor_class, patch_attribute
from .image_regions import RegionCache, key_mask_for_sequence, regions_for_grids

__all__ = ["KEY_MASK_KEY", "patch_agent_loop", "patch_agent_loop_tq", "sequence_key_mask"]

KEY_MASK_KEY = "kawhi_key_mask"
_PENDING = contextvars.ContextVar("kawhi_pending_key_masks", default=None)


# The wrappers below travel by value inside Ray's copy of AgentLoopWorkerTQ (cloudpickle copies the
# globals a by-value function names): they reach the ContextVar only through these importable
# functions, which pickle by reference and resolve to the actor process's own module.
def _begin_pending(value):
    return _PENDING.set(value)


def _end_pending(token) -> None:
    _PENDING.reset(token)


def _pending():
    return _PENDING.get()


def _enabled(worker) -> bool:
    from .verl import ESTIMATOR_NAME

    algorithm = worker.config.get("algorithm", None) if hasattr(worker.config, "get") else None
    estimator = None if algorithm is None else algorithm.get("adv_estimator", None)
    return getattr(estimator, "value", estimator) == ESTIMATOR_NAME


def _state(worker):
    """(KAWHI, RegionCache, image_token_id, merge_size, patch_size) of this worker, made once."""
    state = worker.__dict__.get("_kawhi_sguf")
    if state is None:
        from .verl import kawhi_from_config

        kawhi, _ = kawhi_from_config(worker.config.algorithm)
        hf_config = worker.model_config.hf_config
        vision = getattr(hf_config, "vision_config", None)
        if vision is None or getattr(hf_config, "image_token_id", None) is None:
            raise ValueError(f"grpo_kawhi: the policy's HF config ({type(hf_config).__name__}) has no vision_config / "
                             "image_token_id; KAWHI needs a Qwen2-VL / Qwen2.5-VL / Qwen3-VL policy")
        state = (kawhi, RegionCache(), int(hf_config.image_token_id), int(vision.spatial_merge_size),
                 int(vision.patch_size))
        worker.__dict__["_kawhi_sguf"] = state
    return state


def sequence_key_mask(worker, input_ids: torch.Tensor, multi_modal_data, multi_modal_inputs, scope=None) -> torch.Tensor:
    """bool, the shape of ``input_ids`` (1-D [L] or [1, L]): the SGUF-selected image tokens of one
    agent-loop sample.

    Args:
        worker: the agent-loop worker (reads ``config.algorithm.kawhi`` and ``model_config.hf_config``).
        input_ids: int token ids of the sample (prompt + response, padded or not).
        multi_modal_data: the sample's ``multi_modal_data`` (``{"images": [...]}`` or None).
        multi_modal_inputs: the processor output of the sample (``image_grid_thw`` [N, 3]).
        scope: cache scope; the prompt's ``uid`` makes its G responses share one selection.
    """
    images = list((multi_modal_data or {}).get("images") or [])
    if not images:
        return torch.zeros(input_ids.shape, dtype=torch.bool)
    kawhi, cache, image_token_id, merge, patch = _state(worker)
    grids = (multi_modal_inputs or {}).get("image_grid_thw")
    if grids is None:
        raise KeyError(f"multi_modal_inputs: no 'image_grid_thw' for a sample with {len(images)} image(s)")
    regions = regions_for_grids(kawhi, images, grids, merge_size=merge, patch_size=patch, cache=cache, scope=scope)
    return key_mask_for_sequence(input_ids.cpu(), image_token_id, regions)


# ---------------------------------------------------------------------------------- legacy trainer


def _make_postprocess(original):
    def _postprocess(self, inputs, input_non_tensor_batch=None, validate=False, *args, **kwargs):
        out = original(self, inputs, input_non_tensor_batch, validate, *args, **kwargs)
        if not _enabled(self):
            return out
        uids = (input_non_tensor_batch or {}).get("uid")
        masks = [sequence_key_mask(self, item.input_ids, item.multi_modal_data, item.multi_modal_inputs,
                                   scope=None if uids is None else uids[i])
                 for i, item in enumerate(inputs)]
        out.batch[KEY_MASK_KEY] = torch.cat(masks, dim=0)
        return out
    return _postprocess


def patch_agent_loop(module) -> None:
    """Patch ``AgentLoopWorker._postprocess`` of ``verl.experimental.agent_loop.agent_loop``
    (idempotent). ``AgentLoopManager`` wraps this plain class with ``ray.remote`` at run time; Ray
    ships the subclass by value and its base by reference, so the patch is applied again, by the
    plugin's import hook, in the worker actor."""
    patch_attribute(module.AgentLoopWorker, "_postprocess", _make_postprocess)


# -------------------------------------------------------------------------------------- v1 trainer


def _make_agent_loop_postprocess(original):
    async def _agent_loop_postprocess(self, output, validate, **kwargs):
        if not _enabled(self):
            return await original(self, output, validate, **kwargs)
        outputs = output if isinstance(output, list) else [output]
        # the raw images, which verl drops from the fields before the TransferQueue put
        token = _begin_pending((self, [item.multi_modal_data for item in outputs], kwargs.get("uid")))
        try:
            return await original(self, output, validate, **kwargs)
        finally:
            _end_pending(token)
    return _agent_loop_postprocess


def _make_list_of_dict_to_tensordict(original):
    def list_of_dict_to_tensordict(list_of_dicts, *args, **kwargs):
        pending = _pending()
        if pending is not None:
            worker, images, uid = pending
            if len(images) != len(list_of_dicts):
                raise RuntimeError(f"{KEY_MASK_KEY}: {len(images)} agent-loop outputs but {len(list_of_dicts)} rows")
            for field, mm_data in zip(list_of_dicts, images):
                field[KEY_MASK_KEY] = sequence_key_mask(worker, field["input_ids"], mm_data,
                                                        field.get("multi_modal_inputs"), scope=uid)
        return original(list_of_dicts, *args, **kwargs)
    return list_of_dict_to_tensordict


def patch_agent_loop_tq(module) -> None:
    """Patch ``AgentLoopWorkerTQ._agent_loop_postprocess`` (on the class Ray ships) and the
    ``list_of_dict_to_tensordict`` it calls, of ``verl.trainer.ppo.v1.agent_loop_tq`` (idempotent)."""
    patch_attribute(actor_class(module.AgentLoopWorkerTQ), "_agent_loop_postprocess", _make_agent_loop_postprocess)
    patch_attribute(module, "list_of_dict_to_tensordict", _make_list_of_dict_to_tensordict)
