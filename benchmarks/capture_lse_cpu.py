"""CPU timing of the head profile with and without the model's own softmax normaliser.

``profile_heads(model, batches)`` takes, by default, the lse the layer's attention computed
(``capture_qk(capture_lse=True)``: SDPA's CPU flash kernel here), so ``attention_mass`` skips its
normaliser pass; ``use_model_lse=False`` makes it compute its own. Both run the same forwards.
Measured, interleaved round by round (median over rounds):

* ``profile``: the whole ``profile_heads`` call (forwards + capture + attention_mass);
* ``mass``: ``attention_mass`` alone on the captured records of one batch (every layer), with the
  captured lse vs computing its own (the part the lse is meant to shorten).

Model: a random tiny Qwen2.5-VL built from a config (no download), wider and longer than the
test one so that attention is not lost in Python overhead. Numbers are for this CPU only; the
GPU targets are in DESIGN §7.

    python benchmarks/capture_lse_cpu.py [--rounds 7] [--batch 4] [--grid 16] [--text 160] [--backend torch]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _setup(args):
    from kawhi_kernels.integrations import tiny_qwen2_5_vl, tiny_vl_inputs

    model = tiny_qwen2_5_vl(text_config=dict(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                             num_key_value_heads=2, num_hidden_layers=args.layers,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [4, 6, 6]}))   # head_dim 32
    batches = [tiny_vl_inputs(model, [1] * args.batch, [args.text + 7 * b for b in range(args.batch)],
                              image_grid=(args.grid, args.grid), padding_side="left", seed=s)
               for s in range(args.batches)]
    return model, batches


def _records(model, batch):
    from kawhi_kernels.heads.profile import text_after_image_mask
    from kawhi_kernels.integrations import capture_qk

    qmask = text_after_image_mask(batch["input_ids"], batch["attention_mask"], model.config.image_token_id)
    with torch.no_grad(), capture_qk(model, "all", query_mask=qmask, capture_lse="require") as cap:
        model(**batch, use_cache=False, logits_to_keep=1)
    return cap.records


def _mass_calls(records, input_ids, image_token_id, backend):
    from kawhi_kernels.ops.plan import AttentionMassPlan

    rec = next(iter(records.values()))
    ids = input_ids[rec.k_batch, rec.k_pos]
    is_image = ids == image_token_id
    cu_k = rec.cu_seqlens_k.long()
    seq = torch.repeat_interleave(torch.arange(rec.num_sequences), cu_k.diff())
    images = torch.bincount(seq[is_image], minlength=rec.num_sequences)
    running = torch.cumsum(is_image.long(), 0) - 1
    region = torch.where(is_image, running - (torch.cumsum(images, 0) - images)[seq], -1).to(torch.int32)
    segment = torch.repeat_interleave(torch.arange(rec.num_sequences), rec.cu_seqlens_q.long().diff())
    plan = AttentionMassPlan(rec.cu_seqlens_q, rec.cu_seqlens_k, region, int(images.max()),
                             num_heads=rec.q.shape[1], num_kv_heads=rec.k.shape[1], head_dim=rec.q.shape[2],
                             dtype=rec.q.dtype, query_segment=segment.to(torch.int32),
                             num_segments=rec.num_sequences, causal=True, softmax_scale=rec.softmax_scale,
                             backend=backend)

    def with_lse():
        return [plan.run(r.q, r.k, r.lse) for r in records.values()]

    def own():
        return [plan.run(r.q, r.k) for r in records.values()]

    return with_lse, own


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--grid", type=int, default=16, help="image patch grid h = w (tokens = grid²/4)")
    parser.add_argument("--text", type=int, default=160, help="response tokens of the first sequence")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kawhi_kernels.heads.profile import profile_heads

    model, batches = _setup(args)
    records = _records(model, batches[0])
    mass_lse, mass_own = _mass_calls(records, batches[0]["input_ids"], model.config.image_token_id, args.backend)
    for a, b in zip(mass_lse(), mass_own()):                          # same answer before timing
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    runs = {
        "profile, model lse": lambda: profile_heads(model, batches, backend=args.backend),
        "profile, own normaliser": lambda: profile_heads(model, batches, backend=args.backend, use_model_lse=False),
        "mass, model lse": mass_lse,
        "mass, own normaliser": mass_own,
    }
    got = profile_heads(model, batches, backend=args.backend)
    assert set(got.meta["lse_sources"]) == {"sdpa_flash_cpu"}, got.meta["lse_sources"]
    for fn in runs.values():                                           # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(_time(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    rec = next(iter(records.values()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}; "
          f"{args.batches} batches × {args.batch} sequences, {args.layers} layers, Hq {rec.q.shape[1]} / "
          f"Hk {rec.k.shape[1]} / D {rec.q.shape[2]}, {rec.q.shape[0]} query rows and {rec.k.shape[0]} keys "
          f"per batch, {args.grid * args.grid // 4} image tokens per sequence; median of {args.rounds} rounds")
    print("| measurement | median (ms) | min (ms) |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * med[name]:.2f} | {1e3 * min(t):.2f} |")
    for what in ("profile", "mass"):
        a, b = times[f"{what}, model lse"], times[f"{what}, own normaliser"]
        print(f"{what} ratio (model lse / own normaliser): median {statistics.median(a) / statistics.median(b):.3f}, "
              f"min {min(a) / min(b):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
