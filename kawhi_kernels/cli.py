"""Command line: ``kawhi-kernels demo | info | bench | heads``."""
from __future__ import annotations

import argparse
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


def info(_: argparse.Namespace) -> int:
    """Print versions, devices and which backends can run where."""
    import torch

    from . import __version__
    from ._backend import available_backends
    from ._extension import extension_info

    print(f"kawhi_kernels {__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    for module in ("torch", "triton", "transformers", "numpy"):
        print(f"{module:<13} {_version(module)}")
    print(f"torch CUDA    {torch.version.cuda or 'none (CPU build)'}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"GPU {i}         {torch.cuda.get_device_name(i)}")
        devices.append(torch.device("cuda", 0))
    else:
        print("GPU           none visible to torch")
    ext = extension_info()
    if not ext["available"]:
        print("native build  none loaded")
    else:
        build = ext["build_info"] or {}
        cuda = (f"CUDA {build.get('cuda')} ({', '.join(build.get('archs') or [])})"
                if ext["has_cuda"] else "no CUDA")
        print(f"native build  {ext['distribution']}: {ext['module']}, {cuda}, "
              f"built with {build.get('compiler')}")
        if ext.get("cuda_problem"):
            print(f"              {ext['cuda_problem']}")
    for cand in ext["candidates"]:
        if cand.status == "not tried" or cand.module == ext["module"]:
            continue  # the loaded one is described above
        print(f"  {cand.distribution:<29} {cand.status}{': ' + cand.reason if cand.reason else ''}")
    for device in devices:
        print(f"backends on {device}:")
        for name, reason in available_backends(device).items():
            print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        run_demo(device=args.device, out_dir=args.out, seed=args.seed)
    except RuntimeError as exc:
        if not str(exc).startswith("--device"):
            raise
        print(f"kawhi-kernels demo: {exc}", file=sys.stderr)
        return 2
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench.cli import run_bench_cli

    return run_bench_cli(args.bench_args)


def heads(args: argparse.Namespace) -> int:
    from .heads.cli import run_heads_cli

    return run_heads_cli(args.heads_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kawhi-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="run one KAWHI step on the bundled chart example")
    p_demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p_demo.add_argument("--out", default="kawhi-demo-out", help="output folder for the PNG and JSON")
    p_demo.add_argument("--seed", type=int, default=0, help="seed for the tiny model and sampling")
    p_demo.set_defaults(func=demo)

    p_info = sub.add_parser("info", help="versions, devices and available backends")
    p_info.set_defaults(func=info)

    p_bench = sub.add_parser("bench", help="benchmark sweep (see `kawhi-kernels bench --help`)",
                             add_help=False)
    p_bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    p_bench.set_defaults(func=bench)

    p_heads = sub.add_parser("heads", help="vision-critical heads: presets, profile, ablation",
                             add_help=False)
    p_heads.add_argument("heads_args", nargs=argparse.REMAINDER)
    p_heads.set_defaults(func=heads)
    return parser


PASSTHROUGH = {"bench": "bench_args", "heads": "heads_args"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH:
        # Sub-tools parse their own flags (including --help), which argparse's REMAINDER would
        # reject when they come first.
        args = parser.parse_args(argv[:1])
        setattr(args, PASSTHROUGH[argv[0]], argv[1:])
    else:
        args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
