"""Run by tests/test_verl_real.py in fresh processes (verl's monkey patch is class-global, so it must
not leak into the pytest process): KAWHI's α inside verl's patched Qwen2.5-VL forward, sp = 1 and
Ulysses sp = 2 over gloo, against the reference from the unpatched model.

    python tests/verl_qwen_vl_worker.py OUT.json SP
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

HEADS = [1, 2]


def sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                softmax_scale=None, causal=True, **_):
    """Stand-in for flash_attn_varlen_func (flash-attn needs CUDA): q/k/v [total, H, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None].float(), k[lo:hi].transpose(0, 1)[None].float(),
                                               v[lo:hi].transpose(0, 1)[None].float(), is_causal=causal, scale=softmax_scale)
            out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)
    return out


def install_flash_stand_in():
    import verl.models.transformers.qwen2_vl as vq

    vq.flash_attn_varlen_func = sdpa_varlen
    vq._flash_supports_window_size = False
    vq._flash_supports_deterministic = False
    vq._flash_use_top_left_mask = False


def build():
    from kawhi_kernels.integrations import tiny_models as tm
    from kawhi_kernels.integrations import tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(seed=0, dtype=torch.bfloat16)   # verl runs the actor forward in bf16
    inputs = tm.tiny_vl_inputs(model, images_per_sample=(1, 1), text_lens=(5, 8), image_grid=(4, 6), seed=3)  # 33 tokens: sp=2 pads one
    mask = inputs["attention_mask"].bool()
    seqs = [inputs["input_ids"][b][mask[b]] for b in range(mask.shape[0])]
    per_image = inputs["image_grid_thw"].prod(-1).tolist()
    pixels = list(torch.split(inputs["pixel_values"], per_image))
    grids = [inputs["image_grid_thw"][b:b + 1] for b in range(len(seqs))]
    return model, tm, seqs, pixels, grids


def masks(tm, seqs):
    key, query = [], []
    for ids in seqs:
        n = ids.numel()
        key.append((ids == tm.IMAGE_TOKEN_ID) & (torch.arange(n) % 2 == 0))     # a "selection" of image keys
        q = torch.zeros(n, dtype=torch.bool)
        q[n - 4:] = True                                                          # the "response": last 4 tokens
        query.append(q)
    return torch.cat(key), torch.cat(query)


def reference(model, tm, seqs, pixels, grids):
    """α per sequence from the unpatched model (HF attention, one unpadded sequence per forward)."""
    from kawhi_kernels.integrations import capture_qk
    from kawhi_kernels.integrations.verl import kawhi_alpha_packed

    out, positions = [], []
    key_mask, query_mask = masks(tm, seqs)
    start = 0
    for ids, px, grid in zip(seqs, pixels, grids):
        n = ids.numel()
        mm = (ids == tm.IMAGE_TOKEN_ID).int()[None]
        with torch.no_grad(), capture_qk(model, [-1]) as cap:
            model(input_ids=ids[None], pixel_values=px, image_grid_thw=grid, mm_token_type_ids=mm)
        rec = cap.records[1]
        out.append(kawhi_alpha_packed(rec.q, rec.k, torch.tensor([0, n], dtype=torch.int32),
                                      key_mask[start:start + n], query_mask[start:start + n], heads=HEADS))
        rope, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=mm, image_grid_thw=grid)
        positions.append(torch.cat([torch.arange(n)[None, None], rope], dim=0))  # (4, 1, n): text + 3-D M-RoPE
        start += n
    return torch.cat(out), torch.cat(positions, dim=-1), key_mask, query_mask


def patched_alpha(model, seqs, pixels, grids, position_ids, key_mask, query_mask, sp_group=None, sp=1):
    from verl.utils.ulysses import ulysses_pad

    from kawhi_kernels.integrations.verl_actor import VerlQwen2VLAlphaTap

    ids = torch.cat(seqs)[None]                                            # [1, total], verl's remove padding
    ids, pos, _ = ulysses_pad(ids, position_ids_rmpad=position_ids, sp_size=sp)
    with torch.no_grad(), VerlQwen2VLAlphaTap(model, key_mask=key_mask, query_mask=query_mask, heads=HEADS,
                                              sp_group=sp_group) as tap:
        model(input_ids=ids, attention_mask=None, position_ids=pos, pixel_values=torch.cat(pixels),
              image_grid_thw=torch.cat(grids), use_cache=False)
    return tap.alpha


def engine_alpha(model, tm, seqs, pixels, grids, position_ids, key_mask, sp):
    """α through verl's own engine step: FSDPEngineWithLMHead.forward_step → prepare_model_inputs →
    the model → prepare_model_outputs (patched by the plugin to emit ``kawhi_alpha``), on a micro-batch
    made by verl's left_right_2_no_padding. The engine object is not initialised (no FSDP wrap on
    CPU: see the recipe); only the attributes its forward path reads are set, and ``get_device_id``
    and ``get_device_name`` (CUDA-only in verl.utils.device on a machine without an accelerator) are pointed
    at the CPU."""
    from types import SimpleNamespace

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp import transformer_impl as ti
    from verl.workers.utils.padding import left_right_2_no_padding, response_from_nested

    from kawhi_kernels.integrations.verl_engine import heads_flag

    assert getattr(ti.FSDPEngineWithLMHead.forward_step, "_kawhi_wrapped", False), "plugin did not patch the engine"
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

    # left-padded [B, L] batch as the rollout hands it over; the response is each row's last 4 tokens
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
    data = TensorDict({"input_ids": ids, "attention_mask": attn, "position_ids": pos,
                       "response_mask": torch.ones(b, 4, dtype=torch.int64)}, batch_size=[b])
    data = left_right_2_no_padding(data)
    data["kawhi_key_mask"] = torch.nested.as_nested_tensor([keys[i, width - n:] for i, n in enumerate(lens)],
                                                           layout=torch.jagged)
    data["response_mask"] = torch.nested.as_nested_tensor([torch.ones(4, dtype=torch.int64)] * b, layout=torch.jagged)
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


def main(out_path, sp):
    torch.manual_seed(0)
    result = {}
    model, tm, seqs, pixels, grids = build()
    ref, position_ids, key_mask, query_mask = reference(model, tm, seqs, pixels, grids)

    from verl.models.transformers.monkey_patch import apply_monkey_patch

    from kawhi_kernels.integrations.verl import capture_kawhi_alpha

    install_flash_stand_in()
    apply_monkey_patch(model, ulysses_sp_size=sp, use_remove_padding=True)
    group = None
    if sp > 1:
        import torch.distributed as dist
        from verl.utils.ulysses import set_ulysses_sequence_parallel_group

        group = dist.new_group(list(range(sp)), backend="gloo")
        set_ulysses_sequence_parallel_group(group)
    else:
        # transformers' attention interface no longer runs under verl's patch: capture_qk stays silent
        cu = torch.tensor([0] + torch.cumsum(torch.tensor([s.numel() for s in seqs]), 0).tolist(), dtype=torch.int32)
        with torch.no_grad(), capture_kawhi_alpha(model, cu_seqlens=cu, key_mask=key_mask, query_mask=query_mask,
                                                  heads=HEADS) as tap:
            model(input_ids=torch.cat(seqs)[None], attention_mask=None, position_ids=position_ids,
                  pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids), use_cache=False)
        result["hf_capture_alpha_is_none"] = tap.alpha is None
    alpha = patched_alpha(model, seqs, pixels, grids, position_ids, key_mask, query_mask, group, sp)
    result.update(max_abs_err=float((alpha - ref).abs().max()), ref_abs_max=float(ref.abs().max()),
                  off_query_zero=bool((alpha[~query_mask] == 0).all()), total=int(ref.numel()))
    result.update(engine_alpha(model, tm, seqs, pixels, grids, position_ids, key_mask, sp))
    from kawhi_kernels.integrations.verl import to_verl_token_layout

    cu = torch.tensor(result["engine_offsets"])
    result["ref_verl_layout"] = to_verl_token_layout(ref, cu).tolist()
    result["ref_response"] = [ref[int(e) - 4:int(e)].tolist() for e in cu[1:]]
    if sp == 1 or torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def _spawned(rank, out_path, sp, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=sp)
    try:
        main(out_path, sp)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    path, sp = sys.argv[1], int(sys.argv[2])
    if sp == 1:
        main(path, 1)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(path, sp, port), nprocs=sp, join=True)
