"""`rtlib plot`: training and validation curves of a run, from its metrics.jsonl, as a PNG."""

from pathlib import Path

# Re-exported: callers of rtlib.runs.plot.read_metrics get the one tolerant reader of the format.
from rtlib.train.metrics_log import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if "split" not in r]
    valid = [r for r in records if r.get("split") == "valid"]
    unit = plot_unit(records)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([r["step"] for r in train], [r[f"bits_per_{unit}"] for r in train],
                label="train (batch)", lw=1)
    if valid:
        ax.plot([r["step"] for r in valid], [r[f"bits_per_{unit}"] for r in valid], "o-",
                label="valid", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per dim (channel byte)" if unit == "dim" else f"bits per {unit}")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "curves.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_unit(records: list[dict]) -> str:
    """The unit a run's bits are counted per: "dim" (channel byte) for image stores, "byte"
    for other byte-level stores, "token" for synthetic (and other) vocabularies."""
    logged = {key.removeprefix("bits_per_") for r in records for key in r
              if key.startswith("bits_per_")}
    return next((u for u in ("dim", "byte") if u in logged), "token")
