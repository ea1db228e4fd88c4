"""``kawhi-kernels heads``: vision-critical head presets, attention-mass profiles, head ablation.

    kawhi-kernels heads presets
    kawhi-kernels heads profile --model tiny-qwen2.5-vl|<local path> --out DIR [--dataset file.jsonl]
    kawhi-kernels heads ablate  --model ... --dataset file.jsonl --results file.jsonl [--threshold T]

``--model``: ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl`` or ``tiny-qwen3-vl`` build a tiny random model
(nothing downloaded; ``--seed`` fixes its weights); anything else is a local checkpoint folder,
loaded with ``from_pretrained(local_files_only=True)`` (its processor too, when the dataset has
``text`` items). Datasets use the multiple-choice JSONL format of
:mod:`kawhi_kernels.heads.scoring`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["run_heads_cli", "build_parser", "load_model"]

TINY_MODELS = {
    "tiny-qwen2-vl": "tiny_qwen2_vl",
    "tiny-qwen2.5-vl": "tiny_qwen2_5_vl",
    "tiny-qwen3-vl": "tiny_qwen3_vl",
}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(name: str, *, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
               seed: int = 0):
    """The model (eval mode, on ``device``) for a tiny model name or a local checkpoint folder.

    ``dtype`` "auto": float32 on CPU and for tiny models, bfloat16 for checkpoints on GPU."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype!r}")
    dev = _device(device)
    if name in TINY_MODELS:
        from ..integrations import tiny_models

        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        builder = getattr(tiny_models, TINY_MODELS[name])
        return builder(seed=seed, attn_implementation=attn_implementation, dtype=torch_dtype).to(dev)
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"--model: {name!r} is neither a tiny model ({', '.join(TINY_MODELS)}) nor a local "
                         "checkpoint folder (nothing is downloaded)")
    from transformers import AutoModelForImageTextToText

    torch_dtype = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation)
    return model.to(dev).eval()


def _load_processor(name: str):
    if name in TINY_MODELS:
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name, local_files_only=True)


def _needs_processor(items) -> bool:
    return any("text" in item for item in items)


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_layers(text: str):
    return "all" if text == "all" else _parse_int_list(text)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"{' | '.join(TINY_MODELS)} | path of a local checkpoint folder")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="model dtype (default: auto)")
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="text attention implementation: eager | sdpa | flash_attention_2 (default: sdpa)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of tiny models (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kawhi-kernels heads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    sub.add_parser("presets", help="print the known vision-critical head presets")

    p_prof = sub.add_parser("profile", help="attention mass on image tokens per (layer, head)")
    _add_model_args(p_prof)
    p_prof.add_argument("--out", required=True, help="output folder (CSV, Markdown, JSON, heatmap PNG)")
    p_prof.add_argument("--dataset", default=None,
                        help="multiple-choice JSONL; query rows = the answer tokens after each prompt "
                             "(default: synthetic image+text batches, query rows = text after the image)")
    p_prof.add_argument("--num-batches", type=int, default=4, help="synthetic batches (default: 4)")
    p_prof.add_argument("--layers", type=_parse_layers, default="all", help="'all' or e.g. '0,5,-1'")
    p_prof.add_argument("--backend", default="auto", help="attention_mass backend (default: auto)")
    p_prof.add_argument("--top", type=int, default=10, help="heads printed (default: 10)")
    p_prof.add_argument("--no-plot", action="store_true", help="skip the heatmap PNG")
    p_prof.add_argument("--no-progress", action="store_true", help="no progress bar")

    p_abl = sub.add_parser("ablate", help="mask each head in every layer and measure the score drop")
    _add_model_args(p_abl)
    p_abl.add_argument("--dataset", required=True, help="multiple-choice JSONL (see kawhi_kernels.heads.scoring)")
    p_abl.add_argument("--results", required=True, help="JSONL results file; rerun with it to resume")
    p_abl.add_argument("--threshold", type=float, default=0.0,
                       help="select heads whose score drop exceeds this (default: 0; the paper uses 100 MME points)")
    p_abl.add_argument("--metric", default="accuracy", choices=("accuracy", "answer_logprob"),
                       help="accuracy (percent) or answer_logprob (nats) (default: accuracy)")
    p_abl.add_argument("--heads", type=_parse_int_list, default=None, help="heads to test, e.g. '0,1,2' (default: all)")
    p_abl.add_argument("--plot", default=None, help="optional PNG bar chart of the drops")
    p_abl.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _presets() -> int:
    from .presets import PRESETS

    width = max(len(name) for name in PRESETS)
    print(f"{'preset':<{width}}  vision-critical query heads")
    for name, heads in sorted(PRESETS.items()):
        print(f"{name:<{width}}  {', '.join(str(h) for h in heads)}")
    return 0


def _dataset_batches(model, items, processor, base_dir):
    """One batch per item: prompt + the correct answer; query rows = the answer tokens."""
    import torch

    from .scoring import encode_item

    for index, item in enumerate(items):
        inputs, prompt_len, lengths = encode_item(model, item, processor=processor, choices=[item["answer"]],
                                                  base_dir=base_dir, index=index)
        mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        mask[:, prompt_len:prompt_len + lengths[0]] = True
        inputs["query_mask"] = mask
        yield inputs


def _synthetic_batches(model, num_batches: int, seed: int):
    from ..integrations.tiny_models import tiny_vl_inputs

    for b in range(num_batches):
        yield tiny_vl_inputs(model, images_per_sample=(1, 2, 1), text_lens=(8, 5, 11), seed=seed + 1 + b)


def _profile(args) -> int:
    from .profile import profile_heads
    from .scoring import load_multiple_choice

    if args.num_batches < 1:
        raise ValueError(f"--num-batches: expected a positive int, got {args.num_batches}")
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                          attn_implementation=args.attn_implementation, seed=args.seed)
    if args.dataset is not None:
        items = load_multiple_choice(args.dataset)
        processor = _load_processor(args.model) if _needs_processor(items) else None
        batches = list(_dataset_batches(model, items, processor, Path(args.dataset).parent))
        source = f"dataset {args.dataset}"
    else:
        if args.model not in TINY_MODELS:
            print("note: no --dataset given; profiling on synthetic random image+text inputs", file=sys.stderr)
        batches = list(_synthetic_batches(model, args.num_batches, args.seed))
        source = f"{args.num_batches} synthetic batches"
    profile = profile_heads(model, batches, layers=args.layers, backend=args.backend, model_name=args.model,
                            progress=not args.no_progress)
    profile.meta["source"] = source
    paths = profile.save(args.out, plot=not args.no_plot)
    print(profile.to_markdown(top=min(args.top, profile.num_heads)))
    print(f"top heads by image mass: {profile.top(min(args.top, profile.num_heads))}")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def _ablate(args) -> int:
    from .ablation import ablate_heads
    from .scoring import MultipleChoiceScorer, load_multiple_choice

    items = load_multiple_choice(args.dataset)
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                          attn_implementation=args.attn_implementation, seed=args.seed)
    processor = _load_processor(args.model) if _needs_processor(items) else None
    scorer = MultipleChoiceScorer(args.dataset, processor=processor, metric=args.metric)
    result = ablate_heads(model, scorer, heads=args.heads, threshold=args.threshold, results_path=args.results,
                          fingerprint={"dtype": str(next(model.parameters()).dtype)},
                          progress=not args.no_progress)
    print(result.to_markdown())
    print(json.dumps({"baseline": result.baseline, "threshold": result.threshold, "selected": result.selected}))
    print(f"results: {args.results}")
    if args.plot:
        from .plots import plot_ablation

        print(f"wrote plot: {plot_ablation(result, args.plot)}")
    return 0


def run_heads_cli(argv: list[str]) -> int:
    """Entry point of ``kawhi-kernels heads``; returns the exit code (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:          # --help or a usage error
        return int(exc.code or 0)
    try:
        if args.action == "presets":
            return _presets()
        if args.action == "profile":
            return _profile(args)
        return _ablate(args)
    except (ValueError, TypeError) as exc:
        print(f"kawhi-kernels heads {args.action}: error: {exc}", file=sys.stderr)
        return 1
