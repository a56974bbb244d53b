"""The demo's report: the table over seeds, the dev-accuracy plot and the loss-landscape figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("test_accuracy", "test_loss", "dev_accuracy", "top_eigenvalue", "hessian_trace")
LABELS = {"fft": "FFT", "fft_best": "FFT-best", "mft": "MFT", "continued_fft": "continued FFT", "lora": "LoRA",
          "mft_on_lora": "MFT on LoRA", "random_mask": "random mask", "magnitude_mask": "magnitude mask",
          "wanda_mask": "Wanda mask"}
COLORS = {"fft": "tab:blue", "fft_best": "tab:blue", "mft": "tab:green", "continued_fft": "tab:orange",
          "lora": "tab:brown", "mft_on_lora": "tab:olive", "random_mask": "tab:red", "magnitude_mask": "tab:purple",
          "wanda_mask": "tab:gray"}


def summarize(per_seed: list[dict]) -> dict:
    """{arm: {metric: {mean, std, values}}} over seeds (std with ddof 1; 0 for one seed)."""
    table = {}
    for arm in per_seed[0]["arms"]:
        rows = [r["arms"][arm] for r in per_seed]
        table[arm] = {}
        for metric in [m for m in METRICS if all(m in row for row in rows)]:
            values = np.asarray([row[metric] for row in rows], np.float64)
            table[arm][metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
                                  else 0.0, "values": values.tolist()}
    return table


def format_table(table: dict, seeds: int) -> str:
    pm = " +- std" if seeds > 1 else ""
    lines = [f"{'arm':<16} {'test acc' + pm:>20} {'test loss' + pm:>20} {'dev acc':>9} {'top eig':>9} {'trace':>10}"]
    for arm, metrics in table.items():
        acc, loss, dev = (metrics[k] for k in ("test_accuracy", "test_loss", "dev_accuracy"))
        acc_s = f"{acc['mean']:.3f}" + (f" +- {acc['std']:.3f}" if seeds > 1 else "")
        loss_s = f"{loss['mean']:.4f}" + (f" +- {loss['std']:.4f}" if seeds > 1 else "")
        sharp = "".join(f" {metrics[k]['mean']:>{w}.3g}" if k in metrics else f" {'-':>{w}}"
                        for k, w in (("top_eigenvalue", 9), ("hessian_trace", 10)))
        lines.append(f"{arm:<16} {acc_s:>20} {loss_s:>20} {dev['mean']:>9.3f}{sharp}")
    return "\n".join(lines)


def plot(per_seed: list[dict], table: dict, path: Path) -> None:
    """Dev accuracy along each trained arm's steps; the untrained baselines as dashed lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, result in enumerate(per_seed):
        for arm, curve in result["curves"].items():
            steps, accs = zip(*curve)
            ax.plot(steps, accs, color=COLORS[arm], alpha=0.9 if i == 0 else 0.35, marker="o", markersize=3,
                    label=LABELS[arm] if i == 0 else None)
    for arm in ("random_mask", "magnitude_mask", "wanda_mask"):
        if arm in table:
            ax.axhline(table[arm]["dev_accuracy"]["mean"], color=COLORS[arm], linestyle="--", label=LABELS[arm])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev accuracy (exact match)")
    ax.set_title(f"mft-jax demo ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_landscape(per_seed: list[dict], table: dict, path: Path) -> None:
    """Left: the dev loss along the straight lines FFT-best -> MFT and FFT-best -> continued FFT (seed 0).
    Right: the top Hessian eigenvalue of the dev loss (masked layers' kernels) per arm, mean over seeds."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for arm, curve in per_seed[0]["landscape"].items():
        alphas, values = zip(*curve)
        left.plot(alphas, values, color=COLORS[arm], marker="o", markersize=3, label=f"FFT-best -> {LABELS[arm]}")
    left.set_xlabel("interpolation (0 = FFT-best, 1 = the arm's chosen checkpoint)")
    left.set_ylabel("dev loss")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    arms = [a for a in table if "top_eigenvalue" in table[a]]
    means = [table[a]["top_eigenvalue"]["mean"] for a in arms]
    stds = [table[a]["top_eigenvalue"]["std"] for a in arms]
    right.bar(range(len(arms)), means, yerr=stds, color=[COLORS[a] for a in arms])
    right.set_xticks(range(len(arms)), [LABELS[a] for a in arms], rotation=30, ha="right", fontsize=8)
    right.set_ylabel("top Hessian eigenvalue (masked layers)")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(f"mft-jax demo: loss landscape ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
