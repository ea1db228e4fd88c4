"""KAWHI in a plain PyTorch GRPO / DAPO / GSPO loop (CPU, tiny random Qwen2.5-VL, ~10 s).

One rollout batch — the bundled chart, its question and G = 5 scored responses — is optimised for
a few policy iterations. KAWHI adds NO forward pass: the first policy forward of the batch (the
one that gives log π_old) runs under ``capture_qk`` on the final decoder layer, and its Q/K give
the spatial alignment α_t, the paragraph weights and the [B, T] advantages Â_{g,t} = A_g · w_j(t),
which every later iteration reuses. The three losses consume the same [B, T] advantages:

* ``grpo``: token ratio, symmetric clip 0.2, sequence-mean of token-means (paper Eq. 4);
* ``dapo``: token ratio, clip-higher (0.2 / 0.28), token-mean aggregation;
* ``gspo``: GSPO-token — sequence ratio s_g with per-token gradients, clip 3e-4 / 4e-4.

Run: ``python examples/plain_pytorch_grpo.py --loss dapo --iterations 3``. The model is random,
so the numbers only show the data flow.
"""
from __future__ import annotations

import argparse
import time

import torch

from kawhi_kernels import KAWHI
from kawhi_kernels.demo import build_batch, load_example
from kawhi_kernels.integrations import tiny_models
from kawhi_kernels.integrations.rl import KAWHIStep, grpo_token_loss, gspo_token_loss

LOSSES = {
    "grpo": lambda logp, old, adv, mask: grpo_token_loss(logp, old, adv, mask, eps_low=0.2,
                                                         agg="seq-mean-token-mean"),
    "dapo": lambda logp, old, adv, mask: grpo_token_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28,
                                                         agg="token-mean"),
    "gspo": lambda logp, old, adv, mask: gspo_token_loss(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4),
}


def response_logps(logits: torch.Tensor, input_ids: torch.Tensor, num_response_cols: int) -> torch.Tensor:
    """log π(y_t | ·) of the last ``num_response_cols`` tokens of each row: float32 [B, T]."""
    seq_len = input_ids.shape[1]
    start = seq_len - num_response_cols
    logprobs = torch.log_softmax(logits[:, start - 1:seq_len - 1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, start:, None]).squeeze(-1)


def run(loss: str = "grpo", iterations: int = 3, seed: int = 0, lr: float = 1e-3, verbose: bool = True) -> dict:
    """Optimise the policy on one KAWHI-reweighted rollout batch; return a summary dict."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {loss!r}")
    torch.manual_seed(seed)
    example = load_example()
    group = len(example.responses)
    model = tiny_models.tiny_qwen2_5_vl(seed=seed).train()
    inputs, _, response_mask, offsets, grid_hw = build_batch(example, model, torch.device("cpu"))
    input_ids = inputs["input_ids"]
    seq_len, width = input_ids.shape[1], response_mask.shape[1]

    # SGUF once per prompt image; the G responses share the selection.
    step = KAWHIStep(KAWHI(heads=None, seed=seed), image_token_id=model.config.image_token_id)
    key_mask = step.key_mask(input_ids, [example.image], [grid_hw], row_images=[[0]] * group)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history, kawhi_out, old_logp = [], None, None
    for iteration in range(iterations):
        if kawhi_out is None:
            # The first forward of the batch gives log π_old; capture final-layer Q/K in it.
            with step.capture(model, response_mask, seq_len) as capture:
                logits = model(**inputs).logits
            kawhi_out = step.advantages(capture, key_mask=key_mask, response_mask=response_mask,
                                        texts=example.responses, offsets=offsets,
                                        rewards=example.rewards, group_size=group)
        else:
            logits = model(**inputs).logits
        logp = response_logps(logits, input_ids, width)
        if old_logp is None:
            old_logp = logp.detach()
        value = LOSSES[loss](logp, old_logp, kawhi_out.advantages, response_mask)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        history.append(float(value))
        if verbose:
            print(f"iteration {iteration}: {loss} loss {float(value):+.5f}")

    weights = kawhi_out.token_weights
    summary = dict(loss=loss, losses=history, advantages=kawhi_out.advantages,
                   token_weights=weights, response_mask=response_mask)
    if verbose:
        cu = kawhi_out.cu_seqlens.tolist()
        print("\nresponse  reward  paragraph weights (token advantages = A_g x weight)")
        for b in range(group):
            para = kawhi_out.paragraph_ids[cu[b]:cu[b + 1]]
            ws = [float(weights[b, :cu[b + 1] - cu[b]][para == j][0]) for j in range(int(para.max()) + 1)]
            print(f"{b:>8}  {float(example.rewards[b]):>6.1f}  " + "  ".join(f"{w:.3f}" for w in ws))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=sorted(LOSSES), default="grpo")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run(args.loss, args.iterations, args.seed)
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
