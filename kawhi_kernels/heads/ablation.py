"""Head ablation: zero one query-head index in every decoder layer and measure the score drop.

The KAWHI paper's protocol (Appendix A): mask head h in all layers, re-run a benchmark (MME) and
keep the heads whose removal drops the score by more than a threshold (100 MME points).

Masking acts on the input of each attention block's output projection ``o_proj``: that input is
the concatenation of the per-head attention outputs, so zeroing its slice ``[h·D, (h+1)·D)``
removes exactly head h's contribution to the residual stream (same as zeroing the weight columns
of ``o_proj`` for that head). Attention blocks are found generically: every module with an
``o_proj`` ``nn.Linear`` and an integer ``head_dim`` (the decoder self-attention of Qwen2/2.5/3-VL,
LLaVA, … ; vision towers use other names and are left alone).

:func:`ablate_heads` writes each result to a JSONL file as soon as it is known and, run again
with the same file, skips heads already scored. The file's header holds a fingerprint of the
model (config without paths/versions, parameter names/shapes/dtypes and a few parameter values)
and of the score function; a different fingerprint is an error, never a silent mix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

__all__ = [
    "AblationResult",
    "ablate_heads",
    "attention_blocks",
    "mask_heads",
    "model_fingerprint",
    "num_query_heads",
]

RESULTS_VERSION = 1


def attention_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The decoder attention modules of ``model``: every submodule with an ``o_proj``
    ``nn.Linear`` and an int ``head_dim`` whose ``o_proj.in_features`` is a multiple of it.

    Returns [(qualified name, module)] in model order; raises ``TypeError`` when there is none."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = []
    for name, module in model.named_modules():
        proj = getattr(module, "o_proj", None)
        head_dim = getattr(module, "head_dim", None)
        if isinstance(proj, torch.nn.Linear) and isinstance(head_dim, int) and head_dim > 0 \
                and proj.in_features % head_dim == 0:
            found.append((name, module))
    if not found:
        raise TypeError(f"model: no attention block with an `o_proj` linear layer and `head_dim` found in "
                        f"{type(model).__name__}; head masking needs the per-head concat before o_proj")
    return found


def num_query_heads(model: torch.nn.Module) -> int:
    """Number of query heads H of the decoder attention blocks (all blocks must agree)."""
    counts = {module.o_proj.in_features // module.head_dim for _, module in attention_blocks(model)}
    if len(counts) != 1:
        raise ValueError(f"model: attention blocks disagree on the number of query heads: {sorted(counts)}")
    return counts.pop()


def _normalise_heads(heads, num_heads: int) -> list[int]:
    if isinstance(heads, int) and not isinstance(heads, bool):
        heads = [heads]
    from .._validation import check_heads

    return check_heads(list(heads) if isinstance(heads, tuple) else heads, num_heads)


@contextlib.contextmanager
def mask_heads(model: torch.nn.Module, heads: int | Sequence[int]) -> Iterator[list[str]]:
    """Context manager zeroing query head(s) ``heads`` in **every** decoder layer.

    A forward pre-hook on each block's ``o_proj`` replaces its input x [..., H·D] by a copy with
    ``x[..., h·D:(h+1)·D] = 0`` for each h in ``heads`` (no in-place change of the attention
    output). Hooks are removed on exit, also on exceptions.

    Args:
        model: any model whose attention blocks :func:`attention_blocks` finds.
        heads: one head index or a list of distinct indices in [0, H).
    Yields:
        the qualified names of the masked attention blocks.
    """
    blocks = attention_blocks(model)
    head_list = _normalise_heads(heads, num_query_heads(model))
    handles = []

    def make_hook(head_dim: int):
        def hook(module, args):
            x = args[0].clone()
            for h in head_list:
                x[..., h * head_dim:(h + 1) * head_dim] = 0
            return (x,) + tuple(args[1:])
        return hook

    try:
        for _, block in blocks:
            handles.append(block.o_proj.register_forward_pre_hook(make_hook(block.head_dim)))
        yield [name for name, _ in blocks]
    finally:
        for handle in handles:
            handle.remove()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 hex digest identifying a model's architecture and weights, cheaply: the config
    (keys starting with "_" and ``transformers_version`` dropped, so paths and versions do not
    matter), every parameter's name, shape and dtype, and the first 8 values of each parameter."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        def clean(value):
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()
                        if not str(k).startswith("_") and k != "transformers_version"}
            return value

        digest.update(json.dumps(clean(config.to_dict()), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            head = param.detach().reshape(-1)[:8].double().cpu().tolist()
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{head!r};".encode())
    return digest.hexdigest()


def _score_fingerprint(score_fn) -> str:
    explicit = getattr(score_fn, "fingerprint", None)
    if isinstance(explicit, str):
        return explicit
    func = getattr(score_fn, "__func__", score_fn)
    module = getattr(func, "__module__", "?")
    name = getattr(func, "__qualname__", type(score_fn).__qualname__)
    return f"{module}.{name}"


@dataclass
class AblationResult:
    """Scores of the unmasked model and of the model with each head masked in every layer.

    Attributes:
        baseline: score of the unmasked model.
        scores: {head: score with that head masked}.
        threshold: heads whose drop exceeds it are ``selected``.
        num_heads: H, the model's query-head count.
        fingerprint: the run fingerprint stored in the results file.
    """

    baseline: float
    scores: dict[int, float]
    threshold: float
    num_heads: int
    fingerprint: dict = field(default_factory=dict)

    @property
    def drops(self) -> dict[int, float]:
        """{head: baseline − masked score} (positive = masking the head hurts)."""
        return {h: self.baseline - s for h, s in sorted(self.scores.items())}

    @property
    def selected(self) -> list[int]:
        """Heads with drop > threshold, ascending (the vision-critical set)."""
        return self.select(self.threshold)

    def select(self, threshold: float) -> list[int]:
        """Heads with drop > ``threshold``, ascending."""
        return sorted(h for h, d in self.drops.items() if d > threshold)

    def ranking(self) -> list[int]:
        """Scored heads sorted by drop, largest first (ties: lower index first)."""
        drops = self.drops
        return sorted(drops, key=lambda h: (-drops[h], h))

    def to_dict(self) -> dict:
        return dict(baseline=self.baseline, threshold=self.threshold, num_heads=self.num_heads,
                    scores={str(h): s for h, s in sorted(self.scores.items())},
                    drops={str(h): d for h, d in self.drops.items()}, selected=self.selected,
                    fingerprint=dict(self.fingerprint))

    def to_markdown(self) -> str:
        """Markdown table of the heads by drop, marking the selected ones."""
        selected = set(self.selected)
        lines = [f"baseline score {self.baseline:.6g}; threshold {self.threshold:g}; "
                 f"selected heads {self.selected}", "",
                 "| rank | head | masked score | drop | selected |", "|---:|---:|---:|---:|:---:|"]
        for rank, head in enumerate(self.ranking(), start=1):
            lines.append(f"| {rank} | {head} | {self.scores[head]:.6g} | {self.drops[head]:.6g} | "
                         f"{'yes' if head in selected else ''} |")
        return "\n".join(lines) + "\n"


class _ResultsFile:
    """JSONL results: a header line, a baseline line, one line per scored head (appended and
    flushed to disk as each result is known)."""

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.baseline: float | None = None
        self.scores: dict[int, float] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_lines([{"type": "header", "version": RESULTS_VERSION, "fingerprint": fingerprint}], "w")

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        records, broken_tail = [], False
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):           # a write cut short by an interruption
                    broken_tail = True
                    break
                raise ValueError(f"results_path: {self.path} line {number} is not valid JSON") from None
        if not records or records[0].get("type") != "header":
            raise ValueError(f"results_path: {self.path} is not a head-ablation results file (no header line)")
        stored = records[0].get("fingerprint")
        if stored != self.fingerprint:
            differs = sorted(k for k in set(stored or {}) | set(self.fingerprint)
                             if (stored or {}).get(k) != self.fingerprint.get(k))
            raise ValueError(f"results_path: {self.path} belongs to a different run (fingerprint differs in "
                             f"{differs}); use another results file or delete this one")
        for record in records[1:]:
            if record.get("type") == "baseline":
                self.baseline = float(record["score"])
            elif record.get("type") == "head":
                self.scores[int(record["head"])] = float(record["score"])
        if broken_tail:
            self._write_lines(records, "w")

    def _write_lines(self, records: list[dict], mode: str) -> None:
        with open(self.path, mode) as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add_baseline(self, score: float) -> None:
        self.baseline = score
        self._write_lines([{"type": "baseline", "score": score}], "a")

    def add_head(self, head: int, score: float) -> None:
        self.scores[head] = score
        self._write_lines([{"type": "head", "head": head, "score": score,
                            "drop": None if self.baseline is None else self.baseline - score}], "a")


def _run_score(score_fn, model) -> float:
    with torch.no_grad():
        value = score_fn(model)
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"score_fn: expected a float score, got {type(value).__name__}")
    return float(value)


def ablate_heads(
    model: torch.nn.Module,
    score_fn: Callable[[torch.nn.Module], float],
    *,
    heads: Sequence[int] | None = None,
    threshold: float = 0.0,
    results_path: str | Path | None = None,
    fingerprint: dict | None = None,
    progress: bool = True,
) -> AblationResult:
    """Score the model unmasked and with each head in ``heads`` masked in every layer.

    Args:
        model: a model :func:`mask_heads` supports (put it in eval mode).
        score_fn: ``score_fn(model) -> float``, higher = better (e.g. a
            :class:`~kawhi_kernels.heads.scoring.MultipleChoiceScorer`); called under
            ``torch.no_grad`` once for the baseline and once per head. A ``fingerprint`` string
            attribute on it identifies it in the results file (else its qualified name).
        heads: query-head indices to test (default all H).
        threshold: heads whose drop (baseline − masked) exceeds it are selected.
        results_path: optional JSONL file; each result is appended as soon as known, and a rerun
            with the same file skips the baseline and heads already in it.
        fingerprint: extra identifying entries stored in (and checked against) the file header,
            e.g. {"dataset": ...}; the model and score-function fingerprints are always added.
        progress: show a tqdm bar over heads.

    Returns:
        :class:`AblationResult` (baseline, per-head scores and drops, selected heads).

    Raises:
        ValueError when ``results_path`` holds another run (different fingerprint) or is not a
        results file; TypeError when ``score_fn`` is not callable or returns a non-number.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn: expected a callable score_fn(model) -> float, got {type(score_fn).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold: expected a number, got {type(threshold).__name__}")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint: expected a dict, got {type(fingerprint).__name__}")
    num_heads = num_query_heads(model)
    head_list = list(range(num_heads)) if heads is None else _normalise_heads(heads, num_heads)
    run_id = {**(fingerprint or {}), "model": model_fingerprint(model), "score_fn": _score_fingerprint(score_fn),
              "num_heads": num_heads, "num_layers": len(attention_blocks(model))}
    run_id = json.loads(json.dumps(run_id, sort_keys=True, default=str))   # as stored in the file
    store = _ResultsFile(results_path, run_id) if results_path is not None else None

    baseline = store.baseline if store is not None else None
    if baseline is None:
        baseline = _run_score(score_fn, model)
        if store is not None:
            store.add_baseline(baseline)
    scores = {h: store.scores[h] for h in head_list if store is not None and h in store.scores}
    todo = [h for h in head_list if h not in scores]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(head_list), initial=len(head_list) - len(todo), desc="ablate heads", unit="head")
    try:
        for head in todo:
            with mask_heads(model, head):
                score = _run_score(score_fn, model)
            scores[head] = score
            if store is not None:
                store.add_head(head, score)
            if bar is not None:
                bar.set_postfix(head=head, drop=f"{baseline - score:.4g}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return AblationResult(baseline=baseline, scores=dict(sorted(scores.items())), threshold=float(threshold),
                          num_heads=num_heads, fingerprint=run_id)
