"""Attention-mass profile of every (layer, query head) of a Qwen-VL model on calibration batches.

For each calibration batch the model runs **once**, with :func:`capture_qk` on the chosen layers
in callback mode: each layer's post-RoPE q (selected query rows) and k (all keys) are reduced on
the spot by :func:`attention_mass` (one call per layer, one region per image token, one segment
per sequence) and only the running statistics are kept; no Q/K and no attention map is stored.

Statistics, per (layer, head), averaged over the sequences that have at least one query row and
one image token:

* ``mass``: mean over the sequence's query rows of the softmax probability mass on its image
  tokens (all images of the sequence together), in [0, 1];
* ``entropy``: entropy in nats of the sequence's per-image-token mass distribution (the query
  rows' masses on each image token, summed over rows, normalised to sum 1); low = the head looks
  at a few patches, ``log(#image tokens)`` = uniform. ``HeadProfile.max_entropy`` is the mean of
  ``log(#image tokens)`` over the same sequences.

Query rows must be the **last** non-pad tokens of each sequence (e.g. the response, or the text
after the image): the ops align causal masks bottom-right, which equals the model's causal mask
only for such suffix rows. Other selections raise ``ValueError`` (cut the batch after the rows of
interest instead).

The softmax normaliser is, by default, the one the model's attention already computed
(``capture_qk(..., capture_lse=True)``: SDPA's flash kernels, flash-attn 2, eager scores), so
``attention_mass`` skips its own normaliser pass; where a layer's kernel gives none (e.g. SDPA's
math / memory-efficient path on a padded CUDA batch) ``attention_mass`` computes it. Where each
layer's came from is counted in ``HeadProfile.meta["lse_sources"]``.

The ranking pools layers per head index, as the KAWHI paper's head selection does: heads are
sorted by their mass averaged over the profiled layers.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

__all__ = ["HeadProfile", "profile_heads", "text_after_image_mask"]


@dataclass
class HeadProfile:
    """Per (layer, head) attention statistics from :func:`profile_heads`.

    Attributes:
        mass: float64 [L, H] mean attention mass of the query rows on image tokens.
        entropy: float64 [L, H] mean entropy (nats) of the per-image-token mass distribution.
        layers: the L profiled decoder-layer indices (row order of ``mass`` / ``entropy``).
        num_sequences: sequences averaged over (with query rows and image tokens).
        num_rows: query rows seen in those sequences.
        max_entropy: mean over those sequences of log(#image tokens), the uniform-attention entropy.
        model: free-form model name for reports.
    """

    mass: torch.Tensor
    entropy: torch.Tensor
    layers: list[int]
    num_sequences: int
    num_rows: int
    max_entropy: float
    model: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return int(self.mass.shape[1])

    def head_mass(self) -> torch.Tensor:
        """float64 [H]: mass of each query-head index averaged over the profiled layers."""
        return self.mass.mean(dim=0)

    def head_entropy(self) -> torch.Tensor:
        """float64 [H]: entropy of each query-head index averaged over the profiled layers."""
        return self.entropy.mean(dim=0)

    def ranking(self) -> list[int]:
        """Head indices sorted by :meth:`head_mass`, largest first (ties: lower index first)."""
        scores = self.head_mass().tolist()
        return sorted(range(len(scores)), key=lambda h: (-scores[h], h))

    def top(self, k: int) -> list[int]:
        """The ``k`` heads with the largest layer-averaged image mass."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        return self.ranking()[:k]

    # ----------------------------------------------------------------------------- export
    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV with one line per (layer, head): ``layer,head,mass,entropy``. Written to ``path``
        when given; the text is returned either way."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["layer", "head", "mass", "entropy"])
        for row, layer in enumerate(self.layers):
            for head in range(self.num_heads):
                writer.writerow([layer, head, f"{float(self.mass[row, head]):.8g}",
                                 f"{float(self.entropy[row, head]):.8g}"])
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, top: int | None = None) -> str:
        """Markdown table of the heads in ranking order (``top`` first rows, default all): rank,
        head, layer-mean mass, its best layer, layer-mean entropy."""
        ranking = self.ranking() if top is None else self.top(top)
        mass, entropy = self.head_mass(), self.head_entropy()
        lines = [
            f"Attention mass on image tokens per query head ({self.model or 'model'}; "
            f"{len(self.layers)} layers, {self.num_sequences} sequences, {self.num_rows} query rows; "
            f"uniform entropy {self.max_entropy:.3f} nats)",
            "",
            "| rank | head | mean mass | max mass (layer) | mean entropy |",
            "|---:|---:|---:|---:|---:|",
        ]
        for rank, head in enumerate(ranking, start=1):
            best = int(self.mass[:, head].argmax())
            lines.append(f"| {rank} | {head} | {float(mass[head]):.4f} | "
                         f"{float(self.mass[best, head]):.4f} ({self.layers[best]}) | {float(entropy[head]):.4f} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return dict(model=self.model, layers=list(self.layers), num_sequences=self.num_sequences,
                    num_rows=self.num_rows, max_entropy=self.max_entropy, mass=self.mass.tolist(),
                    entropy=self.entropy.tolist(), ranking=self.ranking(), meta=dict(self.meta))

    @classmethod
    def from_dict(cls, data: Mapping) -> "HeadProfile":
        return cls(mass=torch.tensor(data["mass"], dtype=torch.float64),
                   entropy=torch.tensor(data["entropy"], dtype=torch.float64),
                   layers=[int(x) for x in data["layers"]], num_sequences=int(data["num_sequences"]),
                   num_rows=int(data["num_rows"]), max_entropy=float(data["max_entropy"]),
                   model=str(data.get("model", "")), meta=dict(data.get("meta", {})))

    def save(self, out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
        """Write ``profile.csv``, ``profile.md``, ``profile.json`` and (``plot``) ``heatmap.png``
        into ``out_dir`` (created). Returns {kind: path}."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "profile.csv", "markdown": out / "profile.md", "json": out / "profile.json"}
        self.to_csv(paths["csv"])
        paths["markdown"].write_text(self.to_markdown())
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1))
        if plot:
            from .plots import plot_profile

            paths["heatmap"] = plot_profile(self, out / "heatmap.png")
        return paths


def text_after_image_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          image_token_id: int) -> torch.Tensor:
    """Default query rows: non-pad tokens after the last image token of each row.

    Args:
        input_ids: int [B, L]; attention_mask: optional int/bool [B, L] (0 = pad).
    Returns:
        bool [B, L]; all False for rows without an image token. With left or right padding these
        rows are the last non-pad tokens of the row (a suffix), as :func:`profile_heads` needs.
    """
    from .._validation import check_tensor

    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    is_image = input_ids == image_token_id
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_image = torch.where(is_image, cols, torch.full_like(cols, -1)).amax(dim=1, keepdim=True)
    mask = (cols[None, :] > last_image) & is_image.any(dim=1, keepdim=True)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        mask &= attention_mask.to(input_ids.device).bool()
    return mask


class _Accumulator:
    """Running sums of the per-sequence statistics, filled by the capture callback."""

    def __init__(self, layers: list[int], image_token_id: int, backend: str):
        self.row_of = {layer: i for i, layer in enumerate(layers)}
        self.image_token_id = image_token_id
        self.backend = backend
        self.mass_sum: torch.Tensor | None = None       # float64 [L, H]
        self.entropy_sum: torch.Tensor | None = None
        self.count = torch.zeros(len(layers), dtype=torch.int64)
        self.input_ids: torch.Tensor | None = None
        self.layout = None       # (valid, rows per sequence, plan) of the current batch
        self.num_sequences = 0
        self.num_rows = 0
        self.log_patches = 0.0
        self.lse_sources: dict[str, int] = {}    # lse source -> layer calls

    def start_batch(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.layout = None

    def _batch_layout(self, record):
        """(valid sequences, rows per sequence, AttentionMassPlan) of this batch, built from the
        first captured layer and reused by the others (the layout is the same in every layer)."""
        from ..ops.plan import AttentionMassPlan

        device = record.k.device
        if self.input_ids.device != device:
            self.input_ids = self.input_ids.to(device)
        ids = self.input_ids[record.k_batch.to(device), record.k_pos.to(device)]
        is_image = ids == self.image_token_id
        num_seq = record.num_sequences
        cu_k = record.cu_seqlens_k.to(device=device, dtype=torch.int64)
        cu_q = record.cu_seqlens_q.to(device=device, dtype=torch.int64)
        key_counts, row_counts = cu_k.diff(), cu_q.diff()
        key_seq = torch.repeat_interleave(torch.arange(num_seq, device=device), key_counts)
        images = torch.bincount(key_seq[is_image], minlength=num_seq)           # image tokens per sequence
        valid = (images > 0) & (row_counts > 0)
        self.num_sequences += int(valid.sum())
        self.num_rows += int(row_counts[valid].sum())
        self.log_patches += float(torch.log(images[valid].double()).sum())
        if not bool(valid.any()):
            return valid, row_counts, None
        # Region of an image key = its index among the image tokens of its sequence.
        image_start = torch.cumsum(images, 0) - images
        running = torch.cumsum(is_image.long(), 0) - 1
        key_region = torch.where(is_image, running - image_start[key_seq], torch.full_like(running, -1))
        query_segment = torch.repeat_interleave(torch.arange(num_seq, device=device), row_counts)
        plan = AttentionMassPlan(
            record.cu_seqlens_q, record.cu_seqlens_k, key_region.to(torch.int32), int(images.max()),
            num_heads=record.q.shape[1], num_kv_heads=record.k.shape[1],
            head_dim=record.q.shape[2], dtype=record.q.dtype,
            query_segment=query_segment.to(torch.int32), num_segments=num_seq, causal=True,
            softmax_scale=record.softmax_scale, backend=self.backend)
        return valid, row_counts, plan

    def __call__(self, layer: int, record) -> None:
        if self.layout is None:
            if not record.queries_are_suffix():
                raise ValueError(
                    "query_mask: the selected query rows must be the last non-pad tokens of each sequence "
                    "(e.g. the response): attention_mass aligns causal masks bottom-right, which matches "
                    "the model only for such suffix rows. Truncate the batch after the rows of interest.")
            self.layout = self._batch_layout(record)
        valid, row_counts, plan = self.layout
        hq = record.q.shape[1]
        if self.mass_sum is None:
            self.mass_sum = torch.zeros(len(self.row_of), hq, dtype=torch.float64)
            self.entropy_sum = torch.zeros(len(self.row_of), hq, dtype=torch.float64)
        elif self.mass_sum.shape[1] != hq:
            raise ValueError(f"model: layer {layer} has {hq} query heads, earlier layers {self.mass_sum.shape[1]}")
        if plan is None:
            return
        # The model's own normaliser when the capture kept one, else attention_mass computes it.
        source = "attention_mass" if record.lse_source is None else record.lse_source
        self.lse_sources[source] = self.lse_sources.get(source, 0) + 1
        per_patch = plan.run(record.q, record.k, record.lse).double()                        # [S, H, R], summed over rows
        total = per_patch.sum(dim=-1)                                            # [S, H]
        mass = total / row_counts.clamp(min=1)[:, None]
        p = per_patch / torch.where(total > 0, total, torch.ones_like(total))[..., None]
        entropy = -torch.special.xlogy(p, p).sum(dim=-1)                         # [S, H]
        row = self.row_of[layer]
        self.mass_sum[row] += mass[valid].sum(0).cpu()
        self.entropy_sum[row] += entropy[valid].sum(0).cpu()
        self.count[row] += int(valid.sum())


def _call_model(model, inputs: dict) -> None:
    import inspect

    params = inspect.signature(model.forward).parameters
    extra = {}
    if "logits_to_keep" in params and "logits_to_keep" not in inputs:
        extra["logits_to_keep"] = 1        # the profile needs no logits
    if "use_cache" in params and "use_cache" not in inputs:
        extra["use_cache"] = False
    model(**inputs, **extra)


def profile_heads(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    query_mask_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    image_token_id: int | None = None,
    layers="all",
    backend: str = "auto",
    model_name: str = "",
    progress: bool = False,
    use_model_lse: bool = True,
) -> HeadProfile:
    """Profile the attention mass every (layer, query head) puts on image tokens.

    Args:
        model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model supported by :func:`capture_qk` (eval
            mode; eager, sdpa or flash attention). Runs under ``torch.no_grad``.
        batches: one dict of model inputs or an iterable of them (``input_ids`` int [B, L] is
            required, plus ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
            ``mm_token_type_ids`` … as the processor returns them). A ``"query_mask"`` entry (bool
            [B, L]) is removed before the forward and selects the query rows.
        query_mask_fn: optional ``fn(batch) -> bool [B, L]`` selecting the query rows (takes
            precedence over a ``"query_mask"`` entry). Default: :func:`text_after_image_mask`.
            Selected rows must be the last non-pad tokens of their sequence (see module doc).
        image_token_id: id of the image placeholder token (default ``model.config.image_token_id``).
        layers: ``"all"`` or a list of decoder-layer indices (negative = from the end).
        backend: ``attention_mass`` backend ("auto", "torch", "triton", "cuda").
        model_name: name stored in the profile for reports.
        progress: show a tqdm bar over batches.
        use_model_lse: pass the softmax normaliser the model's attention computed to
            ``attention_mass`` (default); False makes ``attention_mass`` compute its own.

    Returns:
        :class:`HeadProfile` with ``mass`` / ``entropy`` float64 [L, H] (0 where no sequence had
        query rows and image tokens). ``meta["lse_sources"]`` maps where each (layer, batch)
        normaliser came from (:attr:`QKRecord.lse_source`; ``"attention_mass"`` = computed by the
        op, ``"none: …"`` = the model's kernel gave none, so the op computed it) to its count.

    Raises:
        ValueError for non-suffix query rows, a missing ``input_ids``, a query mask of the wrong
        shape, or when no batch holds a sequence with both query rows and image tokens.
    """
    from ..integrations.transformers_capture import capture_qk

    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            raise ValueError("image_token_id: the model config has no image_token_id; pass it explicitly")
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise TypeError(f"image_token_id: expected an int, got {type(image_token_id).__name__}")
    if isinstance(batches, Mapping):
        batches = [batches]
    if not isinstance(use_model_lse, bool):
        raise TypeError(f"use_model_lse: expected a bool, got {type(use_model_lse).__name__}")
    if query_mask_fn is not None and not callable(query_mask_fn):
        raise TypeError(f"query_mask_fn: expected a callable fn(batch) -> bool [B, L], got {type(query_mask_fn).__name__}")

    probe = capture_qk(model, layers)            # validates the model and normalises ``layers``
    layer_list = list(probe.layers)
    acc = _Accumulator(layer_list, image_token_id, backend)
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="profile", unit="batch")
    num_batches = 0
    for index, batch in enumerate(iterator):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"batches: item {index} must be a dict of model inputs with 'input_ids'")
        inputs = dict(batch)
        given_mask = inputs.pop("query_mask", None)
        input_ids = inputs["input_ids"]
        if query_mask_fn is not None:
            query_mask = query_mask_fn(batch)
        elif given_mask is not None:
            query_mask = given_mask
        else:
            query_mask = text_after_image_mask(input_ids, inputs.get("attention_mask"), image_token_id)
        if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool \
                or tuple(query_mask.shape) != tuple(input_ids.shape):
            got = tuple(query_mask.shape) if isinstance(query_mask, torch.Tensor) else type(query_mask).__name__
            raise ValueError(f"query_mask: batch {index}: expected a bool tensor of shape {tuple(input_ids.shape)} "
                             f"(the batch's [B, L]), got {got}")
        acc.start_batch(input_ids)
        with torch.no_grad(), capture_qk(model, layer_list, query_mask=query_mask.to(input_ids.device),
                                         on_layer=acc, capture_lse=use_model_lse):
            _call_model(model, inputs)
        num_batches += 1
    if acc.num_sequences == 0:
        raise ValueError("batches: no sequence had both query rows and image tokens "
                         f"(image_token_id={image_token_id}); nothing to profile")
    count = acc.count.clamp(min=1).double()[:, None]
    return HeadProfile(mass=acc.mass_sum / count, entropy=acc.entropy_sum / count, layers=layer_list,
                       num_sequences=acc.num_sequences, num_rows=acc.num_rows,
                       max_entropy=acc.log_patches / acc.num_sequences, model=model_name,
                       meta=dict(num_batches=num_batches, image_token_id=image_token_id, backend=backend,
                                 lse_sources=dict(acc.lse_sources)))
