"""verl plugin: makes ``grpo_kawhi`` known in every process that imports verl.

verl 0.9.1 runs its trainer inside the Ray actor ``TaskRunnerV1`` (``TaskRunner`` for the legacy
trainer) and its workers in further actors, so registering "once in the driver" reaches none of
them. verl's own extension hooks run in every process at ``import verl``:

* the ``verl.plugins`` entry point (kawhi-kernels declares it in ``pyproject.toml``; verl loads all
  entry points of that group unless ``VERL_USE_EXTERNAL_PLUGINS=none``);
* ``VERL_USE_EXTERNAL_MODULES=kawhi_kernels.integrations.verl_plugin`` (the fallback when entry
  points are disabled or the package is on ``PYTHONPATH`` without being installed).

Loading this module only installs post-import hooks (nothing of verl is imported here, so it is
safe to run while ``verl/__init__`` is still executing). When verl later imports

* ``verl.trainer.ppo.core_algos``: ``grpo_kawhi`` is registered with ``register_adv_est``;
* ``verl.trainer.ppo.ray_trainer`` (legacy trainer): its ``compute_advantage`` routes
  ``grpo_kawhi`` through :func:`~kawhi_kernels.integrations.verl.compute_kawhi_advantage`, which
  reads ``data.batch["kawhi_token_weights"]``; ``RayPPOTrainer._compute_old_log_prob`` asks the
  engine worker for ``kawhi_alpha`` and adds ``kawhi_token_weights`` [B, R];
* ``verl.trainer.ppo.v1.utils`` / ``verl.trainer.ppo.v1.trainer_base`` (v1 trainer, the default):
  ``compute_advantage_for_multi_trajectories`` sends ``grpo_kawhi`` down verl's own GRPO
  multi-session path (final session per group, broadcast to the session's turns) and multiplies
  the result by each row's KAWHI weights; ``PPOTrainer._compute_advantage`` fetches
  ``kawhi_token_weights`` from the TransferQueue, which its fixed field list omits;
  ``PPOTrainer._compute_old_log_prob`` asks the worker for ``kawhi_alpha``, fetches it and puts
  ``kawhi_token_weights`` (:mod:`~kawhi_kernels.integrations.verl_engine`);
* ``verl.workers.engine.fsdp.transformer_impl`` (engine workers): the old-log-prob forward taps α
  and emits ``kawhi_alpha`` as a per-token model output (:mod:`~kawhi_kernels.integrations.verl_engine`);
* ``verl.experimental.agent_loop.agent_loop`` / ``verl.trainer.ppo.v1.agent_loop_tq`` (agent-loop
  workers): the SGUF key mask ``kawhi_key_mask`` of each sample, made from its raw images
  (:mod:`~kawhi_kernels.integrations.verl_agent_loop`).

All patches go through :func:`~kawhi_kernels.integrations._patching.patch_attribute` (idempotent).

Modules already imported when this one loads are patched at once. :func:`plugin_status` tells
what was applied in the calling process (used by the tests inside Ray actors).
"""
from __future__ import annotations

import contextvars
import importlib.abc
import importlib.util
import logging
import sys

from ._patching import patch_attribute

__all__ = ["install", "plugin_status"]

_LOG = logging.getLogger("kawhi_kernels.verl")
_APPLIED: dict[str, str] = {}          # module name -> "ok" | "error: ..."
_V1_WEIGHTS = contextvars.ContextVar("kawhi_v1_weights", default=None)


def _name(adv_estimator) -> str:
    return getattr(adv_estimator, "value", adv_estimator)


# ---------------------------------------------------------------------------------------- patches


def _patch_core_algos(module) -> None:
    from .verl import register_verl_estimator

    register_verl_estimator(module)


def _patch_ray_trainer(module) -> None:
    from .verl import patch_verl_compute_advantage
    from .verl_engine import patch_legacy_old_log_prob

    patch_verl_compute_advantage([module])
    patch_legacy_old_log_prob(module)


def _make_multi_trajectories(original):
    """v1's ``compute_advantage_for_multi_trajectories``: ``grpo_kawhi`` = verl's GRPO branch
    (group statistics over each session's final turn, broadcast to all its turns) × weights."""
    def compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, *args, **kwargs):
        from .verl import ESTIMATOR_NAME, WEIGHTS_KEY

        if _name(adv_estimator) != ESTIMATOR_NAME:
            return original(data, batch_keys, adv_estimator, *args, **kwargs)
        from verl.trainer.ppo.core_algos import AdvantageEstimator

        weights = data.batch[WEIGHTS_KEY] if WEIGHTS_KEY in data.batch.keys() else _V1_WEIGHTS.get()
        if weights is None:
            raise KeyError(f"'{WEIGHTS_KEY}': the '{ESTIMATOR_NAME}' estimator needs per-token KAWHI weights "
                           f"[B, R] in the TransferQueue (or data.batch) before the advantage step")
        mask = data.batch["response_mask"]
        if tuple(weights.shape) != tuple(mask.shape):
            raise ValueError(f"{WEIGHTS_KEY}: expected shape {tuple(mask.shape)} (as response_mask), "
                             f"got {tuple(weights.shape)}")
        data = original(data, batch_keys, AdvantageEstimator.GRPO, *args, **kwargs)
        advantages = data.batch["advantages"] * weights.to(data.batch["advantages"])
        data.batch["advantages"] = advantages
        data.batch["returns"] = advantages
        return data
    return compute_advantage_for_multi_trajectories


def _patch_v1_utils(module) -> None:
    _patch_ray_trainer_advantage(module)      # its ``compute_advantage`` name (imported from ray_trainer)
    patch_attribute(module, "compute_advantage_for_multi_trajectories", _make_multi_trajectories)


def _patch_ray_trainer_advantage(module) -> None:
    from .verl import patch_verl_compute_advantage

    patch_verl_compute_advantage([module])


def _make_v1_compute_advantage(module):
    def make(original):
        def _compute_advantage(self, batch, metrics):
            from .verl import ESTIMATOR_NAME, WEIGHTS_KEY

            if _name(self.config.algorithm.adv_estimator) != ESTIMATOR_NAME:
                return original(self, batch, metrics)
            if WEIGHTS_KEY not in (batch.fields or []):
                raise KeyError(f"'{WEIGHTS_KEY}' is not in the TransferQueue batch (fields: {batch.fields}); the "
                               f"'{ESTIMATOR_NAME}' estimator needs per-token KAWHI weights put there before the "
                               "advantage step")
            fetched = module.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                             select_fields=[WEIGHTS_KEY])
            weights = fetched[WEIGHTS_KEY]
            weights = weights.to_padded_tensor(1.0) if weights.is_nested else weights
            token = _V1_WEIGHTS.set(weights)
            try:
                return original(self, batch, metrics)
            finally:
                _V1_WEIGHTS.reset(token)
        return _compute_advantage
    return make


def _patch_v1_trainer_base(module) -> None:
    from .verl_engine import patch_v1_old_log_prob

    patch_attribute(module, "compute_advantage_for_multi_trajectories", _make_multi_trajectories)
    patch_attribute(module.PPOTrainer, "_compute_advantage", _make_v1_compute_advantage(module))
    patch_v1_old_log_prob(module)


def _patch_engine(module) -> None:
    from .verl_engine import patch_engine

    patch_engine(module)


def _patch_agent_loop(module) -> None:
    from .verl_agent_loop import patch_agent_loop

    patch_agent_loop(module)


def _patch_agent_loop_tq(module) -> None:
    from .verl_agent_loop import patch_agent_loop_tq

    patch_agent_loop_tq(module)


_HOOKS = {
    "verl.trainer.ppo.core_algos": _patch_core_algos,
    "verl.trainer.ppo.ray_trainer": _patch_ray_trainer,
    "verl.trainer.ppo.v1.utils": _patch_v1_utils,
    "verl.trainer.ppo.v1.trainer_base": _patch_v1_trainer_base,
    "verl.workers.engine.fsdp.transformer_impl": _patch_engine,
    "verl.experimental.agent_loop.agent_loop": _patch_agent_loop,
    "verl.trainer.ppo.v1.agent_loop_tq": _patch_agent_loop_tq,
}


def _apply(name: str, module) -> None:
    try:
        _HOOKS[name](module)
        _APPLIED[name] = "ok"
    except Exception as err:  # never break ``import verl``; plugin_status() and the log say why
        _APPLIED[name] = f"error: {type(err).__name__}: {err}"
        _LOG.warning("kawhi_kernels: patching %s failed: %s", name, err)


# ------------------------------------------------------------------------------ post-import hooks


class _HookedLoader(importlib.abc.Loader):
    """Delegates to verl's loader, then applies the patch to the freshly executed module."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, attr):        # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


def install() -> None:
    """Install the hooks (idempotent); patch the target modules that are already imported."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for name in _HOOKS:
        module = sys.modules.get(name)
        if module is not None and _APPLIED.get(name) != "ok":
            _apply(name, module)


def plugin_status() -> dict[str, str]:
    """{verl module: "ok" | "error: …"} for the patches applied in this process so far."""
    return dict(_APPLIED)


install()
