"""Benchmark shapes: head configurations and the named shapes of every op, quick (CPU) and full (GPU).

Every shape has a unique ``name`` (what ``--shapes`` filters on, by regular expression) and a
``family`` (the axis it belongs to: the "seq" family of ``attention_mass`` is what the time and
memory plots draw against sequence length). Full-sweep shapes vary one axis at a time around the
DESIGN.md target shape (8 sequences of 4k tokens, 1k image tokens, 2k response rows).

Synthetic sequence layout (see :mod:`kawhi_kernels.bench.inputs`): ``prefix`` text tokens, the
image tokens (``grid`` in raster order), more text, and the last ``rows`` tokens are the response
rows (the query rows); keys are all ``seq_len`` tokens of the sequence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

OPS = ("attention_mass", "cosine_alignment", "sguf", "kawhi_step", "grid_pyramid")


@dataclass(frozen=True)
class HeadConfig:
    """Attention head layout: Hq query heads, Hk KV heads, head dim D, and the vision-critical
    head preset name (``kawhi_kernels.heads.presets``) or None."""

    name: str
    hq: int
    hk: int
    d: int
    preset: str | None = None

    @property
    def label(self) -> str:
        return f"{self.hq}/{self.hk}/{self.d}"


HEAD_CONFIGS = {
    "qwen2.5-vl-7b": HeadConfig("qwen2.5-vl-7b", 28, 4, 128, "qwen2.5-vl-7b"),
    "qwen3-vl-4b": HeadConfig("qwen3-vl-4b", 32, 8, 128, "qwen3-vl-4b"),
    # flash-colreduce's published benchmark shapes use 32 heads of dim 128 without GQA.
    "mha-32": HeadConfig("mha-32", 32, 32, 128, None),
}

REGION_MODES = ("16", "64", "patch", "key")


@dataclass(frozen=True)
class AttentionShape:
    """A packed ``attention_mass`` problem.

    batch sequences of ``seq_len`` keys; the last ``rows`` tokens of each are query rows; an image
    of ``grid`` (gh, gw) tokens starts after ``prefix`` text tokens. ``regions``: "16" / "64"
    (coarse cells of the image grid, 4x4 / 8x8), "patch" (one region per image token) or "key"
    (every key its own region: attention column sums). ``segments``: 0 = per-row output,
    n > 0 = n paragraph segments per sequence (rows of a segment summed).
    """

    name: str
    family: str
    batch: int
    seq_len: int
    rows: int
    grid: tuple[int, int]
    regions: str
    heads: str = "qwen2.5-vl-7b"
    segments: int = 0
    causal: bool = True
    prefix: int = 16

    def __post_init__(self):
        if self.regions not in REGION_MODES:
            raise ValueError(f"regions: expected one of {REGION_MODES}, got {self.regions!r}")
        if self.heads not in HEAD_CONFIGS:
            raise ValueError(f"heads: expected one of {sorted(HEAD_CONFIGS)}, got {self.heads!r}")
        if min(self.batch, self.seq_len, self.rows) < 1 or self.rows > self.seq_len:
            raise ValueError(f"{self.name}: need batch, seq_len, rows >= 1 and rows <= seq_len")
        if self.regions != "key" and self.prefix + self.image_tokens + self.rows > self.seq_len:
            raise ValueError(f"{self.name}: prefix + image tokens + rows = "
                             f"{self.prefix + self.image_tokens + self.rows} exceeds seq_len {self.seq_len}")

    @property
    def head_config(self) -> HeadConfig:
        return HEAD_CONFIGS[self.heads]

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def output_label(self) -> str:
        return "rows" if self.segments == 0 else f"segments:{self.segments}/seq"

    def columns(self) -> dict:
        """Shape columns of a results row."""
        return dict(shape=self.name, batch=self.batch, seq_len=self.seq_len, rows=self.rows,
                    image_tokens=self.image_tokens if self.regions != "key" else "",
                    regions=self.regions, output=self.output_label, heads=self.head_config.label,
                    causal=self.causal)


@dataclass(frozen=True)
class CosineShape:
    """A packed ``cosine_alignment`` problem (same layout as :class:`AttentionShape`).

    ``regions``: "1" (KAWHI: the SGUF-selected image tokens, a random ``select_fraction`` of them,
    form region 0) or "patch" (one region per image token). Heads: the vision-critical preset of
    the head configuration.
    """

    name: str
    family: str
    batch: int
    seq_len: int
    rows: int
    grid: tuple[int, int]
    regions: str = "1"
    heads: str = "qwen2.5-vl-7b"
    select_fraction: float = 0.5
    prefix: int = 16

    def __post_init__(self):
        if self.regions not in ("1", "patch"):
            raise ValueError(f"regions: expected '1' or 'patch', got {self.regions!r}")
        if self.prefix + self.image_tokens + self.rows > self.seq_len:
            raise ValueError(f"{self.name}: prefix + image tokens + rows exceeds seq_len")

    @property
    def head_config(self) -> HeadConfig:
        return HEAD_CONFIGS[self.heads]

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def columns(self) -> dict:
        return dict(shape=self.name, batch=self.batch, seq_len=self.seq_len, rows=self.rows,
                    image_tokens=self.image_tokens, regions=self.regions, output="rows",
                    heads=self.head_config.label, causal="")


@dataclass(frozen=True)
class SgufShape:
    """One image of ``grid`` (gh, gw) tokens of ``patch`` x ``patch`` pixels (28: Qwen2.5-VL,
    32: Qwen3-VL)."""

    name: str
    family: str
    grid: tuple[int, int]
    patch: int = 28

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def columns(self) -> dict:
        gh, gw = self.grid
        return dict(shape=self.name, batch=1, seq_len="", rows="", image_tokens=self.image_tokens,
                    regions="sguf", output=f"{gh * self.patch}x{gw * self.patch}px", heads="",
                    causal="")


@dataclass(frozen=True)
class GridShape:
    """``grid_pyramid`` of ``lead`` rows of per-token values (e.g. response rows x vision heads
    of an ``attention_mass`` with one region per image token) over images ``grids`` (t, h, w),
    ``levels`` cell sizes 1, 2, ..., 2^(levels - 1)."""

    name: str
    family: str
    grids: tuple[tuple[int, int, int], ...]
    lead: int
    levels: int = 3

    @property
    def image_tokens(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)

    def columns(self) -> dict:
        return dict(shape=self.name, batch=len(self.grids), seq_len="", rows=self.lead,
                    image_tokens=self.image_tokens, regions="grid",
                    output=f"{self.levels} levels", heads="", causal="")


@dataclass(frozen=True)
class KawhiShape:
    """One KAWHI step on a random Qwen2.5-VL: ``batch`` responses (G) to one image prompt.

    ``model``: "tiny" (the tests' tiny model: hidden 64, Hq 4, Hk 2, D 16) or "7b-width" (2
    decoder layers with Qwen2.5-VL-7B's text widths: hidden 3584, Hq 28, Hk 4, D 128,
    intermediate 18944). ``grid``: LLM image-token grid; ``response_len`` tokens per response in
    ``paragraphs`` paragraphs; ``question_len`` text tokens between image and response.
    """

    name: str
    family: str
    batch: int
    grid: tuple[int, int]
    response_len: int
    paragraphs: int = 4
    question_len: int = 32
    model: str = "tiny"

    def __post_init__(self):
        if self.model not in ("tiny", "7b-width"):
            raise ValueError(f"model: expected 'tiny' or '7b-width', got {self.model!r}")

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        # prefix (2 text tokens) + vision_start + image + vision_end + question + response
        return 2 + 1 + self.image_tokens + 1 + self.question_len + self.response_len

    def columns(self) -> dict:
        heads = {"tiny": "4/2/16", "7b-width": "28/4/128"}[self.model]
        return dict(shape=self.name, batch=self.batch, seq_len=self.seq_len, rows=self.response_len,
                    image_tokens=self.image_tokens, regions="sguf", output=f"model:{self.model}",
                    heads=heads, causal=True)


# ----------------------------------------------------------------------------- shape lists

def _quick_attention() -> list[AttentionShape]:
    return [
        AttentionShape("q-am-L256-r16", "seq", 2, 256, 64, (8, 8), "16"),
        AttentionShape("q-am-L512-r16", "seq", 2, 512, 64, (8, 8), "16"),
        AttentionShape("q-am-L256-patch", "regions", 2, 256, 64, (8, 8), "patch"),
        AttentionShape("q-am-L256-r16-seg4", "segments", 2, 256, 64, (8, 8), "16", segments=4),
        AttentionShape("q-am-colsum-256", "colsum", 1, 256, 256, (0, 0), "key", heads="mha-32",
                       segments=1, causal=False),
    ]


def _full_attention() -> list[AttentionShape]:
    t = dict(batch=8, seq_len=4096, rows=2048, grid=(32, 32), regions="64")
    shapes = [
        AttentionShape("am-target-7b", "target", **t),
        AttentionShape("am-target-4b", "heads", **{**t}, heads="qwen3-vl-4b"),
        AttentionShape("am-target-r16", "regions", **{**t, "regions": "16"}),
        AttentionShape("am-target-patch", "regions", **{**t, "regions": "patch"}),
        AttentionShape("am-target-seg16", "segments", **t, segments=16),
    ]
    for seq_len in (1024, 2048, 4096, 8192, 16384):
        shapes.append(AttentionShape(f"am-seq-L{seq_len}", "seq", 8, seq_len, 512, (16, 16), "64"))
    for rows in (256, 1024):
        shapes.append(AttentionShape(f"am-rows-{rows}", "rows", **{**t, "rows": rows}))
    for gh in (16, 50):
        shapes.append(AttentionShape(f"am-image-{gh * gh}", "image",
                                     **{**t, "rows": 1024, "grid": (gh, gh)}))
    # flash-colreduce's published column-sum shapes (32 heads, D 128): every key is a region and
    # all rows form one segment, so the output is the per-head attention column sum.
    shapes.append(AttentionShape("am-colsum-16kx16k", "colsum", 1, 16384, 16384, (0, 0), "key",
                                 heads="mha-32", segments=1, causal=False))
    shapes.append(AttentionShape("am-colsum-512x256k", "colsum", 1, 262144, 512, (0, 0), "key",
                                 heads="mha-32", segments=1, causal=True))
    return shapes


def _quick_cosine() -> list[CosineShape]:
    return [
        CosineShape("q-cos-L256-r1", "target", 2, 256, 64, (8, 8), "1"),
        CosineShape("q-cos-L256-patch", "regions", 2, 256, 64, (8, 8), "patch"),
    ]


def _full_cosine() -> list[CosineShape]:
    return [
        CosineShape("cos-target-7b", "target", 8, 4096, 2048, (32, 32), "1"),
        CosineShape("cos-target-4b", "heads", 8, 4096, 2048, (32, 32), "1", heads="qwen3-vl-4b"),
        CosineShape("cos-target-patch", "regions", 8, 4096, 2048, (32, 32), "patch"),
        CosineShape("cos-image-2500", "image", 8, 4096, 1024, (50, 50), "1"),
    ]


def _quick_sguf() -> list[SgufShape]:
    return [SgufShape("q-sguf-8x8", "image", (8, 8), 28)]


def _full_sguf() -> list[SgufShape]:
    return [
        SgufShape("sguf-16x16-p28", "image", (16, 16), 28),
        SgufShape("sguf-32x32-p28", "image", (32, 32), 28),
        SgufShape("sguf-50x50-p28", "image", (50, 50), 28),
        SgufShape("sguf-32x32-p32", "image", (32, 32), 32),
    ]


def _quick_kawhi() -> list[KawhiShape]:
    return [KawhiShape("q-kawhi-tiny", "model", 2, (4, 4), 48, paragraphs=3, question_len=8)]


def _full_kawhi() -> list[KawhiShape]:
    return [
        KawhiShape("kawhi-7b-width", "model", 4, (32, 32), 1024, paragraphs=8, model="7b-width"),
        KawhiShape("kawhi-tiny", "model", 5, (16, 16), 512),
    ]


def _quick_grid() -> list[GridShape]:
    return [GridShape("q-gp-2img", "grids", ((1, 8, 8), (2, 4, 6)), 16, 3)]


def _full_grid() -> list[GridShape]:
    return [
        # 2048 response rows x 9 vision heads over one 32 x 32 image (the target shape's regions)
        GridShape("gp-target-1img", "target", ((1, 32, 32),), 2048 * 9, 3),
        GridShape("gp-multi-img", "grids", ((1, 36, 28), (1, 18, 24), (2, 7, 13)), 4096, 4),
        GridShape("gp-video", "grids", ((8, 16, 16),), 2048, 4),
        GridShape("gp-large-frame", "grids", ((1, 128, 96),), 1024, 6),   # stripped by CUDA
    ]


_SHAPES = {
    ("attention_mass", True): _quick_attention, ("attention_mass", False): _full_attention,
    ("cosine_alignment", True): _quick_cosine, ("cosine_alignment", False): _full_cosine,
    ("sguf", True): _quick_sguf, ("sguf", False): _full_sguf,
    ("kawhi_step", True): _quick_kawhi, ("kawhi_step", False): _full_kawhi,
    ("grid_pyramid", True): _quick_grid, ("grid_pyramid", False): _full_grid,
}


def shapes_for(op: str, quick: bool) -> list:
    """The shapes of ``op`` ("attention_mass", "cosine_alignment", "sguf", "kawhi_step",
    "grid_pyramid") for the
    quick (tiny, CPU) or the full (GPU) sweep, most important first."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    return _SHAPES[(op, bool(quick))]()


def filter_shapes(shapes: Iterable, pattern: str | None) -> list:
    """Shapes whose name matches the regular expression ``pattern`` (``re.search``); all if None."""
    shapes = list(shapes)
    if pattern is None:
        return shapes
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"shapes: invalid regular expression {pattern!r}: {exc}") from None
    return [s for s in shapes if regex.search(s.name)]


def parse_ops(text: str | None) -> list[str]:
    """``"attention_mass,sguf"`` → ["attention_mass", "sguf"] (all ops for None/"all")."""
    if text is None or text.strip() in ("", "all"):
        return list(OPS)
    ops = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; expected a comma list of {list(OPS)}")
    return ops
