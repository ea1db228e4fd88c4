"""``kawhi-kernels demo``: one KAWHI step on the bundled chart example.

A tiny random-initialised Qwen2.5-VL (built from a config, nothing downloaded) reads the chart
and the five sampled answers in one batched forward; the final layer's post-RoPE q/k are captured
in that same forward. SGUF picks key regions of the chart, α_t is the mean cosine of each response
token to the selected image keys, paragraph weights follow, and the GRPO advantages are
reweighted. The model is random, so α carries no meaning here: the demo shows the data flow,
shapes and the per-paragraph bookkeeping end to end.
"""
from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DATA = resources.files("kawhi_kernels") / "data"
EXAMPLE_FILE = "rainfall_example.json"

# Word pieces with offsets; ".\n\n" is one token (as in Qwen's tokenizer), newline runs are tokens.
_TOKEN_PATTERN = re.compile(r"[.:!?]\n\n|\n+|[^\S\n]*\w+|[^\S\n]*[^\w\s]|[^\S\n]+")


@dataclass
class Example:
    image: torch.Tensor            # uint8 [H, W, 3]
    patch_size: int
    question: str
    responses: list[str]
    rewards: torch.Tensor          # float32 [G]


def load_example() -> Example:
    """The bundled chart, question and G = 5 scored responses."""
    from PIL import Image

    spec = json.loads((DATA / EXAMPLE_FILE).read_text())
    with (DATA / spec["image"]).open("rb") as handle:
        image = np.array(Image.open(handle).convert("RGB"))
    return Example(
        image=torch.from_numpy(image),
        patch_size=int(spec["patch_size"]),
        question=spec["question"],
        responses=[r["text"] for r in spec["responses"]],
        rewards=torch.tensor([float(r["reward"]) for r in spec["responses"]]),
    )


def tokenize(text: str, first_id: int, last_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """A small deterministic word-piece tokenizer with character offsets (the demo has no network
    to fetch Qwen's tokenizer). Ids are hashed into [first_id, last_id)."""
    ids, offsets = [], []
    for match in _TOKEN_PATTERN.finditer(text):
        ids.append(first_id + zlib.crc32(match.group().encode()) % (last_id - first_id))
        offsets.append(match.span())
    return ids, offsets


def build_batch(example: Example, model, device: torch.device):
    """Right-padded batch of G sequences [vision_start, image_pad × N, vision_end, question,
    response, EOS], plus the image inputs and the masks KAWHI needs."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .integrations import tiny_models as tm

    h, w = example.image.shape[:2]
    processor = Qwen2VLImageProcessorPil(min_pixels=h * w, max_pixels=h * w)
    vision = processor(images=example.image.numpy(), return_tensors="pt")
    grid_thw = vision["image_grid_thw"]                               # [1, 3] in 14-px patches
    merge = model.config.vision_config.spatial_merge_size
    n_image_tokens = int(grid_thw.prod()) // merge**2
    question_ids, _ = tokenize(example.question, tm.FIRST_TEXT_ID, tm.LAST_TEXT_ID)
    prompt = [tm.VISION_START_TOKEN_ID] + [tm.IMAGE_TOKEN_ID] * n_image_tokens + [tm.VISION_END_TOKEN_ID]
    prompt += question_ids
    responses = [tokenize(text, tm.FIRST_TEXT_ID, tm.LAST_TEXT_ID) for text in example.responses]
    # EOS has no character offsets: paragraph_ids puts it in the last paragraph.
    response_ids = [ids + [tm.EOS_TOKEN_ID] for ids, _ in responses]
    offsets = [list(offs) + [None] for _, offs in responses]
    length = len(prompt) + max(len(r) for r in response_ids)
    batch = len(response_ids)
    input_ids = torch.full((batch, length), tm.PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    query_mask = torch.zeros(batch, length, dtype=torch.bool)
    response_mask = torch.zeros(batch, max(len(r) for r in response_ids), dtype=torch.bool)
    for b, ids in enumerate(response_ids):
        seq = prompt + ids
        input_ids[b, :len(seq)] = torch.tensor(seq)
        attention_mask[b, :len(seq)] = 1
        query_mask[b, len(prompt):len(seq)] = True
        response_mask[b, :len(ids)] = True
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask,
        pixel_values=vision["pixel_values"].repeat(batch, 1), image_grid_thw=grid_thw.repeat(batch, 1),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    grid_hw = (int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge)
    return inputs, query_mask.to(device), response_mask, offsets, grid_hw


def _step(index: int, total: int, message: str) -> float:
    print(f"[{index}/{total}] {message} ...", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"      done in {time.perf_counter() - start:.2f} s", flush=True)


def run_demo(device: str = "cpu", out_dir: str | Path = "kawhi-demo-out", seed: int = 0) -> dict:
    """Run the demo; print a table, write ``kawhi_demo.png`` and ``kawhi_demo.json`` to ``out_dir``.

    Returns the JSON-serialisable summary."""
    from .credit import group_advantages
    from .credit.pipeline import KAWHI
    from .integrations import capture_qk, tiny_models
    from .ops.cosine_alignment import cosine_alignment

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch sees no CUDA device here (torch "
                           f"{torch.__version__}); run with --device cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = 6

    t = _step(1, steps, "loading the bundled chart example and building a tiny random Qwen2.5-VL")
    example = load_example()
    model = tiny_models.tiny_qwen2_5_vl(
        seed=seed, attn_implementation="sdpa",
        text_config=dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=3)).to(dev)
    inputs, query_mask, response_mask, offsets, grid_hw = build_batch(example, model, dev)
    _done(t)

    t = _step(2, steps, f"SGUF key regions on the {grid_hw[0]}x{grid_hw[1]} token grid")
    # All 8 heads of the tiny model: the paper's presets index heads of the 7B/4B models.
    kawhi = KAWHI(heads=None, seed=seed)
    regions = kawhi.select_regions([example.image.to(dev)], [grid_hw])[0]
    _done(t)

    t = _step(3, steps, "policy forward over the 5 responses, capturing last-layer q/k")
    with torch.no_grad(), capture_qk(model, [-1], query_mask=query_mask) as capture:
        model(**inputs)
    record = capture.records[model.config.text_config.num_hidden_layers - 1]
    _done(t)

    t = _step(4, steps, "spatial alignment, paragraph weights, reweighted advantages")
    image_token_mask = inputs["input_ids"][inputs["attention_mask"].bool()] == tiny_models.IMAGE_TOKEN_ID
    image_of_key = torch.zeros_like(image_token_mask, dtype=torch.int64)
    key_region = kawhi.key_region_for_batch(image_token_mask, image_of_key, [regions])
    advantages = group_advantages(example.rewards, group_size=len(example.responses)).to(dev)
    result = kawhi.reweight(advantages, record.q, record.k, record.cu_seqlens_q, record.cu_seqlens_k,
                            key_region, example.responses, offsets, response_mask.to(dev))
    _done(t)

    t = _step(5, steps, "per-patch alignment map for the figure")
    n_tokens = grid_hw[0] * grid_hw[1]
    per_patch = torch.full_like(key_region, -1)
    per_patch[image_token_mask] = torch.arange(n_tokens, device=dev, dtype=torch.int32).repeat(
        len(example.responses))
    patch_alignment = cosine_alignment(record.q, record.k, record.cu_seqlens_q, record.cu_seqlens_k,
                                       per_patch, n_tokens).mean(0).reshape(grid_hw).cpu()
    _done(t)

    summary = _summarise(example, regions, result, advantages)
    _print_table(summary)
    t = _step(6, steps, f"writing {out / 'kawhi_demo.png'} and {out / 'kawhi_demo.json'}")
    _plot(example, regions, patch_alignment, grid_hw, out / "kawhi_demo.png", summary)
    (out / "kawhi_demo.json").write_text(json.dumps(summary, indent=2))
    _done(t)
    return summary


def _summarise(example: Example, regions, result, advantages) -> dict:
    responses = []
    cu = result.cu_seqlens.tolist()
    for b, text in enumerate(example.responses):
        para = result.paragraph_ids[cu[b]:cu[b + 1]].cpu()
        alpha = result.alpha[cu[b]:cu[b + 1]].cpu()
        weights = result.token_weights[b, :cu[b + 1] - cu[b]].cpu()
        paragraphs = []
        for j in range(int(para.max()) + 1 if para.numel() else 0):
            sel = para == j
            paragraphs.append(dict(tokens=int(sel.sum()), mean_alpha=float(alpha[sel].mean()),
                                   weight=float(weights[sel][0])))
        responses.append(dict(reward=float(example.rewards[b]), advantage=float(advantages[b]),
                              paragraphs=paragraphs,
                              mean_token_advantage=float(result.advantages[b, :cu[b + 1] - cu[b]].mean())))
    return dict(
        image_tokens=int(regions.selected.numel()),
        components=int(regions.energy.numel()), key_components=int(regions.is_key.sum()),
        key_tokens=int(regions.key_token_mask.sum()), selected_tokens=int(regions.selected.sum()),
        responses=responses,
    )


def _print_table(summary: dict) -> None:
    print()
    print(f"SGUF: {summary['components']} components, {summary['key_components']} key; "
          f"{summary['key_tokens']} key tokens, {summary['selected_tokens']} selected of {summary['image_tokens']} image tokens")
    print(f"{'resp':>4} {'reward':>6} {'A_g':>7} {'para':>4} {'tokens':>6} {'mean α':>9} {'weight':>7} {'Â_g,t':>8}")
    for b, resp in enumerate(summary["responses"]):
        for j, para in enumerate(resp["paragraphs"]):
            head = f"{b:>4} {resp['reward']:>6.1f} {resp['advantage']:>7.3f}" if j == 0 else " " * 19
            print(f"{head} {j:>4} {para['tokens']:>6} {para['mean_alpha']:>9.4f} {para['weight']:>7.3f} "
                  f"{resp['advantage'] * para['weight']:>8.3f}")
    print()


def _plot(example: Example, regions, patch_alignment: torch.Tensor, grid_hw, path: Path,
          summary: dict) -> None:
    """Three panels: SGUF regions on the image, per-token alignment, and the method's outputs
    (paragraph weights w_j and reweighted advantages Â = A_g · w_j per response)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    gh, gw = grid_hw
    p = example.patch_size
    extent = (0, gw * p, gh * p, 0)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100, layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1.15, 1.1]})
    key = regions.key_token_mask.reshape(gh, gw).float().cpu()
    selected = regions.selected.reshape(gh, gw).float().cpu()
    axes[0].imshow(example.image.numpy())
    key_or_background = ListedColormap(["#d62728", "#2ca02c"])
    axes[0].imshow(np.ma.masked_where(selected.numpy() == 0, key.numpy()), cmap=key_or_background, vmin=0,
                   vmax=1, alpha=0.45, extent=extent, interpolation="nearest")
    axes[0].set_title("SGUF selection: key tokens (green),\nsampled background (red)", fontsize=10)
    axes[1].imshow(example.image.numpy(), alpha=0.5)
    shown = axes[1].imshow(patch_alignment.numpy(), cmap="magma", alpha=0.6, extent=extent,
                           interpolation="nearest")
    fig.colorbar(shown, ax=axes[1], fraction=0.04, label="mean cosine (q_response, k_token)")
    axes[1].set_title("alignment of the response queries\nwith each image token", fontsize=10)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    _plot_weights(axes[2], summary)
    fig.savefig(path)
    plt.close(fig)


def _plot_weights(ax, summary: dict) -> None:
    """Bars of the paragraph weights per response, each labelled with Â = A_g · w_j."""
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    width = 0.8 / max(len(r["paragraphs"]) for r in summary["responses"])
    for b, resp in enumerate(summary["responses"]):
        for j, para in enumerate(resp["paragraphs"]):
            x = b + (j - (len(resp["paragraphs"]) - 1) / 2) * width
            ax.bar(x, para["weight"], width * 0.9, color=colours[j % len(colours)],
                   label=f"paragraph {j}" if b == 0 else None)
            ax.text(x, para["weight"] + 0.01, f"{resp['advantage'] * para['weight']:+.2f}",
                    ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(summary["responses"])))
    ax.set_xticklabels([f"resp {b}\nR={r['reward']:g}, A={r['advantage']:+.2f}"
                        for b, r in enumerate(summary["responses"])], fontsize=8)
    ax.set_ylabel("paragraph weight w_j")
    ax.set_ylim(0, max(p["weight"] for r in summary["responses"] for p in r["paragraphs"]) * 1.35)
    ax.set_title("paragraph weights; numbers: reweighted\nadvantage Â = A_g · w_j of each paragraph",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
