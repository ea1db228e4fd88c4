"""Run by tests/test_verl_real.py in fresh processes (verl's monkey patch is class-global, so it must
not leak into the pytest process): KAWHI's α inside verl's patched Qwen-VL forward, sp = 1 and
Ulysses sp = 2 over gloo, against the reference from the unpatched model.

    python tests/verl_qwen_vl_worker.py OUT.json SP FAMILY ATTN MODE

FAMILY: qwen2_5_vl | qwen3_vl; ATTN (text attention): sdpa | flash (flash: verl's Ulysses flash
path with a varlen SDPA stand-in for the flash kernel; Qwen2.5-VL always runs verl's own attention
forward); MODE: engine (verl's FSDPEngineWithLMHead.forward_step) | legacy (the legacy trainer's
chain: AgentLoopWorker._postprocess → RayPPOTrainer._compute_old_log_prob → the engine, sp = 1).
"""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

HEADS = [1, 2]
RESPONSE = 4                                # the "response": each sequence's last 4 tokens
TAU = 0.2                                   # paragraph-weight temperature of the legacy chain (weights not all 1)


# ------------------------------------------------------------------------- flash-kernel stand-ins


def _sdpa_segments(q, k, v, bounds, causal, scale):
    """q [L, H, D], k/v [L, Hk, D] (GQA), attention within each [lo, hi) of ``bounds``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None].float(), k[lo:hi].transpose(0, 1)[None].float(),
                                               v[lo:hi].transpose(0, 1)[None].float(), is_causal=causal, scale=scale)
            out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)
    return out


def sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                softmax_scale=None, causal=True, **_):
    """Stand-in for flash_attn_varlen_func (flash-attn needs CUDA): q/k/v [total, H, D]."""
    return _sdpa_segments(q, k, v, cu_seqlens_q.tolist(), causal, softmax_scale)


def sdpa_flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length, *args,
                                 position_ids=None, is_causal=True, softmax_scale=None, **kwargs):
    """Stand-in for transformers' _flash_attention_forward (the flash kernel): q/k/v [1, L, H, D];
    packed sequences from position_ids (a sequence starts where they are 0), as flash's varlen path."""
    q, k, v = query_states[0], key_states[0], value_states[0]
    total = q.shape[0]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and position_ids is not None:
        starts = (position_ids.reshape(-1)[:total] == 0).nonzero().view(-1).tolist()
        cu = sorted(set([0] + starts)) + [total]
    bounds = cu.tolist() if isinstance(cu, torch.Tensor) else (cu if cu is not None else [0, total])
    return _sdpa_segments(q, k, v, bounds, is_causal, softmax_scale)[None]


def install_flash_stand_ins(family, attn):
    import verl.models.transformers.monkey_patch as mp
    import verl.models.transformers.qwen2_vl as vq

    vq.flash_attn_varlen_func = sdpa_varlen
    vq._flash_attention_forward = sdpa_flash_attention_forward   # verl's branch for one unpacked sequence
    vq._flash_supports_window_size = False
    vq._flash_supports_deterministic = False
    vq._flash_use_top_left_mask = False
    mp._flash_attention_forward = sdpa_flash_attention_forward   # the kernel call after verl's all-to-all


# ------------------------------------------------------------------------------- model and data


def build(family):
    from kawhi_kernels.integrations import tiny_models as tm

    make = tm.tiny_qwen2_5_vl if family == "qwen2_5_vl" else tm.tiny_qwen3_vl
    model = make(seed=0, dtype=torch.bfloat16)                 # verl runs the actor forward in bf16
    inputs = tm.tiny_vl_inputs(model, images_per_sample=(1, 1), text_lens=(5, 8), image_grid=(4, 6), seed=3)  # 33 tokens: sp=2 pads one
    mask = inputs["attention_mask"].bool()
    seqs = [inputs["input_ids"][b][mask[b]] for b in range(mask.shape[0])]
    per_image = inputs["image_grid_thw"].prod(-1).tolist()
    pixels = list(torch.split(inputs["pixel_values"], per_image))
    grids = [inputs["image_grid_thw"][b:b + 1] for b in range(len(seqs))]
    return model, tm, seqs, pixels, grids


def raw_images(seed=7):
    """One raw RGB image per sample (what the agent loop holds in multi_modal_data["images"])."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        base = g.integers(0, 255, size=(6, 9, 3)).astype(np.uint8)            # blocky content: SGUF finds regions
        out.append(Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))))
    return out


def sguf_masks(model, tm, seqs, grids, images):
    """The reference key mask: SGUF of each raw image (kawhi_kernels.integrations.image_regions)."""
    from kawhi_kernels import KAWHI
    from kawhi_kernels.integrations.image_regions import key_mask_for_sequence, regions_for_grids

    vision = model.config.vision_config
    kawhi = KAWHI(seed=0)
    out = []
    for ids, grid, image in zip(seqs, grids, images):
        regions = regions_for_grids(kawhi, [image], grid, merge_size=int(vision.spatial_merge_size),
                                    patch_size=int(vision.patch_size))
        out.append(key_mask_for_sequence(ids, tm.IMAGE_TOKEN_ID, regions))
    return out


def masks(tm, seqs):
    key, query = [], []
    for ids in seqs:
        n = ids.numel()
        key.append((ids == tm.IMAGE_TOKEN_ID) & (torch.arange(n) % 2 == 0))     # a "selection" of image keys
        q = torch.zeros(n, dtype=torch.bool)
        q[n - RESPONSE:] = True
        query.append(q)
    return torch.cat(key), torch.cat(query)


def reference(model, tm, seqs, pixels, grids, key_mask, query_mask):
    """α per sequence from the unpatched model (HF sdpa attention, one unpadded sequence per forward)."""
    from kawhi_kernels.integrations import capture_qk
    from kawhi_kernels.integrations.verl import kawhi_alpha_packed

    out, positions = [], []
    start = 0
    for ids, px, grid in zip(seqs, pixels, grids):
        n = ids.numel()
        mm = (ids == tm.IMAGE_TOKEN_ID).int()[None]
        with torch.no_grad(), capture_qk(model, [-1]) as cap:
            model(input_ids=ids[None], pixel_values=px, image_grid_thw=grid, mm_token_type_ids=mm)
        rec = cap.records[len(model.model.language_model.layers) - 1]
        out.append(kawhi_alpha_packed(rec.q, rec.k, torch.tensor([0, n], dtype=torch.int32),
                                      key_mask[start:start + n], query_mask[start:start + n], heads=HEADS))
        rope, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=mm, image_grid_thw=grid)
        positions.append(torch.cat([torch.arange(n)[None, None], rope], dim=0))  # (4, 1, n): text + 3-D M-RoPE
        start += n
    return torch.cat(out), torch.cat(positions, dim=-1)


def direct_tap_alpha(family, attn, model, seqs, pixels, grids, position_ids, key_mask, query_mask, sp_group, sp):
    """α from the tap itself around verl's patched model forward (the engine does the same)."""
    from verl.utils.ulysses import ulysses_pad

    from kawhi_kernels.integrations.verl import capture_kawhi_alpha
    from kawhi_kernels.integrations.verl_actor import VerlFlashAttentionAlphaTap, VerlQwen2VLAlphaTap

    ids = torch.cat(seqs)[None]                                            # [1, total], verl's remove padding
    total = ids.shape[1]
    ids, pos, _ = ulysses_pad(ids, position_ids_rmpad=position_ids, sp_size=sp)
    options = dict(key_mask=key_mask, query_mask=query_mask, heads=HEADS)
    if family == "qwen2_5_vl":
        tap = VerlQwen2VLAlphaTap(model, sp_group=sp_group, **options)
    elif attn == "flash":
        tap = VerlFlashAttentionAlphaTap(model, sp_group=sp_group, **options)
    else:
        cu = torch.tensor([0] + np.cumsum([s.numel() for s in seqs]).tolist(), dtype=torch.int32)
        tap = capture_kawhi_alpha(model, cu_seqlens=cu, **options)
    with torch.no_grad(), tap:
        model(input_ids=ids, attention_mask=None, position_ids=pos, pixel_values=torch.cat(pixels),
              image_grid_thw=torch.cat(grids), use_cache=False)
    assert tap.alpha is not None, "the tap did not fire"
    return tap.alpha[:total], getattr(tap, "seen", None)


# ------------------------------------------------------------------------------------ the engine


def make_engine(model, sp):
    """verl's FSDPEngineWithLMHead, not initialised (no FSDP wrap on CPU: see the recipe); only the
    attributes its forward path reads are set, and ``get_device_id`` / ``get_device_name``
    (CUDA-only in verl.utils.device on a machine without an accelerator) point at the CPU."""
    from verl.workers.engine.fsdp import transformer_impl as ti

    from kawhi_kernels.integrations._patching import is_wrapped

    assert is_wrapped(ti.FSDPEngineWithLMHead.forward_step), "plugin did not patch the engine"
    ti.get_device_id = lambda: "cpu"
    ti.get_device_name = lambda: "cpu"
    engine = object.__new__(ti.FSDPEngineWithLMHead)
    engine.module = model
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    engine.compute_entropy_from_logits = ti.verl_F.entropy_from_logits
    engine.pad_to_length = False
    engine.ulysses_sequence_parallel_size = sp
    engine.use_ulysses_sp = sp > 1
    engine._autocast_dtype = torch.float32          # the model is already bf16; CPU has no CUDA autocast
    return engine


def padded_batch(seqs, position_ids, key_mask):
    """Left-padded [B, L] rollout batch (the response: each row's last RESPONSE tokens)."""
    lens = [s.numel() for s in seqs]
    width, b = max(lens), len(seqs)
    ids = torch.zeros(b, width, dtype=torch.int64)
    attn = torch.zeros(b, width, dtype=torch.int64)
    pos = torch.zeros(b, 4, width, dtype=torch.int64)
    keys = torch.zeros(b, width, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lens):
        ids[i, width - n:] = seqs[i]
        attn[i, width - n:] = 1
        pos[i, :, width - n:] = position_ids[:, 0, start:start + n]
        keys[i, width - n:] = key_mask[start:start + n]
        start += n
    return ids, attn, pos, keys


def engine_alpha(engine, seqs, pixels, grids, position_ids, key_mask):
    """α through verl's own engine step: FSDPEngineWithLMHead.forward_step → prepare_model_inputs →
    the model → prepare_model_outputs (patched by the plugin to emit ``kawhi_alpha``), on a
    micro-batch made by verl's left_right_2_no_padding, key mask nested as the v1 TransferQueue holds it."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, response_from_nested

    from kawhi_kernels.integrations.verl_engine import heads_flag

    ids, attn, pos, keys = padded_batch(seqs, position_ids, key_mask)
    lens = [s.numel() for s in seqs]
    b, width = ids.shape
    data = TensorDict({"input_ids": ids, "attention_mask": attn, "position_ids": pos,
                       "response_mask": torch.ones(b, RESPONSE, dtype=torch.int64)}, batch_size=[b])
    data = left_right_2_no_padding(data)
    data["kawhi_key_mask"] = torch.nested.as_nested_tensor([keys[i, width - n:] for i, n in enumerate(lens)],
                                                           layout=torch.jagged)
    data["response_mask"] = torch.nested.as_nested_tensor([torch.ones(RESPONSE, dtype=torch.int64)] * b,
                                                          layout=torch.jagged)
    tu.assign_non_tensor(data, multi_modal_inputs=tu.NonTensorStack(*[
        tu.NonTensorData({"pixel_values": px, "image_grid_thw": g}) for px, g in zip(pixels, grids)]))
    tu.assign_non_tensor(data, temperature=1.0, use_remove_padding=True, calculate_entropy=True,
                         kawhi_alpha=True, kawhi_heads=heads_flag(HEADS), kawhi_layer=-1)
    _, out = engine.forward_step(data, loss_function=None, forward_only=True)
    model_output = out["model_output"]
    alpha = model_output["kawhi_alpha"]
    return dict(engine_outputs=sorted(model_output.keys()), engine_alpha_nested=bool(alpha.is_nested),
                engine_alpha_values=alpha.values().tolist(),
                engine_alpha_response=[r.tolist() for r in response_from_nested(alpha, data["response_mask"]).unbind()],
                engine_offsets=alpha.offsets().tolist())


# ---------------------------------------------------------------- the legacy trainer's whole chain


class CharTokenizer:
    """ids → characters; ids ≡ 1 (mod 5) decode to a paragraph break."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join("\n\n" if int(i) % 5 == 1 else chr(ord("a") + int(i) % 26) for i in ids)


def legacy_chain(model, tm, seqs, pixels, grids, position_ids, images):
    """verl's legacy path for real: AgentLoopWorker._postprocess (patched: kawhi_key_mask from the raw
    images) → RayPPOTrainer._compute_old_log_prob (patched: α flags in meta_info, kawhi_token_weights)
    whose worker group runs the engine's forward_step + verl's postprocess_batch_func."""
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopWorker, _InternalAgentLoopOutput
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils import tensordict_utils as tu

    config = OmegaConf.create({"algorithm": {"adv_estimator": "grpo_kawhi", "kawhi": {"heads": HEADS, "seed": 0, "tau": TAU}},
                               "actor_rollout_ref": {"actor": {"calculate_sum_pi_squared": False}}})
    prompt_w, resp_w = max(s.numel() for s in seqs) - RESPONSE + 2, RESPONSE + 2
    outputs = []
    start = 0
    for ids, px, grid, image in zip(seqs, pixels, grids, images):
        n = ids.numel()
        p = n - RESPONSE
        prompt = torch.zeros(1, prompt_w, dtype=torch.int64)
        prompt[0, prompt_w - p:] = ids[:p]
        resp = torch.zeros(1, resp_w, dtype=torch.int64)
        resp[0, :RESPONSE] = ids[p:]
        attn = torch.zeros(1, prompt_w + resp_w, dtype=torch.int64)
        attn[0, prompt_w - p:prompt_w + RESPONSE] = 1
        pos = torch.zeros(1, 4, prompt_w + resp_w, dtype=torch.int64)
        pos[0, :, prompt_w - p:prompt_w + RESPONSE] = position_ids[:, 0, start:start + n]
        rmask = torch.zeros(1, resp_w, dtype=torch.int64)
        rmask[0, :RESPONSE] = 1
        outputs.append(_InternalAgentLoopOutput(
            prompt_ids=prompt, response_ids=resp, input_ids=torch.cat([prompt, resp], 1), position_ids=pos,
            response_mask=rmask, attention_mask=attn, multi_modal_inputs={"pixel_values": px, "image_grid_thw": grid},
            multi_modal_data={"images": [image]}, reward_score=1.0, num_turns=2, metrics=AgentLoopMetrics(),
            extra_fields={}))
        start += n
    loop_worker = object.__new__(AgentLoopWorker)
    loop_worker.config = config
    loop_worker.model_config = SimpleNamespace(hf_config=model.config)
    loop_worker.reward_loop_worker_handles = None
    batch = loop_worker._postprocess(outputs, input_non_tensor_batch={"uid": np.array(["u0", "u1"], dtype=object)})
    batch.meta_info["temperature"] = 1.0

    engine = make_engine(model, 1)

    import torch.distributed as dist

    if not dist.is_initialized():                     # verl's engine all-reduces token counts over dp
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    engine.ulysses_device_mesh = None
    import verl.utils.seqlen_balancing as balancing

    balancing.get_device_name = lambda: "cpu"         # CUDA-only without an accelerator, as in make_engine

    class EngineWorkerGroup:                          # the actor worker's compute_log_prob, in-process
        def compute_log_prob(self, data):
            # TrainingWorker.infer_batch's defaults, with dynamic batch size and a token budget that
            # splits the two sequences into two micro-batches (verl's rearrange_micro_batches)
            tu.assign_non_tensor(data, use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=20,
                                 use_fused_kernels=False)
            forwards = []
            hook = engine.module.register_forward_hook(lambda *_: forwards.append(1))
            try:
                output = engine.infer_batch(data, loss_function=None)   # forward_backward_batch → forward_step × 2
            finally:
                hook.remove()
            self.forwards = len(forwards)
            td = tu.get_tensordict(output["model_output"], non_tensor_dict={"metrics": {"mfu": 0.0}})
            self.flags = {k: tu.get(data, k) for k in ("kawhi_alpha", "kawhi_heads", "kawhi_layer")}
            return td

    trainer = object.__new__(RayPPOTrainer)
    trainer.config = config
    trainer.tokenizer = CharTokenizer()
    trainer.actor_rollout_wg = EngineWorkerGroup()
    old_log_prob, _ = trainer._compute_old_log_prob(batch)
    return dict(legacy_key_mask=batch.batch["kawhi_key_mask"].tolist(),
                legacy_input_ids=batch.batch["input_ids"].tolist(),
                legacy_attention_mask=batch.batch["attention_mask"].tolist(),
                legacy_weights=old_log_prob.batch["kawhi_token_weights"].tolist(),
                legacy_old_keys=sorted(old_log_prob.batch.keys()),
                legacy_flags=trainer.actor_rollout_wg.flags,
                legacy_model_forwards=trainer.actor_rollout_wg.forwards,
                legacy_group_restored="compute_log_prob" not in vars(trainer.actor_rollout_wg),
                legacy_meta_after=sorted(batch.meta_info.keys()),
                legacy_responses=batch.batch["responses"].tolist(),
                legacy_response_mask=batch.batch["response_mask"].tolist())


# -------------------------------------------------------------------------------------------- main


def main(out_path, sp, family, attn, mode):
    torch.manual_seed(0)
    result = {}
    model, tm, seqs, pixels, grids = build(family)
    images = raw_images()
    if mode == "legacy":
        sguf = sguf_masks(model, tm, seqs, grids, images)
        key_mask = torch.cat(sguf)
        query_mask = torch.cat([torch.arange(s.numel()) >= s.numel() - RESPONSE for s in seqs])
    else:
        key_mask, query_mask = masks(tm, seqs)
    ref, position_ids = reference(model, tm, seqs, pixels, grids, key_mask, query_mask)

    from verl.models.transformers.monkey_patch import apply_monkey_patch

    from kawhi_kernels.integrations.verl import capture_kawhi_alpha

    install_flash_stand_ins(family, attn)
    if attn == "flash":
        model.config.text_config._attn_implementation = "flash_attention_2"
    apply_monkey_patch(model, ulysses_sp_size=sp, use_remove_padding=True)
    group = None
    if sp > 1:
        import torch.distributed as dist
        from verl.utils.ulysses import set_ulysses_sequence_parallel_group

        group = dist.new_group(list(range(sp)), backend="gloo")
        set_ulysses_sequence_parallel_group(group)
    elif family == "qwen2_5_vl":
        # transformers' attention interface no longer runs under verl's patch: capture_qk stays silent
        cu = torch.tensor([0] + torch.cumsum(torch.tensor([s.numel() for s in seqs]), 0).tolist(), dtype=torch.int32)
        with torch.no_grad(), capture_kawhi_alpha(model, cu_seqlens=cu, key_mask=key_mask, query_mask=query_mask,
                                                  heads=HEADS) as tap:
            model(input_ids=torch.cat(seqs)[None], attention_mask=None, position_ids=position_ids,
                  pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids), use_cache=False)
        result["hf_capture_alpha_is_none"] = tap.alpha is None
    result.update(ref_abs_max=float(ref.abs().max()), total=int(ref.numel()))
    if mode == "legacy":
        result.update(legacy_chain(model, tm, seqs, pixels, grids, position_ids, images))
        result["ref_response"] = [r[-RESPONSE:].tolist() for r in torch.split(ref, [s.numel() for s in seqs])]
        from kawhi_kernels.integrations.rl import response_texts_and_offsets
        from kawhi_kernels.integrations.verl import kawhi_token_weights_from_alpha

        mask = torch.tensor(result["legacy_response_mask"]).bool()
        alpha = torch.zeros(mask.shape)
        alpha[:, :RESPONSE] = torch.tensor(result["ref_response"])
        texts, offsets = response_texts_and_offsets(CharTokenizer(), torch.tensor(result["legacy_responses"]), mask)
        result["expected_weights"] = kawhi_token_weights_from_alpha(alpha, mask, texts, offsets, tau=TAU).tolist()
        result["sguf_key_mask"] = [m.tolist() for m in sguf]
    else:
        if sp == 1 or family == "qwen2_5_vl" or attn == "flash":
            alpha, seen = direct_tap_alpha(family, attn, model, seqs, pixels, grids, position_ids, key_mask,
                                           query_mask, group, sp)
            result.update(max_abs_err=float((alpha - ref).abs().max()), tap_seen=seen,
                          num_heads=int(model.config.text_config.num_attention_heads),
                          off_query_zero=bool((alpha[~query_mask] == 0).all()))
        engine = make_engine(model, sp)
        try:
            result.update(engine_alpha(engine, seqs, pixels, grids, position_ids, key_mask))
        except NotImplementedError as err:
            result["not_implemented"] = str(err)
        if "engine_offsets" in result:
            from kawhi_kernels.integrations.verl import to_verl_token_layout

            cu = torch.tensor(result["engine_offsets"])
            result["ref_verl_layout"] = to_verl_token_layout(ref, cu).tolist()
            result["ref_response"] = [ref[int(e) - RESPONSE:int(e)].tolist() for e in cu[1:]]
            values = torch.tensor(result["engine_alpha_values"])
            result["engine_max_abs_err"] = float((values - torch.tensor(result["ref_verl_layout"])).abs().max())
        if sp > 1 and family != "qwen2_5_vl":
            # transformers' sdpa / eager attention under Ulysses: verl's all-to-all never runs there
            for impl in ("sdpa", "eager"):
                model.config.text_config._attn_implementation = impl
                try:
                    engine_alpha(engine, seqs, pixels, grids, position_ids, key_mask)
                except NotImplementedError as err:
                    result[f"not_implemented_{impl}"] = str(err)
    if sp == 1 or torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def _spawned(rank, out_path, sp, family, attn, mode, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=sp)
    try:
        main(out_path, sp, family, attn, mode)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    path, sp = sys.argv[1], int(sys.argv[2])
    family, attn, mode = (sys.argv[3:6] + ["qwen2_5_vl", "sdpa", "engine"][len(sys.argv[3:6]):])[:3]
    if sp == 1:
        main(path, 1, family, attn, mode)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(path, sp, family, attn, mode, port), nprocs=sp, join=True)
