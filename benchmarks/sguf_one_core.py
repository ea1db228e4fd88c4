"""SGUF on one CPU core: ``select_key_regions`` vs the straightforward scikit-image/SciPy pipeline.

A dataloader worker usually owns one core, so both sides run pinned to a single core with one
thread each (torch, OpenMP/BLAS), interleaved image by image in the same process so that load
from other processes hits both alike. The baseline is ``kawhi_kernels.bench.baselines.sguf_numpy``:
``rgb2lab`` -> ``gaussian_filter`` (reflect, truncate 4) -> ``sobel`` x/y -> patch-mean structure
tensor -> eigenvalues -> scipy connected components -> energies, key regions, sampling (float64).
Ours is ``select_key_regions(image, grid)`` with its defaults (float32 descriptors, C++ union-find
when the extension imports). The table gives the median and the minimum per image, the ratio of
the medians, the median of the ratios of back-to-back pairs (the two calls of a pair see about
the same load from other processes, so this is the steadier number on a shared machine), and
where our time goes (``--stages``).

    python benchmarks/sguf_one_core.py [--rounds 15] [--stages] [--markdown FILE]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/scipy/torch load their thread pools

import argparse
import datetime
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

# (name, grid (gh, gw), patch P): 1008 x 1008 is Qwen2.5-VL's 36 x 36 grid of 28-px patches.
IMAGES = [("1008x1008-p28", (36, 36), 28), ("1024x1024-p32", (32, 32), 32)]


def _pin_to_one_core() -> str:
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def _images(grid, patch, count):
    from PIL import Image
    from skimage import data

    from kawhi_kernels.bench.inputs import synthetic_image

    gh, gw = grid
    photo = np.array(Image.fromarray(data.astronaut()).resize((gw * patch, gh * patch), Image.BILINEAR))
    return [photo] + [synthetic_image(grid, patch, seed) for seed in range(count - 1)]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stage_times(image: np.ndarray, grid, rounds: int) -> list[tuple[str, float]]:
    """Median ms of each stage of our CPU path on ``image`` (a copy of the steps of
    ``descriptors_cpu._descriptors_one``, on the same workspace buffers, then the rest of the op)."""
    from kawhi_kernels.regions import descriptors_cpu as cpu
    from kawhi_kernels.regions.descriptors import (
        _patch_mean,
        gaussian_kernel1d,
        structure_eigenvalues,
    )
    from kawhi_kernels.regions.sguf import key_regions_from_descriptors

    dtype = torch.float32
    h, w = image.shape[:2]
    p = h // grid[0]
    kernel = gaussian_kernel1d(1.0).tolist()
    r = len(kernel) // 2
    ws = cpu._Workspace()
    state = {}

    def tensor(name, shape):
        return torch.from_numpy(ws.get(name, shape, np.float32))

    def lum():
        state["y"] = cpu._luminance(image, dtype, ws)

    def light():
        buf = ws.get("c", (h + 2 * r, w + 2 * r), np.float32)
        cpu._lightness_into(buf[r:r + h, r:r + w], state["y"], ws)
        cpu._fill_rim(buf, h, w, r)
        state["L"] = torch.from_numpy(buf)

    def gauss():
        rows = tensor("b", (h, w + 2 * r))
        cpu._correlate_valid(state["L"], kernel, -2, rows)
        s = tensor("a", (h + 2, w + 2))
        cpu._correlate_valid(rows, kernel, -1, s[1:h + 1, 1:w + 1])
        cpu._fill_rim(s.numpy(), h, w, 1)
        state["S"] = s

    def sobel():
        s = state["S"]
        gx, gy = tensor("c", (h, w)), tensor("d", (h, w))
        cpu._correlate_valid(torch.sub(s[:, 2:], s[:, :-2], out=tensor("b", (h + 2, w))),
                             [1.0, 2.0, 1.0], -2, gx)
        cpu._correlate_valid(torch.sub(s[2:, :], s[:-2, :], out=tensor("b", (h, w + 2))),
                             [1.0, 2.0, 1.0], -1, gy)
        state["g"] = gx, gy

    def means():
        gx, gy = state["g"]
        prod = tensor("b", (h, w))
        j = [_patch_mean(torch.mul(a, b, out=prod), grid, p) for a, b in ((gx, gx), (gx, gy), (gy, gy))]
        interior = tensor("b", (h, w)).copy_(state["S"][1:h + 1, 1:w + 1])
        state["d"] = (*structure_eigenvalues(*j), _patch_mean(interior, grid, p))

    def regions():
        key_regions_from_descriptors(*state["d"], grid, generator=torch.Generator().manual_seed(0))

    stages = [("luminance Y (2 table lookups)", lum), ("lightness L (cbrt) + reflect pad", light),
              ("Gaussian (separable, valid)", gauss), ("Sobel x/y", sobel),
              ("products, patch means, eigenvalues", means),
              ("union-find, energies, sampling", regions)]
    times = {name: [] for name, _ in stages}
    for i in range(rounds + 1):
        for name, fn in stages:
            t = _time(fn)
            if i:
                times[name].append(t)
    return [(name, 1e3 * statistics.median(times[name])) for name, _ in stages]


def _versions() -> str:
    import scipy
    import skimage

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"commit {commit}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-image {skimage.__version__}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed passes over the images")
    ap.add_argument("--images", type=int, default=4, help="images per size (a photo + synthetic)")
    ap.add_argument("--stages", action="store_true", help="also time our stages one by one")
    ap.add_argument("--markdown", help="write the table (with machine and versions) to this file")
    args = ap.parse_args(argv)

    from kawhi_kernels._extension import load_extension
    from kawhi_kernels.bench.baselines import sguf_numpy
    from kawhi_kernels.regions.sguf import select_key_regions

    pinned = _pin_to_one_core()
    union_find = "C++" if load_extension() is not None else "NumPy fallback"
    lines = [("| image | grid | scikit-image/SciPy ms (median / min) | select_key_regions ms "
              "(median / min) | speed-up (medians) | speed-up (median of paired runs) | "
              "labels as the fp64 baseline |"),
             "|---|---|---|---|---|---|---|"]
    for name, grid, patch in IMAGES:
        images = _images(grid, patch, args.images)
        tensors = [torch.from_numpy(im) for im in images]
        base_t, ours_t = [], []
        for rnd in range(args.rounds + 1):  # round 0 warms both up
            for i, (im, t) in enumerate(zip(images, tensors)):
                b = _time(lambda im=im, i=i, grid=grid: sguf_numpy(im, grid, rng=np.random.default_rng(i)))
                o = _time(lambda t=t, i=i, grid=grid: select_key_regions(
                    t, grid, generator=torch.Generator().manual_seed(i)))
                if rnd:
                    base_t.append(b)
                    ours_t.append(o)
        same = sum(int(np.array_equal(select_key_regions(t, grid).labels.numpy(),
                                      sguf_numpy(im, grid)["labels"])) for im, t in zip(images, tensors))
        mb, mo = statistics.median(base_t), statistics.median(ours_t)
        lines.append(f"| {name} | {grid[0]}x{grid[1]} | {1e3 * mb:.1f} / {1e3 * min(base_t):.1f} | "
                     f"{1e3 * mo:.2f} / {1e3 * min(ours_t):.2f} | {mb / mo:.1f}x | "
                     f"{statistics.median(b / o for b, o in zip(base_t, ours_t)):.1f}x | "
                     f"{same}/{len(images)} images |")
    header = (f"{datetime.date.today().isoformat()}, {platform.machine()} "
              f"({os.cpu_count()} logical CPUs, {pinned}, 1 thread), {_versions()}, "
              f"union-find: {union_find}; {args.rounds} rounds x {args.images} images per size")
    out = [header, "", *lines]
    if args.stages:
        name, grid, patch = IMAGES[0]
        out += ["", f"Our stages on the {name} photo (median ms of {args.rounds} rounds):", "",
                "| stage | ms |", "|---|---|"]
        out += [f"| {stage} | {ms:.2f} |" for stage, ms in _stage_times(_images(grid, patch, 1)[0],
                                                                        grid, args.rounds)]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
