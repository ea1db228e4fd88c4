"""KAWHI against real verl 0.9.1 (skipped where verl is not installed).

One local Ray cluster is shared by the module (started as ``main_ppo.run_ppo`` starts it, with
verl's PPO runtime env); the TransferQueue of the v1 trainer runs on it.
"""
import os
import sys
import types

import numpy as np
import pytest
import torch

if os.environ.get("KAWHI_REQUIRE_VERL") == "1":  # the CI verl leg: a missing verl is a failure
    import ray  # noqa: F401
    import transfer_queue as tq  # noqa: F401
    import verl  # noqa: F401
else:
    verl = pytest.importorskip("verl", reason="needs verl[verl-core]==0.9.1")
    ray = pytest.importorskip("ray")
    tq = pytest.importorskip("transfer_queue")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.tensordict_utils import list_of_dict_to_tensordict  # noqa: E402

from kawhi_kernels.integrations import verl as kv  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    env = get_ppo_ray_runtime_env()
    env.setdefault("env_vars", {})["TRANSFER_QUEUE_ENABLE"] = "1"
    # 1 CPU for the TaskRunner actor, 1 for the TransferQueue controller, 1 for its storage unit
    ray.init(num_cpus=3, runtime_env=env, include_dashboard=False, log_to_driver=False)
    # the probes below are defined in this test module, which Ray workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    try:
        tq.close()
    finally:
        ray.shutdown()


def _grpo_reference(scores, index, eps=1e-6):
    out = torch.zeros_like(scores)
    for i, uid in enumerate(index):
        members = torch.stack([scores[j] for j in range(len(index)) if index[j] == uid])
        mean, std = (torch.tensor(0.0), torch.tensor(1.0)) if members.numel() == 1 else (members.mean(), members.std())
        out[i] = (scores[i] - mean) / (std + eps)
    return out


def _rollout(seed=0):
    """6 responses of 2 prompts (G = 3), ragged response lengths, outcome reward on the last token."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4, 3, 5, 1]
    uids = ["p0", "p0", "p0", "p1", "p1", "p1"]
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    weights = [0.1 + 0.9 * torch.rand(n, generator=g) for n in lengths]
    rewards = []
    for n, s in zip(lengths, scores):
        r = torch.zeros(n)
        r[-1] = s
        rewards.append(r)
    return lengths, uids, scores, weights, rewards


# ------------------------------------------------------------------------------- registration


def test_estimator_through_get_adv_estimator_fn():
    fn = core_algos.get_adv_estimator_fn("grpo_kawhi")
    assert fn is kv.compute_grpo_kawhi_advantage
    lengths, uids, scores, weights, rewards = _rollout()
    mask = torch.zeros(6, 5)
    padded_w = torch.ones(6, 5)
    padded_r = torch.zeros(6, 5)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        padded_w[i, :n] = weights[i]
        padded_r[i, :n] = rewards[i]
    adv, _ = fn(token_level_rewards=padded_r, response_mask=mask, index=np.array(uids, dtype=object),
                config=OmegaConf.create({"norm_adv_by_std_in_grpo": True}), kawhi_token_weights=padded_w)
    expected = _grpo_reference(scores, uids)[:, None] * mask * padded_w
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    # verl's own grpo estimator times the weights gives the same
    grpo, _ = core_algos.get_adv_estimator_fn("grpo")(padded_r, mask, np.array(uids, dtype=object))
    torch.testing.assert_close(adv, grpo * padded_w, atol=1e-5, rtol=1e-5)


def _probe_in_actor(runner):
    """Runs inside the TaskRunnerV1 actor: what that process knows (it never imported kawhi_kernels
    itself; ``import verl`` did, through the entry point)."""
    import verl.trainer.ppo.core_algos as ca
    import verl.trainer.ppo.v1.trainer_base as tb
    import verl.workers.engine.fsdp.transformer_impl as ti   # what the engine workers import

    fn = ca.ADV_ESTIMATOR_REGISTRY.get("grpo_kawhi")
    plugin = sys.modules.get("kawhi_kernels.integrations.verl_plugin")
    if plugin is None:  # say why verl's entry-point loader (which only logs at debug level) failed
        import traceback
        from importlib.metadata import entry_points
        try:
            for ep in entry_points(group="verl.plugins"):
                ep.load()
            return {"error": "plugin not loaded by import verl, but loads when asked"}
        except Exception:
            return {"error": traceback.format_exc()}
    import verl.experimental.agent_loop.agent_loop as al           # what the agent-loop workers import
    import verl.trainer.ppo.ray_trainer as rt                      # the legacy trainer
    import verl.trainer.ppo.v1.agent_loop_tq as alt

    from kawhi_kernels.integrations._patching import actor_class, is_wrapped

    return {
        "pid": os.getpid(),
        "registered": None if fn is None else f"{fn.__module__}.{fn.__qualname__}",
        "v1_advantage_patched": is_wrapped(tb.PPOTrainer._compute_advantage),
        "v1_multi_patched": is_wrapped(tb.compute_advantage_for_multi_trajectories),
        "v1_old_log_prob_patched": is_wrapped(tb.PPOTrainer._compute_old_log_prob),
        "engine_patched": is_wrapped(ti.FSDPEngineWithLMHead.forward_step),
        "legacy_patched": is_wrapped(rt.RayPPOTrainer._compute_old_log_prob) and is_wrapped(rt.compute_advantage),
        "agent_loop_patched": is_wrapped(al.AgentLoopWorker._postprocess)
        and is_wrapped(actor_class(alt.AgentLoopWorkerTQ)._agent_loop_postprocess)
        and is_wrapped(alt.list_of_dict_to_tensordict),
        "status": plugin.plugin_status(),
    }


def test_registration_inside_task_runner_actor(ray_session):
    from verl.trainer.main_ppo import TaskRunnerV1

    runner = TaskRunnerV1.remote()                    # as main_ppo.run_ppo starts it
    seen = ray.get(runner.__ray_call__.remote(_probe_in_actor), timeout=180)
    ray.kill(runner)
    assert "error" not in seen, seen.get("error")
    assert seen["pid"] != os.getpid()
    assert seen["registered"] == "kawhi_kernels.integrations.verl.compute_grpo_kawhi_advantage"
    assert seen["v1_advantage_patched"] and seen["v1_multi_patched"]
    assert seen["v1_old_log_prob_patched"] and seen["engine_patched"]
    assert seen["legacy_patched"] and seen["agent_loop_patched"]
    assert set(seen["status"].values()) == {"ok"}, seen["status"]


# ------------------------------------------------------- key regions in the agent loop (images)


def _loop_config():
    return OmegaConf.create({"algorithm": {"adv_estimator": "grpo_kawhi", "kawhi": {"seed": 0}}})


def _loop_sample(seed):
    """(prompt ids, response ids, raw image, image_grid_thw) of one tiny Qwen2.5-VL sample: an 8×12
    patch grid = 24 merged image tokens; the raw image is blocky so SGUF selects some, not all."""
    from PIL import Image

    from kawhi_kernels.integrations import tiny_models as tm

    g = np.random.default_rng(seed)
    base = g.integers(0, 255, size=(4, 6, 3)).astype(np.uint8)
    image = Image.fromarray(np.kron(base, np.ones((24, 24, 1), dtype=np.uint8)))
    prompt = [tm.BOS_TOKEN_ID, 10 + seed, tm.VISION_START_TOKEN_ID] + [tm.IMAGE_TOKEN_ID] * 24 + \
        [tm.VISION_END_TOKEN_ID, 40]
    response = [50, 51 + seed, 52]
    return prompt, response, image, torch.tensor([[1, 8, 12]])


def _expected_key_mask(hf_config, prompt, response, image, grid, kawhi=None):
    from kawhi_kernels import KAWHI
    from kawhi_kernels.integrations.image_regions import key_mask_for_sequence, regions_for_grids

    vision = hf_config.vision_config
    regions = regions_for_grids(kawhi or KAWHI(seed=0), [image], grid, merge_size=vision.spatial_merge_size,
                                patch_size=vision.patch_size)
    return key_mask_for_sequence(torch.tensor(prompt + response), hf_config.image_token_id, regions)


def _tiny_hf_config():
    from kawhi_kernels.integrations import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(seed=0).config


def _v1_loop_worker(hf_config, grids):
    """verl's AgentLoopWorkerTQ (the class Ray ships), not initialised: the attributes
    _agent_loop_postprocess reads; the processor call (_compute_multi_modal_inputs, which needs
    a real processor's files) returns the image grid the processor would."""
    from verl.trainer.ppo.v1 import agent_loop_tq

    from kawhi_kernels.integrations._patching import actor_class

    worker = object.__new__(actor_class(agent_loop_tq.AgentLoopWorkerTQ))
    worker.config = _loop_config()
    worker.model_config = types.SimpleNamespace(hf_config=hf_config)
    worker.processor = None
    worker.reward_loop_worker_handles = None
    worker.distillation_enabled = False
    worker._compute_multi_modal_inputs = lambda output, input_ids: {"image_grid_thw": grids[len(output.prompt_ids)]}
    return worker


def _loop_output(prompt, response, image):
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    return AgentLoopOutput(prompt_ids=prompt, response_ids=response, response_mask=[1] * len(response),
                           multi_modal_data={"images": [image]} if image is not None else None, reward_score=1.0,
                           num_turns=2, metrics=AgentLoopMetrics(), extra_fields={})


def test_v1_agent_loop_puts_key_mask_into_transfer_queue(ray_session):
    """AgentLoopWorkerTQ._agent_loop_postprocess (verl's, patched) puts kawhi_key_mask, unpadded like
    input_ids, with each row; the G sessions of a prompt share one SGUF selection; no image → all False."""
    import asyncio

    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    hf_config = _tiny_hf_config()
    prompt, response, image, grid = _loop_sample(0)
    worker = _v1_loop_worker(hf_config, {len(prompt): grid})
    for session in (0, 1):                             # G = 2 responses of prompt "q0"
        asyncio.run(worker._agent_loop_postprocess(_loop_output(prompt, response, image), False, uid="q0",
                                                   session_id=session, global_steps=1))
    asyncio.run(worker._agent_loop_postprocess(_loop_output(prompt, response, None), False, uid="q1",
                                               session_id=0, global_steps=1))
    keys = ["q0_0_0", "q0_1_0", "q1_0_0"]
    got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["kawhi_key_mask", "input_ids"])
    expected = _expected_key_mask(hf_config, prompt, response, image, grid)
    rows = got["kawhi_key_mask"].unbind() if got["kawhi_key_mask"].is_nested else list(got["kawhi_key_mask"])
    ids = got["input_ids"].unbind() if got["input_ids"].is_nested else list(got["input_ids"])
    assert rows[0].shape == ids[0].shape == (len(prompt) + len(response),)
    assert torch.equal(rows[0], expected) and torch.equal(rows[1], expected)
    assert expected.any() and not expected[torch.tensor(prompt + response) == hf_config.image_token_id].all()
    assert not rows[2].any()
    cache = worker.__dict__["_kawhi_sguf"][1]
    assert (cache.misses, cache.hits) == (1, 1)        # one selection for the prompt's two sessions


def test_legacy_agent_loop_postprocess_adds_padded_key_mask():
    """AgentLoopWorker._postprocess (legacy trainer, verl's, patched): kawhi_key_mask [B, P+R] in the
    DataProto, padded exactly like input_ids."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopWorker, _InternalAgentLoopOutput

    hf_config = _tiny_hf_config()
    worker = object.__new__(AgentLoopWorker)
    worker.config = _loop_config()
    worker.model_config = types.SimpleNamespace(hf_config=hf_config)
    worker.reward_loop_worker_handles = None
    inputs, expected = [], []
    pw, rw = 32, 5
    for seed in (0, 1):
        prompt, response, image, grid = _loop_sample(seed)
        p_ids = torch.zeros(1, pw, dtype=torch.int64)
        p_ids[0, pw - len(prompt):] = torch.tensor(prompt)
        r_ids = torch.zeros(1, rw, dtype=torch.int64)
        r_ids[0, :len(response)] = torch.tensor(response)
        attn = torch.cat([p_ids != 0, r_ids != 0], 1).long()
        inputs.append(_InternalAgentLoopOutput(
            prompt_ids=p_ids, response_ids=r_ids, input_ids=torch.cat([p_ids, r_ids], 1),
            position_ids=(attn.cumsum(-1) - 1).clamp_min(0), response_mask=(r_ids != 0).long(), attention_mask=attn,
            multi_modal_inputs={"image_grid_thw": grid}, multi_modal_data={"images": [image]}, num_turns=2,
            metrics=AgentLoopMetrics(), extra_fields={}))
        mask = torch.zeros(pw + rw, dtype=torch.bool)
        mask[attn[0].bool()] = _expected_key_mask(hf_config, prompt, response, image, grid)
        expected.append(mask)
    out = worker._postprocess(inputs, input_non_tensor_batch={"uid": np.array(["a", "b"], dtype=object)})
    assert torch.equal(out.batch["kawhi_key_mask"], torch.stack(expected))
    # another estimator: verl's batch unchanged
    worker.config = OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}})
    assert "kawhi_key_mask" not in worker._postprocess(inputs).batch.keys()


def _ray_v1_loop_probe():
    """An actor of Ray's copy of AgentLoopWorkerTQ (its __init__ needs a model and servers, so a
    subclass sets the attributes instead): runs verl's _agent_loop_postprocess inside the actor."""
    from verl.trainer.ppo.v1 import agent_loop_tq

    from kawhi_kernels.integrations._patching import actor_class

    class V1LoopProbe(actor_class(agent_loop_tq.AgentLoopWorkerTQ)):
        def __init__(self, hf_config, grid, prompt_len):
            import transfer_queue

            transfer_queue.init()
            self.config = _loop_config()
            self.model_config = types.SimpleNamespace(hf_config=hf_config)
            self.processor = None
            self.reward_loop_worker_handles = None
            self.distillation_enabled = False
            self._grid = grid

        def _compute_multi_modal_inputs(self, output, input_ids):
            return {"image_grid_thw": self._grid}

        async def run(self, output, **kwargs):
            from kawhi_kernels.integrations._patching import is_wrapped

            await self._agent_loop_postprocess(output, False, **kwargs)
            return {"pid": os.getpid(), "wrapped": is_wrapped(type(self)._agent_loop_postprocess)}

    return ray.remote(V1LoopProbe)


def _ray_legacy_loop_probe():
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    class LegacyLoopProbe(AgentLoopWorker):           # AgentLoopManager: ray.remote(AgentLoopWorker)
        def __init__(self):
            pass

        def status(self):
            from kawhi_kernels.integrations._patching import is_wrapped
            from kawhi_kernels.integrations.verl_plugin import plugin_status

            return {"pid": os.getpid(), "wrapped": is_wrapped(AgentLoopWorker._postprocess),
                    "status": plugin_status().get("verl.experimental.agent_loop.agent_loop")}

    return ray.remote(LegacyLoopProbe)


def test_agent_loop_patches_reach_ray_actors(ray_session):
    """v1: Ray ships AgentLoopWorkerTQ's class by value, with the patch made where the actor is
    created; legacy: AgentLoopWorker goes by reference and the plugin patches it in the actor."""
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    hf_config = _tiny_hf_config()
    prompt, response, image, grid = _loop_sample(1)
    v1 = _ray_v1_loop_probe().options(num_cpus=0).remote(hf_config, grid, len(prompt))
    seen = ray.get(v1.run.remote(_loop_output(prompt, response, image), uid="r0", session_id=0, global_steps=1),
                   timeout=180)
    legacy = _ray_legacy_loop_probe().options(num_cpus=0).remote()
    legacy_seen = ray.get(legacy.status.remote(), timeout=180)
    ray.kill(v1)
    ray.kill(legacy)
    assert seen["pid"] != os.getpid() and seen["wrapped"]
    got = tq.kv_batch_get(keys=["r0_0_0"], partition_id="train", select_fields=["kawhi_key_mask"])["kawhi_key_mask"]
    row = got.unbind()[0] if got.is_nested else got[0]
    assert torch.equal(row, _expected_key_mask(hf_config, prompt, response, image, grid))
    assert legacy_seen["pid"] != os.getpid() and legacy_seen["wrapped"] and legacy_seen["status"] == "ok"


# ------------------------------------------------------------------ the v1 trainer's advantage step


def _v1_trainer(adv_estimator):
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync   # trainer.v1.trainer_mode's default class

    trainer = object.__new__(PPOTrainerSync)          # only the config is read by _compute_advantage
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": adv_estimator, "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False,
                      "norm_adv_by_std_in_grpo": True, "kawhi": {"tau": 0.05}},
        "actor_rollout_ref": {"rollout": {"n": 3}},
    })
    return trainer


def _put_rollout(partition, with_weights=True):
    lengths, uids, scores, weights, rewards = _rollout()
    keys, fields = [], []
    for i, n in enumerate(lengths):
        keys.append(f"{uids[i]}_{i % 3}_0")           # {uid}_{session_id}_{index}, one turn each
        field = {"uid": uids[i], "response_mask": torch.ones(n, dtype=torch.int64), "rm_scores": rewards[i],
                 "rollout_log_probs": torch.zeros(n), "old_log_probs": torch.zeros(n),
                 "ref_log_prob": torch.zeros(n), "values": torch.zeros(n)}
        if with_weights:
            field[kv.WEIGHTS_KEY] = weights[i]
        fields.append(field)
    return tq.kv_batch_put(keys=keys, partition_id=partition, fields=list_of_dict_to_tensordict(fields)), \
        lengths, uids, scores, weights


def test_v1_trainer_compute_advantage_with_transfer_queue(ray_session):
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    meta, lengths, uids, scores, weights = _put_rollout("train_kawhi")
    _v1_trainer("grpo_kawhi")._compute_advantage(meta, metrics={})
    out = tq.kv_batch_get(keys=meta.keys, partition_id="train_kawhi", select_fields=["advantages", "returns"])
    adv = out["advantages"]
    group = _grpo_reference(scores, uids)
    for i, row in enumerate(adv.unbind()):
        torch.testing.assert_close(row, group[i] * weights[i], atol=1e-5, rtol=1e-5)

    # plain grpo through the same (patched) step is unchanged: the group advantage, unweighted
    meta, *_ = _put_rollout("train_grpo", with_weights=False)
    _v1_trainer("grpo")._compute_advantage(meta, metrics={})
    out = tq.kv_batch_get(keys=meta.keys, partition_id="train_grpo", select_fields=["advantages"])
    for i, row in enumerate(out["advantages"].unbind()):
        torch.testing.assert_close(row, group[i].expand(lengths[i]), atol=1e-5, rtol=1e-5)

    # grpo_kawhi without weights in the queue: a clear error naming the field
    meta, *_ = _put_rollout("train_missing", with_weights=False)
    with pytest.raises(KeyError, match="kawhi_token_weights"):
        _v1_trainer("grpo_kawhi")._compute_advantage(meta, metrics={})


def test_legacy_compute_advantage_routes_grpo_kawhi():
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer

    lengths, uids, scores, weights, rewards = _rollout()
    mask = torch.zeros(6, 5)
    padded_w = torch.ones(6, 5)
    padded_r = torch.zeros(6, 5)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        padded_w[i, :n] = weights[i]
        padded_r[i, :n] = rewards[i]
    data = DataProto.from_dict(tensors={"token_level_rewards": padded_r, "response_mask": mask,
                                        kv.WEIGHTS_KEY: padded_w},
                               non_tensors={"uid": np.array(uids, dtype=object)})
    out = ray_trainer.compute_advantage(data, adv_estimator="grpo_kawhi", norm_adv_by_std_in_grpo=True,
                                        config=OmegaConf.create({}))
    expected = _grpo_reference(scores, uids)[:, None] * mask * padded_w
    torch.testing.assert_close(out.batch["advantages"], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- per-token alignment


def test_token_layout_round_trips_through_verl_slicing():
    """KAWHI's own-position values, shifted by to_verl_token_layout, come out of verl's own
    no_padding_2_padding / response_from_nested exactly as packed_response_values reads them."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import no_padding_2_padding, response_from_nested

    g = torch.Generator().manual_seed(5)
    prompt_lens, response_lens = [3, 1, 6, 2], [4, 5, 1, 3]
    seq = [p + r for p, r in zip(prompt_lens, response_lens)]
    cu = torch.tensor([0] + np.cumsum(seq).tolist())
    values = torch.randn(int(cu[-1]), generator=g)
    response_mask = torch.zeros(4, max(response_lens), dtype=torch.int64)
    for i, r in enumerate(response_lens):
        response_mask[i, :r] = 1
    expected = kv.packed_response_values(values, cu, response_mask)

    shifted = kv.to_verl_token_layout(values, cu)
    nested = torch.nested.nested_tensor_from_jagged(shifted, cu)
    data = TensorDict({
        "prompts": torch.nested.as_nested_tensor([torch.ones(p, dtype=torch.int64) for p in prompt_lens],
                                                 layout=torch.jagged),
        "responses": torch.nested.as_nested_tensor([torch.ones(r, dtype=torch.int64) for r in response_lens],
                                                   layout=torch.jagged),
    }, batch_size=[4])
    padded = no_padding_2_padding(nested, data)
    torch.testing.assert_close(padded * response_mask, expected)
    resp_nested = torch.nested.as_nested_tensor([torch.ones(r, dtype=torch.int64) for r in response_lens],
                                                layout=torch.jagged)
    from_nested = response_from_nested(nested, resp_nested)
    for i, row in enumerate(from_nested.unbind()):
        torch.testing.assert_close(row, expected[i, :response_lens[i]])
    # without the shift, verl's slice is one position early (the token that predicts t)
    unshifted = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(values, cu), data)
    assert not torch.allclose(unshifted * response_mask, expected)


# ------------------------------------------------- actor-side α in verl's patched Qwen2.5-VL forward


_WORKER_RESULTS: dict = {}


def _run_worker(tmp_path, sp, family="qwen2_5_vl", attn="sdpa", mode="engine"):
    """verl_qwen_vl_worker.py in a fresh process (sp = 2: two gloo processes); results are cached
    per configuration so the cross-sp comparisons reuse them."""
    import json
    import subprocess

    key = (sp, family, attn, mode)
    if key in _WORKER_RESULTS:
        return _WORKER_RESULTS[key]
    out = tmp_path / f"alpha_{family}_{attn}_{mode}_sp{sp}.json"
    worker = os.path.join(os.path.dirname(__file__), "verl_qwen_vl_worker.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, worker, str(out), str(sp), family, attn, mode], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _WORKER_RESULTS[key] = json.loads(out.read_text())
    return _WORKER_RESULTS[key]


def _check_engine_output(result):
    """kawhi_alpha out of verl's FSDPEngineWithLMHead.forward_step / prepare_model_outputs: nested
    beside verl's own log_probs / entropy, in verl's layout, equal to the reference."""
    assert result["engine_outputs"] == ["entropy", "kawhi_alpha", "log_probs"], result["engine_outputs"]
    assert result["engine_alpha_nested"]
    values, ref = torch.tensor(result["engine_alpha_values"]), torch.tensor(result["ref_verl_layout"])
    torch.testing.assert_close(values, ref, atol=1e-2, rtol=0)
    for row, expected in zip(result["engine_alpha_response"], result["ref_response"]):  # verl's response_from_nested
        torch.testing.assert_close(torch.tensor(row), torch.tensor(expected), atol=1e-2, rtol=0)
    assert max(abs(v) for row in result["ref_response"] for v in row) > 0.05


def _check_alpha(result, sp):
    assert result["ref_abs_max"] > 0.05                # α is not trivially 0
    assert result["max_abs_err"] < 1e-2, result        # bf16 q/k, as verl runs the actor
    assert result["off_query_zero"]
    tokens, local_heads = result["tap_seen"]           # what the tap saw: all tokens, H / sp heads
    assert tokens >= result["total"] and local_heads == result["num_heads"] // sp
    _check_engine_output(result)


def test_alpha_in_verl_patched_qwen2_5_vl_forward_sp1(tmp_path):
    result = _run_worker(tmp_path, 1)
    assert result["hf_capture_alpha_is_none"]          # verl's patch bypasses transformers' attention interface
    _check_alpha(result, 1)


def test_alpha_under_ulysses_sp2_over_gloo(tmp_path):
    result = _run_worker(tmp_path, 2)                  # two CPU processes, verl's all-to-all, padded to 34
    assert result["total"] % 2 == 1                    # the packed row needed Ulysses padding
    assert result["tap_seen"][0] == result["total"] + 1
    _check_alpha(result, 2)                            # verl's ulysses_pad, all-to-all and gather_outputs_and_unpad
    sp1 = _run_worker(tmp_path, 1)
    torch.testing.assert_close(torch.tensor(result["engine_alpha_values"]), torch.tensor(sp1["engine_alpha_values"]),
                               atol=1e-3, rtol=0)


def test_qwen3_vl_alpha_sdpa_sp1_capture_under_verl_patch(tmp_path):
    """Qwen3-VL keeps transformers' attention interface under verl's patch: capture_kawhi_alpha
    (the engine's choice under sdpa) fires and matches the unpatched model."""
    result = _run_worker(tmp_path, 1, "qwen3_vl", "sdpa")
    assert result["ref_abs_max"] > 0.05 and result["max_abs_err"] < 1e-2, result
    assert result["off_query_zero"]
    _check_engine_output(result)


def test_qwen3_vl_alpha_flash_path_sp1(tmp_path):
    """attn_implementation=flash_attention_2: transformers' flash interface → verl's
    _ulysses_flash_attention_forward → monkey_patch._flash_attention_forward (the tap)."""
    result = _run_worker(tmp_path, 1, "qwen3_vl", "flash")
    _check_alpha(result, 1)


def test_qwen3_vl_alpha_ulysses_sp2_equals_sp1_and_sdpa_refused(tmp_path):
    result = _run_worker(tmp_path, 2, "qwen3_vl", "flash")
    assert result["tap_seen"][0] == result["total"] + 1   # after verl's all-to-all: the whole padded row
    _check_alpha(result, 2)
    sp1 = _run_worker(tmp_path, 1, "qwen3_vl", "flash")
    torch.testing.assert_close(torch.tensor(result["engine_alpha_values"]), torch.tensor(sp1["engine_alpha_values"]),
                               atol=1e-3, rtol=0)
    for impl in ("sdpa", "eager"):                        # verl's all-to-all never runs there: refused, clearly
        message = result[f"not_implemented_{impl}"]
        assert "sp=2" in message and repr(impl) in message and "flash_attention_2" in message


def test_legacy_trainer_chain_agent_loop_to_weights(tmp_path):
    """Legacy trainer (trainer.use_v1=false), real verl code end to end on the actor side:
    AgentLoopWorker._postprocess (kawhi_key_mask [B, P+R] from the raw images) →
    RayPPOTrainer._compute_old_log_prob (α flags in meta_info → the engine's infer_batch with dynamic
    batch size: verl's rearrange_micro_batches splits the two sequences into two micro-batches, each
    through forward_step; postprocess_batch_func restores the order → no_padding_2_padding) →
    kawhi_token_weights [B, R]."""
    result = _run_worker(tmp_path, 1, "qwen2_5_vl", "sdpa", "legacy")
    key = torch.tensor(result["legacy_key_mask"])
    attention = torch.tensor(result["legacy_attention_mask"]).bool()
    ids = torch.tensor(result["legacy_input_ids"])
    assert key.shape == ids.shape and not key[~attention].any()   # padded exactly like input_ids
    for b, expected in enumerate(result["sguf_key_mask"]):         # = SGUF of the raw image, via image_regions
        assert key[b][attention[b]].tolist() == expected
    assert key.any() and not key.all()
    assert result["legacy_flags"] == {"kawhi_alpha": True, "kawhi_heads": "1,2", "kawhi_layer": -1}
    assert result["legacy_model_forwards"] == 2        # one forward per micro-batch, no extra pass
    assert result["legacy_group_restored"]             # the worker group's own compute_log_prob again
    assert not any(k.startswith("kawhi") for k in result["legacy_meta_after"])   # ref / update passes do not tap
    assert result["legacy_old_keys"] == ["entropys", "kawhi_token_weights", "old_log_probs"]
    weights, expected = torch.tensor(result["legacy_weights"]), torch.tensor(result["expected_weights"])
    torch.testing.assert_close(weights, expected, atol=5e-3, rtol=0)
    mask = torch.tensor(result["legacy_response_mask"]).bool()
    assert (weights[~mask] == 1).all() and (weights[mask] < 0.99).any()


# ------------------------------------------------ v1 _compute_old_log_prob: fetch α, put the weights


class _CharTokenizer:
    """ids → characters; id 0 decodes to a paragraph break."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join("\n\n" if i == 0 else chr(ord("a") + i % 26) for i in ids)


class _EngineWorkerGroup:
    """Plays the actor worker group's compute_log_prob: checks verl's extra_info carries the KAWHI
    flag, and puts log_probs / entropy / kawhi_alpha (nested, verl's layout) into the TransferQueue
    as the patched engine does."""

    def __init__(self, alpha_own, cu):
        self.alpha_own, self.cu, self.extra_info = alpha_own, cu, None

    def compute_log_prob(self, batch):
        from tensordict import TensorDict

        self.extra_info = dict(batch.extra_info)
        lens = self.cu.diff().tolist()
        nested = lambda v: torch.nested.nested_tensor_from_jagged(v, self.cu)  # noqa: E731
        fields = TensorDict({"log_probs": nested(-torch.rand(int(self.cu[-1]))),
                             "entropy": nested(torch.rand(int(self.cu[-1]))),
                             "kawhi_alpha": nested(kv.to_verl_token_layout(self.alpha_own, self.cu))},
                            batch_size=[len(lens)])
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)


def test_v1_old_log_prob_fetches_alpha_and_puts_weights(ray_session):
    from verl.trainer.ppo.v1 import trainer_base

    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    lengths, uids, scores, _, rewards = _rollout()
    prompt_lens = [3, 4, 2, 5, 3, 4]
    g = torch.Generator().manual_seed(11)
    keys, fields, alpha_rows, has_image = [], [], [], []
    for i, (p, r) in enumerate(zip(prompt_lens, lengths)):
        keys.append(f"{uids[i]}_{i % 3}_0")
        key_mask = torch.zeros(p + r, dtype=torch.bool)
        key_mask[:p - 1] = i != 4                       # row 4: no selected image key -> weight 1
        has_image.append(i != 4)
        responses = torch.randint(1, 30, (r,), generator=g)
        responses[r // 2] = 0                           # a paragraph break inside longer responses
        fields.append({"uid": uids[i], "input_ids": torch.randint(1, 30, (p + r,), generator=g),
                       "responses": responses, "response_mask": torch.ones(r, dtype=torch.int64),
                       "rm_scores": rewards[i], "kawhi_key_mask": key_mask})
        alpha_rows.append(torch.rand(p + r, generator=g) - 0.3)
    meta = tq.kv_batch_put(keys=keys, partition_id="train_olp", fields=list_of_dict_to_tensordict(fields))
    cu = torch.tensor([0] + np.cumsum([p + r for p, r in zip(prompt_lens, lengths)]).tolist())
    trainer = _v1_trainer("grpo_kawhi")
    trainer.config.algorithm.kawhi.heads = [0, 2]
    trainer.config.actor_rollout_ref.rollout.update({"temperature": 1.0, "calculate_log_probs": False})
    trainer.config.actor_rollout_ref.actor = {"loss_agg_mode": "token-mean", "loss_scale_factor": None}
    trainer.tokenizer = _CharTokenizer()
    trainer.actor_rollout_wg = _EngineWorkerGroup(torch.cat(alpha_rows), cu)
    meta = trainer_base.PPOTrainer._compute_old_log_prob(trainer, meta, metrics={})

    flags = trainer.actor_rollout_wg.extra_info     # what verl forwards to the engine's micro-batches
    assert flags["kawhi_alpha"] is True and flags["kawhi_heads"] == "0,2" and flags["kawhi_layer"] == -1
    assert flags["calculate_entropy"] is True
    assert "kawhi_alpha" not in meta.extra_info      # the ref / update steps do not tap
    got = tq.kv_batch_get(keys=keys, partition_id="train_olp", select_fields=[kv.WEIGHTS_KEY, "old_log_probs"])

    from kawhi_kernels.integrations.rl import response_texts_and_offsets
    width = max(lengths)
    alpha = torch.zeros(6, width)
    mask = torch.zeros(6, width, dtype=torch.bool)
    resp = torch.zeros(6, width, dtype=torch.int64)
    for i, r in enumerate(lengths):
        alpha[i, :r] = alpha_rows[i][-r:]                # own-position α of the response tokens
        mask[i, :r] = True
        resp[i, :r] = fields[i]["responses"]
    texts, offsets = response_texts_and_offsets(_CharTokenizer(), resp, mask)
    expected = kv.kawhi_token_weights_from_alpha(alpha, mask, texts, offsets, has_image=torch.tensor(has_image),
                                                 tau=0.05)
    for i, row in enumerate(got[kv.WEIGHTS_KEY].unbind()):
        torch.testing.assert_close(row, expected[i, :lengths[i]])
    assert torch.all(got[kv.WEIGHTS_KEY].unbind()[4] == 1.0)
    assert not torch.allclose(expected[mask], torch.ones(int(mask.sum())))   # the weights are not trivially 1

    # and the already-patched advantage step consumes them: group advantage × weights
    trainer._compute_advantage(meta, metrics={})
    adv = tq.kv_batch_get(keys=keys, partition_id="train_olp", select_fields=["advantages"])["advantages"]
    group = _grpo_reference(scores, uids)
    for i, row in enumerate(adv.unbind()):
        torch.testing.assert_close(row, group[i] * expected[i, :lengths[i]], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- Hydra config keys


def test_hydra_config_needs_plus_prefix_and_kawhi_from_config_reads_it():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[
            "algorithm.adv_estimator=grpo_kawhi", "+algorithm.kawhi.tau=0.2", "+algorithm.kawhi.heads=[0,2]",
            "+algorithm.kawhi.layer=-1"])
        with pytest.raises(ConfigCompositionException):
            compose(config_name="ppo_trainer", overrides=["algorithm.kawhi.tau=0.2"])   # without '+'
    assert cfg.trainer.use_v1                                   # the default trainer is v1
    kawhi, layer = kv.kawhi_from_config(cfg.algorithm)
    assert kawhi.weight_params["tau"] == 0.2 and kawhi.heads == [0, 2] and layer == -1
    assert core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator) is kv.compute_grpo_kawhi_advantage


# ------------------------------------------------------------------- end to end on CPU: the blockers


def test_end_to_end_on_cpu_is_blocked_where_the_recipe_says(ray_session):
    """What stops a real verl GRPO step on this CPU-only stack (examples/verl_grpo_kawhi.md, "End to
    end"): rollout only through inference-server replicas (vLLM / SGLang / TensorRT-LLM, none
    installable without a GPU), and verl's device layer is CUDA-only without an accelerator."""
    from verl.workers.rollout import base, replica

    assert sorted(replica.RolloutReplicaRegistry._registry) == ["sglang", "trtllm", "vllm"]
    assert sorted(name for name, _ in base._ROLLOUT_REGISTRY) == ["sglang", "trtllm", "vllm"]
    with pytest.raises(ValueError, match="Unknown rollout mode"):
        replica.get_rollout_replica_class("hf")                 # no in-process HF rollout is registered
    with pytest.raises(AssertionError, match="not found"):
        base.get_rollout_class("hf", "async")
    # the replica loaders fail without the servers (sglang's loader installs vllm mocks: not called here)
    with pytest.raises(ValueError, match="vllm version None not supported"):   # verl/third_party/vllm/__init__.py
        replica.RolloutReplicaRegistry.get("vllm")
    trtllm = replica.RolloutReplicaRegistry.get("trtllm")      # loads; its server needs tensorrt_llm (launch_server)
    assert trtllm.__name__ == "TRTLLMReplica"
    with pytest.raises(ImportError):
        import tensorrt_llm  # noqa: F401
    if not torch.cuda.is_available():
        from verl.single_controller.ray.base import ResourcePoolManager
        from verl.utils.device import get_device_id

        with pytest.raises((AssertionError, RuntimeError)):
            get_device_id()                                      # FSDPEngine._build_fsdp_module, forward_step
        # what main_ppo hit first here: the trainer's resource pools always ask Ray for GPUs
        pools = ResourcePoolManager(resource_pool_spec={"global_pool": [1]}, mapping={})
        with pytest.raises(ValueError, match="Total available GPUs 0 is less than total desired GPUs 1"):
            pools.create_resource_pool()
