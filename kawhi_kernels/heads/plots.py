"""PNG plots for head attribution (matplotlib's Agg canvas; pyplot's global state is not touched,
so this works headless and does not change the backend of an interactive session)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["plot_head_heatmap", "plot_profile", "plot_ablation"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout keeps titles, colour bars and their labels inside the canvas and apart
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap(ax, values: torch.Tensor, layers: Sequence[int], title: str, label: str, cmap: str,
             vmin: float | None = None, vmax: float | None = None) -> None:
    """``vmin``/``vmax`` fix the colour scale to absolute bounds (e.g. 0 and 1 for a mass), so a
    spread of 0.0005 does not fill the whole colour map."""
    data = values.detach().double().cpu().numpy()
    image = ax.imshow(data, aspect="auto", origin="upper", cmap=cmap, interpolation="nearest",
                      vmin=vmin, vmax=vmax)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    num_layers, num_heads = data.shape
    head_step = max(1, num_heads // 16)
    layer_step = max(1, num_layers // 16)
    ax.set_xticks(range(0, num_heads, head_step))
    ax.set_yticks(range(0, num_layers, layer_step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, num_layers, layer_step)])
    from matplotlib.ticker import ScalarFormatter

    bar = ax.figure.colorbar(image, ax=ax, label=label)
    bar.formatter = ScalarFormatter(useOffset=False)
    bar.update_ticks()


def plot_head_heatmap(values: torch.Tensor, path: str | Path, *, layers: Sequence[int] | None = None,
                      title: str = "", label: str = "", cmap: str = "viridis") -> Path:
    """Save a layer × head heatmap of ``values`` (float [L, H]) to ``path`` (PNG). ``layers``
    labels the rows (default 0 … L−1). Returns the path."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values: expected a 2-D tensor [layers, heads], got {getattr(values, 'shape', type(values))}")
    layers = list(range(values.shape[0])) if layers is None else list(layers)
    if len(layers) != values.shape[0]:
        raise ValueError(f"layers: expected {values.shape[0]} labels, got {len(layers)}")
    fig = _figure(2.5 + 0.3 * max(values.shape[1], 8), 1.2 + 0.25 * max(values.shape[0], 8))
    _heatmap(fig.add_subplot(1, 1, 1), values, layers, title, label, cmap)
    fig.savefig(path)
    return Path(path)


def plot_profile(profile, path: str | Path) -> Path:
    """Two heatmaps of a :class:`~kawhi_kernels.heads.profile.HeadProfile` side by side: image
    mass and per-patch entropy, layer × head. Returns the path of the PNG."""
    num_layers, num_heads = profile.mass.shape
    fig = _figure(4.0 + 0.6 * max(num_heads, 8), 1.6 + 0.25 * max(num_layers, 8))
    # Absolute scales: mass is a fraction of each row's attention (0–1); entropy runs from 0 (all
    # mass on one patch) to the uniform spread over the patches.
    _heatmap(fig.add_subplot(1, 2, 1), profile.mass, profile.layers, "mass on image tokens",
             "fraction of attention (0–1)", "viridis", vmin=0.0, vmax=1.0)
    _heatmap(fig.add_subplot(1, 2, 2), profile.entropy, profile.layers, "entropy over patches",
             f"nats (0 = one patch, {profile.max_entropy:.2f} = uniform)", "magma",
             vmin=0.0, vmax=max(float(profile.max_entropy), 1e-6))
    fig.suptitle(profile.model or "head profile")
    fig.savefig(path)
    return Path(path)


def plot_ablation(result, path: str | Path) -> Path:
    """Bar chart of the score drop per masked head of an
    :class:`~kawhi_kernels.heads.ablation.AblationResult`, with the threshold line; selected
    heads highlighted. Returns the path of the PNG."""
    heads = sorted(result.scores)
    drops = result.drops
    selected = set(result.selected)
    fig = _figure(2.0 + 0.3 * max(len(heads), 8), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(heads)), [drops[h] for h in heads],
           color=["tab:red" if h in selected else "tab:gray" for h in heads])
    ax.axhline(result.threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {result.threshold:g}")
    ax.set_xticks(range(len(heads)))
    ax.set_xticklabels([str(h) for h in heads], fontsize=7)
    ax.set_xlabel("masked query head (all layers)")
    ax.set_ylabel(f"score drop (baseline {result.baseline:.4g})")
    ax.legend()
    fig.savefig(path)
    return Path(path)
