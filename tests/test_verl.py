"""verl integration without verl: the grpo_kawhi estimator on a synthetic DataProto-like batch, its
registration / compute_advantage routing against stand-in verl modules, and the actor-side α."""
import types

import numpy as np
import pytest
import torch

from kawhi_kernels import KAWHI, cosine_alignment
from kawhi_kernels.integrations import capture_qk, tiny_qwen2_5_vl
from kawhi_kernels.integrations import tiny_models as tm
from kawhi_kernels.integrations import verl as kv


def _batch():
    """7 responses: groups 'a' (3), 'b' (3) and a singleton 'c'; R = 5 response columns."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.int64)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 2.0])
    rewards = torch.zeros(7, 5)
    last = mask.sum(1) - 1
    rewards[torch.arange(7), last] = scores                      # outcome reward on the last token
    weights = 0.1 + 0.9 * torch.rand(7, 5, generator=g)
    index = np.array(["a", "b", "a", "b", "a", "b", "c"], dtype=object)
    return rewards, mask, index, weights, scores


def _verl_grpo_reference(scores, index, eps=1e-6, norm=True):
    """verl's grpo outcome advantage, written as its loops do: unbiased std, singleton → (0, 1)."""
    out = torch.zeros_like(scores)
    for i, uid in enumerate(index):
        members = torch.stack([scores[j] for j in range(len(index)) if index[j] == uid])
        mean, std = (torch.tensor(0.0), torch.tensor(1.0)) if members.numel() == 1 else (members.mean(), members.std())
        out[i] = (scores[i] - mean) / (std + eps) if norm else scores[i] - mean
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_kawhi_estimator_matches_verl_grpo_times_weights(norm):
    rewards, mask, index, weights, scores = _batch()
    adv, ret = kv.compute_grpo_kawhi_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm,
                                               kawhi_token_weights=weights)
    expected = _verl_grpo_reference(scores, index, norm=norm)[:, None] * mask * weights
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-5)
    assert adv is ret
    assert bool((adv[mask == 0] == 0).all())
    # the config's norm_adv_by_std_in_grpo is honoured when the argument is not given
    adv_cfg, _ = kv.compute_grpo_kawhi_advantage(rewards, mask, index, config={"norm_adv_by_std_in_grpo": norm},
                                                 kawhi_token_weights=weights)
    torch.testing.assert_close(adv_cfg, expected, atol=1e-6, rtol=1e-5)


def test_grpo_kawhi_estimator_errors():
    rewards, mask, index, weights, _ = _batch()
    with pytest.raises(ValueError, match="patch_verl_compute_advantage"):
        kv.compute_grpo_kawhi_advantage(rewards, mask, index)
    with pytest.raises(ValueError, match="kawhi_token_weights: expected shape"):
        kv.compute_grpo_kawhi_advantage(rewards, mask, index, kawhi_token_weights=weights[:, :3])
    with pytest.raises(ValueError, match="index"):
        kv.compute_grpo_kawhi_advantage(rewards, mask, index[:3], kawhi_token_weights=weights)


def _data_proto():
    rewards, mask, index, weights, scores = _batch()
    batch = {"token_level_rewards": rewards, "response_mask": mask, kv.WEIGHTS_KEY: weights}
    return types.SimpleNamespace(batch=batch, non_tensor_batch={"uid": index}), scores


def test_compute_kawhi_advantage_on_data_proto_like_batch():
    data, scores = _data_proto()
    out = kv.compute_kawhi_advantage(data)
    expected = _verl_grpo_reference(scores, data.non_tensor_batch["uid"])[:, None] * data.batch["response_mask"] \
        * data.batch[kv.WEIGHTS_KEY]
    torch.testing.assert_close(out.batch["advantages"], expected, atol=1e-6, rtol=1e-5)
    del data.batch[kv.WEIGHTS_KEY]
    with pytest.raises(KeyError, match="kawhi_token_weights"):
        kv.compute_kawhi_advantage(data)


def _fake_core_algos():
    """A stand-in for verl.trainer.ppo.core_algos with verl's register_adv_est semantics."""
    module = types.ModuleType("fake_core_algos")
    module.ADV_ESTIMATOR_REGISTRY = {}

    def register_adv_est(name):
        def decorator(fn):
            if name in module.ADV_ESTIMATOR_REGISTRY and module.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            module.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn
        return decorator

    module.register_adv_est = register_adv_est
    return module


def test_registration_with_verl_decorator_api():
    core = _fake_core_algos()
    kv.register_verl_estimator(core)
    kv.register_verl_estimator(core)                               # idempotent
    assert core.ADV_ESTIMATOR_REGISTRY["grpo_kawhi"] is kv.compute_grpo_kawhi_advantage
    try:
        import verl.trainer.ppo.core_algos as real
    except ImportError:
        with pytest.raises(ImportError, match="verl is not installed"):
            kv.register_verl_estimator()
    else:  # verl installed: importing the module registered the estimator
        assert real.get_adv_estimator_fn("grpo_kawhi") is kv.compute_grpo_kawhi_advantage


def test_patch_compute_advantage_routes_only_grpo_kawhi():
    calls = []
    trainer_module = types.ModuleType("fake_ray_trainer")

    def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True,
                          config=None):
        calls.append(adv_estimator)
        return data

    trainer_module.compute_advantage = compute_advantage
    kv.patch_verl_compute_advantage([trainer_module])
    kv.patch_verl_compute_advantage([trainer_module])              # idempotent
    data, scores = _data_proto()
    trainer_module.compute_advantage(data, "grpo", norm_adv_by_std_in_grpo=True)
    assert calls == ["grpo"] and "advantages" not in data.batch
    out = trainer_module.compute_advantage(data, types.SimpleNamespace(value="grpo_kawhi"),
                                           norm_adv_by_std_in_grpo=False, config=None)
    assert calls == ["grpo"]
    expected = _verl_grpo_reference(scores, data.non_tensor_batch["uid"], norm=False)[:, None] \
        * data.batch["response_mask"] * data.batch[kv.WEIGHTS_KEY]
    torch.testing.assert_close(out.batch["advantages"], expected, atol=1e-6, rtol=1e-5)


def test_kawhi_from_config_reads_algorithm_kawhi_keys():
    kawhi, layer = kv.kawhi_from_config({"kawhi": {"tau": 0.2, "lam": 0.3, "heads": [0, 2], "layer": -2}})
    assert kawhi.weight_params["tau"] == 0.2 and kawhi.weight_params["lam"] == 0.3
    assert kawhi.heads == [0, 2] and layer == -2
    kawhi, layer = kv.kawhi_from_config({})
    assert kawhi.weight_params["tau"] == 0.05 and kawhi.heads is None and layer == -1


def _packed_qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 7, 12, 20], dtype=torch.int32)
    q = torch.randn(20, 4, 8, generator=g)
    k = torch.randn(20, 2, 8, generator=g)
    key_mask = torch.zeros(20, dtype=torch.bool)
    key_mask[[1, 2, 4, 8, 9, 13]] = True                            # sequence 3 has one selected key
    query_mask = torch.zeros(20, dtype=torch.bool)
    query_mask[[5, 6, 10, 11, 17, 18, 19]] = True
    return q, k, cu, key_mask, query_mask


def test_kawhi_alpha_packed_matches_per_sequence_einsum():
    q, k, cu, key_mask, query_mask = _packed_qk()
    heads = [0, 1, 3]
    alpha = kv.kawhi_alpha_packed(q, k, cu, key_mask, query_mask, heads=heads)
    expected = torch.zeros(20, dtype=torch.float64)
    bounds = cu.tolist()
    for s in range(3):
        lo, hi = bounds[s], bounds[s + 1]
        keys = k[lo:hi][key_mask[lo:hi]].double().repeat_interleave(2, dim=1)[:, heads]
        for t in range(lo, hi):
            if query_mask[t]:
                qt = q[t, heads].double()
                cos = torch.einsum("hd,vhd->hv", qt / qt.norm(dim=-1, keepdim=True), keys / keys.norm(dim=-1, keepdim=True))
                expected[t] = cos.mean()
    torch.testing.assert_close(alpha.double(), expected, atol=1e-6, rtol=1e-5)
    assert bool((alpha[~query_mask] == 0).all())


def test_capture_kawhi_alpha_in_packed_remove_padding_forward():
    model = tiny_qwen2_5_vl(seed=0)
    inputs = tm.tiny_vl_inputs(model, images_per_sample=(1, 1), text_lens=(5, 7), image_grid=(4, 6), seed=3)
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(1)
    cu = torch.zeros(3, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ids_rmpad = inputs["input_ids"][mask][None]                       # [1, total], as verl's remove padding
    total = ids_rmpad.shape[1]
    key_mask = ids_rmpad[0] == tm.IMAGE_TOKEN_ID
    key_mask &= torch.arange(total) % 2 == 0                         # a "selection" of image keys
    query_mask = torch.zeros(total, dtype=torch.bool)
    query_mask[int(cu[1]) - 4:int(cu[1])] = True                     # last 4 tokens of each sequence
    query_mask[total - 5:] = True
    fwd = dict(input_ids=ids_rmpad, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
               mm_token_type_ids=(ids_rmpad == tm.IMAGE_TOKEN_ID).int())
    with torch.no_grad(), kv.capture_kawhi_alpha(model, cu_seqlens=cu, key_mask=key_mask, query_mask=query_mask,
                                                 heads=[1, 2]) as tap:
        model(**fwd)
    with torch.no_grad(), capture_qk(model, [-1], cu_seqlens=cu) as cap:
        model(**fwd)
    record = cap.records[1]
    assert record.num_sequences == 2
    expected = cosine_alignment(record.q[query_mask], record.k, torch.tensor([0, 4, 9], dtype=torch.int32),
                                record.cu_seqlens_k, torch.where(key_mask, 0, -1).int(), heads=[1, 2])[:, 0]
    torch.testing.assert_close(tap.alpha[query_mask], expected, atol=1e-6, rtol=1e-5)
    nested = tap.nested()
    assert [t.shape[0] for t in nested.unbind()] == lengths.tolist()


def test_driver_side_weights_match_pipeline():
    g = torch.Generator().manual_seed(1)
    texts = ["a b\n\nc d", "x\n\ny z\n\nw"]
    offsets = [[(0, 1), (2, 3), (5, 6), (7, 8)], [(0, 1), (3, 4), (5, 6), (8, 9)]]
    response_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    offsets[1].append(None)                                         # EOS without offsets joins the last paragraph
    q = torch.randn(9, 4, 8, generator=g)
    k = torch.randn(12, 2, 8, generator=g)
    key_region = torch.tensor([0, 0, -1, 0, -1, -1, 0, 0, 0, -1, -1, -1], dtype=torch.int32)
    kawhi = KAWHI(tau=0.05, lam=0.1)
    out = kawhi.reweight(torch.tensor([1.0, -1.0]), q, k, torch.tensor([0, 4, 9], dtype=torch.int32),
                         torch.tensor([0, 6, 12], dtype=torch.int32), key_region, texts, offsets, response_mask)
    alpha = torch.zeros(2, 5)
    alpha[response_mask] = out.alpha
    weights = kv.kawhi_token_weights_from_alpha(alpha, response_mask, texts, offsets, tau=0.05, lam=0.1)
    torch.testing.assert_close(weights, out.token_weights)
    no_image = kv.kawhi_token_weights_from_alpha(alpha, response_mask, texts, offsets,
                                                 has_image=torch.tensor([True, False]))
    assert bool((no_image[1] == 1).all()) and torch.equal(no_image[0], weights[0])
    # response layout from a packed statistic: each response is the tail of its packed sequence
    values = torch.arange(12, dtype=torch.float32)
    resp = kv.packed_response_values(values, torch.tensor([0, 6, 12]), response_mask)
    assert resp.tolist() == [[2, 3, 4, 5, 0], [7, 8, 9, 10, 11]]


# ------------------------------------------------------------------- the shared patching idiom


def test_wrap_once_patch_attribute_and_temporarily():
    from kawhi_kernels.integrations._patching import is_wrapped, original_of, patch_attribute, temporarily, wrap_once

    calls = []

    def make(original):
        def wrapper(*args):
            calls.append(args)
            return original(*args) + 1
        return wrapper

    def f(x):
        """doc of f"""
        return 2 * x

    w = wrap_once(f, make)
    assert is_wrapped(w) and not is_wrapped(f) and original_of(w) is f and original_of(f) is f
    assert w.__name__ == "f" and w.__doc__ == "doc of f" and w(3) == 7
    assert wrap_once(w, make) is w                                   # never twice
    holder = types.SimpleNamespace(f=f)
    assert patch_attribute(holder, "f", make) is True
    assert patch_attribute(holder, "f", make) is False               # idempotent: the plugin loaded again
    assert holder.f(1) == 3 and len(calls) == 2

    class C:
        def m(self):
            return 1
    patch_attribute(C, "m", make)
    assert C().m() == 2 and is_wrapped(C.m)
    with pytest.raises(AttributeError, match="'missing'"):
        patch_attribute(C, "missing", make)
    with pytest.raises(TypeError, match="callable"):
        wrap_once(3, make)

    module = types.SimpleNamespace(g=lambda: "orig")
    with temporarily(module, "g", lambda original: lambda: "tapped " + original()):
        assert module.g() == "tapped orig"
    assert module.g() == "orig"
    with pytest.raises(RuntimeError):
        with temporarily(module, "g", lambda original: lambda: "tapped"):
            raise RuntimeError("boom")
    assert module.g() == "orig"                                      # restored on error too

    class Group:
        def call(self):
            return "class"
    group = Group()
    with temporarily(group, "call", lambda original: lambda: "tapped " + original()):
        assert group.call() == "tapped class"
    assert "call" not in vars(group) and group.call() == "class"     # no instance attribute left behind
    group.call = lambda: "instance"                                  # an instance attribute (verl's worker groups)
    with temporarily(group, "call", lambda original: lambda: "tapped " + original()):
        assert group.call() == "tapped instance"
    assert group.call() == "instance"


def test_actor_class_is_the_class_ray_ships():
    from kawhi_kernels.integrations._patching import actor_class

    class Plain:
        pass
    shipped = type("Shipped", (Plain,), {})
    remote = types.SimpleNamespace(__ray_metadata__=types.SimpleNamespace(modified_class=shipped))
    assert actor_class(Plain) is Plain and actor_class(remote) is shipped


# -------------------------------------------------------------- image regions (TRL and verl share)


def _blocky_image(seed, shape=(4, 6)):
    from PIL import Image

    g = np.random.default_rng(seed)
    base = g.integers(0, 255, size=(*shape, 3)).astype(np.uint8)
    return Image.fromarray(np.kron(base, np.ones((24, 24, 1), dtype=np.uint8)))


def test_regions_for_grids_matches_select_regions_on_the_resized_image():
    from kawhi_kernels.integrations.image_regions import as_uint8_rgb, regions_for_grids

    image = _blocky_image(0)
    grid = torch.tensor([[1, 8, 12]])                               # merge 2, patch 14: 112 × 168 px, 4 × 6 tokens
    regions = regions_for_grids(KAWHI(seed=3), [image], grid, merge_size=2, patch_size=14)
    pixels = as_uint8_rgb(image, (168, 112))
    assert pixels.shape == (112, 168, 3) and pixels.dtype == np.uint8
    expected = KAWHI(seed=3).select_regions([torch.from_numpy(pixels)], [(4, 6)])[0]
    assert torch.equal(regions[0].selected, expected.selected)
    assert regions[0].selected.numel() == 24 and regions[0].selected.any() and not regions[0].selected.all()
    with pytest.raises(ValueError, match="image_grid_thw"):
        regions_for_grids(KAWHI(), [image], torch.tensor([[2, 8, 12]]), merge_size=2, patch_size=14)
    with pytest.raises(ValueError, match="image_grid_thw"):
        regions_for_grids(KAWHI(), [image], [[1, 7, 12]], merge_size=2, patch_size=14)
    with pytest.raises(ValueError, match="images"):
        regions_for_grids(KAWHI(), [image, image], grid, merge_size=2, patch_size=14)
    with pytest.raises(TypeError, match="image"):
        regions_for_grids(KAWHI(), ["not an image"], grid, merge_size=2, patch_size=14)


def test_region_cache_shares_within_scope_only_and_evicts():
    from kawhi_kernels.integrations.image_regions import RegionCache, regions_for_grids

    cache = RegionCache(max_entries=2)
    kawhi = KAWHI(seed=0)
    image, grid = _blocky_image(1), torch.tensor([[1, 8, 12]])
    a = regions_for_grids(kawhi, [image], grid, merge_size=2, patch_size=14, cache=cache, scope="uid0")[0]
    b = regions_for_grids(kawhi, [image.copy()], grid, merge_size=2, patch_size=14, cache=cache, scope="uid0")[0]
    c = regions_for_grids(kawhi, [image], grid, merge_size=2, patch_size=14, cache=cache, scope="uid1")[0]
    assert a is b and c is not a                                    # G responses share; a new prompt draws again
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    regions_for_grids(kawhi, [_blocky_image(2)], grid, merge_size=2, patch_size=14, cache=cache, scope="uid0")
    assert len(cache) == 2                                          # least recently used entry evicted
    with pytest.raises(ValueError, match="max_entries"):
        RegionCache(0)


def test_key_mask_for_sequence_places_selection_on_image_tokens():
    from kawhi_kernels.integrations.image_regions import key_mask_for_sequence, regions_for_grids

    image, grid = _blocky_image(4), torch.tensor([[1, 8, 12]])
    regions = regions_for_grids(KAWHI(seed=1), [image], grid, merge_size=2, patch_size=14)
    ids = torch.tensor([1, 7, tm.VISION_START_TOKEN_ID] + [tm.IMAGE_TOKEN_ID] * 24 + [tm.VISION_END_TOKEN_ID, 9, 10])
    mask = key_mask_for_sequence(ids, tm.IMAGE_TOKEN_ID, regions)
    assert mask.shape == ids.shape and mask.dtype == torch.bool
    assert torch.equal(mask[3:27], regions[0].selected) and not mask[:3].any() and not mask[27:].any()
    assert torch.equal(key_mask_for_sequence(ids[None], tm.IMAGE_TOKEN_ID, regions)[0], mask)
    with pytest.raises(ValueError, match="image tokens"):
        key_mask_for_sequence(ids[:-6], tm.IMAGE_TOKEN_ID, regions + regions)
