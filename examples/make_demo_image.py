"""Regenerate the bundled demo chart (kawhi_kernels/data/rainfall_chart.png).

Run once; the PNG is committed so the demo never depends on matplotlib's fonts at run time.
The image is exactly 448 × 336 px: a 12 × 16 grid of 28-px Qwen2.5-VL tokens.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
RAINFALL_MM = [78, 52, 95, 41, 63, 120]


def main(path: Path = Path(__file__).resolve().parents[1] / "kawhi_kernels/data/rainfall_chart.png") -> None:
    fig = plt.figure(figsize=(4.48, 3.36), dpi=100)
    ax = fig.add_axes([0.14, 0.14, 0.82, 0.74])
    bars = ax.bar(MONTHS, RAINFALL_MM, color=["#4c72b0"] * 5 + ["#dd8452"])
    for bar, value in zip(bars, RAINFALL_MM):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 2, str(value), ha="center", fontsize=8)
    ax.set_ylim(0, 140)
    ax.set_ylabel("Rainfall (mm)")
    ax.set_title("Monthly rainfall, 2025")
    ax.spines[["top", "right"]].set_visible(False)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
