"""A small multiple-choice scorer for head ablation: log-likelihood of each answer choice.

Dataset: a JSONL file (or a list of dicts), one item per line::

    {"prompt_ids": [..], "choices": [[..], [..]], "answer": 1}                 # token ids
    {"prompt_ids": [..], "choices": [..], "answer": 0, "image_grid": [4, 6]}   # + synthetic image
    {"text": "...", "choices": ["yes", "no"], "answer": 0, "image": "cat.png"} # needs a processor

* ``prompt_ids``: prompt token ids; ``choices``: one id list (or a single id) per choice. If the
  prompt holds image placeholder tokens, ``image_grid`` ((h, w) or (t, h, w) vision patches, as
  ``image_grid_thw``) adds seeded random pixels of that grid (``seed``, default the item index) —
  for smoke tests and tiny models; Qwen-VL-style vision configs only.
* ``text``: prompt text, already in the model's chat format, with the image placeholder where the
  processor expects it (e.g. ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen-VL);
  ``choices`` are strings, tokenised without special tokens and appended to the prompt;
  ``image``: path of an image file (relative to the JSONL file's folder).
* ``answer``: index of the correct choice.

Each choice is scored by the sum of its tokens' log-probabilities after the prompt (all choices of
an item in one padded forward). Metrics: ``"accuracy"`` = 100 × fraction of items whose answer
has the highest log-likelihood (percentage points); ``"answer_logprob"`` = mean over items of the
log-probability of the answer normalised over the item's choices (nats, ≤ 0; a smooth score that
also moves on small or random models).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["MultipleChoiceScorer", "encode_item", "load_multiple_choice", "METRICS"]

METRICS = ("accuracy", "answer_logprob")
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_item(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    has_ids, has_text = "prompt_ids" in item, "text" in item
    if has_ids == has_text:
        raise ValueError(f"{where}: expected exactly one of 'prompt_ids' or 'text'")
    choices = item.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 choices")
    answer = item.get("answer")
    if not _is_int(answer) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be an int in [0, {len(choices)}), got {answer!r}")
    item = dict(item)
    if has_ids:
        ids = item["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"{where}: 'prompt_ids' must be a non-empty list of non-negative ints")
        norm = []
        for c, choice in enumerate(choices):
            choice = [choice] if _is_int(choice) else choice
            if not isinstance(choice, list) or not choice or not all(_is_int(t) and t >= 0 for t in choice):
                raise ValueError(f"{where}: choice {c} must be a non-empty list of token ids (or one id)")
            norm.append(choice)
        item["choices"] = norm
        if "image" in item:
            raise ValueError(f"{where}: 'image' files need a 'text' prompt and a processor; with 'prompt_ids' "
                             "use 'image_grid' (synthetic pixels)")
        if "image_grid" in item:
            grid = item["image_grid"]
            if not isinstance(grid, list) or len(grid) not in (2, 3) or not all(_is_int(g) and g > 0 for g in grid):
                raise ValueError(f"{where}: 'image_grid' must be [h, w] or [t, h, w] positive ints, got {grid!r}")
    else:
        if not isinstance(item["text"], str) or not item["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: with 'text', every choice must be a non-empty string")
        if "image_grid" in item:
            raise ValueError(f"{where}: 'image_grid' is for 'prompt_ids' items; use 'image' with 'text'")
        if "image" in item and not isinstance(item["image"], str):
            raise ValueError(f"{where}: 'image' must be a path string")
    return item


def load_multiple_choice(path: str | Path) -> list[dict]:
    """Read and validate a multiple-choice JSONL file (format in the module doc). Blank lines
    are skipped. Raises ``ValueError`` naming the file and line of a malformed item."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset: {path} is not a file")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"dataset: {path} line {number}: invalid JSON ({exc.msg})") from None
        items.append(_validate_item(raw, f"dataset: {path} line {number}"))
    if not items:
        raise ValueError(f"dataset: {path} holds no items")
    return items


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _pad_token_id(config) -> int:
    for cfg in (config, getattr(config, "text_config", None)):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if _is_int(pad):
            return pad
    return 0


def _synthetic_image(model, prompt: torch.Tensor, grid: list[int], seed: int, where: str) -> dict:
    config = model.config
    vision = getattr(config, "vision_config", None)
    image_token_id = getattr(config, "image_token_id", None)
    needed = ("in_channels", "temporal_patch_size", "patch_size", "spatial_merge_size")
    if vision is None or image_token_id is None or not all(hasattr(vision, n) for n in needed):
        raise ValueError(f"{where}: 'image_grid' needs a Qwen-VL-style model (vision_config with patch_size, "
                         f"temporal_patch_size, spatial_merge_size, in_channels and an image_token_id)")
    t, h, w = ([1] + grid) if len(grid) == 2 else grid
    merge = vision.spatial_merge_size
    if h % merge or w % merge:
        raise ValueError(f"{where}: 'image_grid' h and w must be multiples of spatial_merge_size={merge}, got {grid}")
    tokens = int((prompt == image_token_id).sum())
    if tokens != t * h * w // merge**2:
        raise ValueError(f"{where}: prompt_ids hold {tokens} image tokens but image_grid {grid} needs "
                         f"t·h·w/merge² = {t * h * w // merge**2}")
    gen = torch.Generator().manual_seed(seed)
    dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {"pixel_values": torch.randn(t * h * w, dim, generator=gen),
            "image_grid_thw": torch.tensor([[t, h, w]], dtype=torch.long)}


def _encode_prompt(model, item: dict, processor, base_dir: Path | None, seed: int, where: str):
    """(prompt tensors with a leading batch of 1 for sequence keys, other tensors, choice id lists)."""
    if "prompt_ids" in item:
        prompt = torch.tensor([item["prompt_ids"]], dtype=torch.long)
        extra = {}
        image_token_id = getattr(model.config, "image_token_id", None)
        if "image_grid" in item:
            extra = _synthetic_image(model, prompt, item["image_grid"], int(item.get("seed", seed)), where)
        elif image_token_id is not None and bool((prompt == image_token_id).any()):
            raise ValueError(f"{where}: prompt_ids hold image tokens ({image_token_id}) but the item has no "
                             "'image_grid'")
        seq = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        if image_token_id is not None and "mm_token_type_ids" in _forward_params(model):
            seq["mm_token_type_ids"] = (prompt == image_token_id).to(torch.int32)
        return seq, extra, item["choices"]
    if processor is None:
        raise ValueError(f"{where}: 'text' items need a processor or tokenizer (none given; the tiny models "
                         "have none: use 'prompt_ids')")
    tokenizer = getattr(processor, "tokenizer", processor)
    if "image" in item:
        from PIL import Image

        path = Path(item["image"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"{where}: image file {path} not found")
        with Image.open(path) as img:
            encoded = processor(text=[item["text"]], images=[img.convert("RGB")], return_tensors="pt")
    else:
        encoded = processor(text=[item["text"]], return_tensors="pt") if tokenizer is not processor \
            else tokenizer(item["text"], return_tensors="pt")
    encoded = dict(encoded)
    seq = {k: v for k, v in encoded.items() if k in _SEQUENCE_KEYS and isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in encoded.items() if k not in _SEQUENCE_KEYS and isinstance(v, torch.Tensor)}
    seq.setdefault("attention_mask", torch.ones_like(seq["input_ids"]))
    choices = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item["choices"]]
    if any(len(c) == 0 for c in choices):
        raise ValueError(f"{where}: a choice tokenises to no tokens")
    return seq, extra, choices


def encode_item(model, item: dict, *, processor=None, choices: Sequence[int] | None = None,
                base_dir: str | Path | None = None, index: int = 0) -> tuple[dict, int, list[int]]:
    """Model inputs for (a subset of) an item's choices, one right-padded row per choice.

    Args:
        model: the model (its config gives image/pad token ids; inputs go to its device).
        item: a validated item (see :func:`load_multiple_choice`).
        processor: processor or tokenizer for ``text`` items.
        choices: indices of the choices to encode (default all).
        base_dir: folder that relative ``image`` paths are resolved against.
        index: item index, the default seed of synthetic pixels.
    Returns:
        (inputs dict: input_ids int64 [C, P + max choice length], attention_mask [C, ·], image
        tensors repeated per row …; prompt length P; list of the C choice lengths).
    """
    where = f"dataset item {index}"
    item = _validate_item(item, where)
    seq, extra, choice_ids = _encode_prompt(model, item, processor, None if base_dir is None else Path(base_dir),
                                            index, where)
    picked = list(range(len(choice_ids))) if choices is None else list(choices)
    rows = [choice_ids[c] for c in picked]
    prompt_len = seq["input_ids"].shape[1]
    length = prompt_len + max(len(r) for r in rows)
    pad = _pad_token_id(model.config)
    inputs = {}
    for key, value in seq.items():
        fill = pad if key == "input_ids" else 0
        out = torch.full((len(rows), length), fill, dtype=value.dtype)
        out[:, :prompt_len] = value[0]
        for r, ids in enumerate(rows):
            if key == "input_ids":
                out[r, prompt_len:prompt_len + len(ids)] = torch.tensor(ids, dtype=value.dtype)
            elif key == "attention_mask":
                out[r, prompt_len:prompt_len + len(ids)] = 1
        inputs[key] = out
    device, dtype = _model_device_dtype(model)
    for key, value in extra.items():
        inputs[key] = torch.cat([value] * len(rows), dim=0)
    return ({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()},
            prompt_len, [len(r) for r in rows])


class MultipleChoiceScorer:
    """``scorer(model) -> float``: multiple-choice score of a model on a dataset.

    Args:
        dataset: path of a JSONL file or a list of item dicts (format in the module doc).
        processor: processor or tokenizer, needed for ``text`` items only.
        metric: "accuracy" (percent, 0–100) or "answer_logprob" (mean normalised log-probability
            of the answer, nats).
        base_dir: folder for relative image paths (default: the JSONL file's folder).

    Attributes:
        items: the validated items; fingerprint: sha256 over items, image bytes and metric (used by
        :func:`~kawhi_kernels.heads.ablation.ablate_heads` to recognise the run).
    """

    def __init__(self, dataset, *, processor=None, metric: str = "accuracy", base_dir: str | Path | None = None):
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
        if isinstance(dataset, (str, Path)):
            self.items = load_multiple_choice(dataset)
            base_dir = Path(dataset).parent if base_dir is None else base_dir
        elif isinstance(dataset, list) and dataset:
            self.items = [_validate_item(item, f"dataset: item {i}") for i, item in enumerate(dataset)]
        else:
            raise TypeError(f"dataset: expected a JSONL path or a non-empty list of items, got {type(dataset).__name__}")
        self.processor = processor
        self.metric = metric
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(f"multiple-choice|{self.metric}|".encode())
        digest.update(json.dumps(self.items, sort_keys=True).encode())
        for item in self.items:
            if "image" in item:
                path = Path(item["image"])
                if not path.is_absolute() and self.base_dir is not None:
                    path = self.base_dir / path
                if path.is_file():
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
        return f"multiple_choice:{self.metric}:{digest.hexdigest()}"

    def choice_logprobs(self, model, index: int) -> torch.Tensor:
        """float64 [C]: summed log-probability of each choice of item ``index`` after its prompt."""
        inputs, prompt_len, lengths = encode_item(model, self.items[index], processor=self.processor,
                                                  base_dir=self.base_dir, index=index)
        keep = inputs["input_ids"].shape[1] - prompt_len + 1      # logits at positions P-1 … L-1
        extra = {"logits_to_keep": keep} if "logits_to_keep" in _forward_params(model) else {}
        if "use_cache" in _forward_params(model):
            extra["use_cache"] = False
        with torch.no_grad():
            logits = model(**inputs, **extra).logits[:, -keep:-1].double()
        logp = torch.log_softmax(logits, dim=-1)                      # [C, Lc, V]
        targets = inputs["input_ids"][:, prompt_len:]
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        valid = torch.arange(targets.shape[1], device=targets.device)[None, :] < \
            torch.tensor(lengths, device=targets.device)[:, None]
        return (token_logp * valid).sum(dim=1).cpu()

    def __call__(self, model) -> float:
        correct, logprob = 0, 0.0
        for index, item in enumerate(self.items):
            scores = self.choice_logprobs(model, index)
            answer = item["answer"]
            correct += int(int(scores.argmax()) == answer)
            logprob += float(scores[answer] - torch.logsumexp(scores, dim=0))
        if self.metric == "accuracy":
            return 100.0 * correct / len(self.items)
        return logprob / len(self.items)
