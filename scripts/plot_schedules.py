"""Draw docs/schedules.png: every scheduler option with its YAML defaults on the default
config, computed by trainrun-lr's own functions (one panel each). The plateau panel is fed
a synthetic val/loss every 25 updates, since its reductions depend on one.

    python scripts/plot_schedules.py [OUT.png]
"""

from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainrun.composition import validated_configs
from trainrun.lrpreview import curve
from trainrun.schedules import SCHEDULES

EVAL_EVERY = 25


def synthetic_val_loss(max_steps: int) -> list[tuple[int, float]]:
    """A val/loss that falls, then flattens out with a little noise."""
    return [(k, max(3.0, 5.0 - k / 60) + 0.02 * math.sin(k)) for k in
            range(EVAL_EVERY, max_steps + 1, EVAL_EVERY)]


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "docs" / "schedules.png"
    options = list(SCHEDULES)
    configs = validated_configs([[f"scheduler={option}"] for option in options])
    fig = Figure(figsize=(14, 10), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 4, sharex=True)
    for ax, option, cfg in zip(axes.flat, options, configs, strict=False):
        evals = synthetic_val_loss(cfg.trainer.max_steps) if cfg.scheduler.uses_val_loss else ()
        c = curve(option, cfg, evals)
        ax.plot(*c.points(), color="C0")
        keys = ", ".join(f"{k}={v}" for k, v in asdict(cfg.scheduler).items() if v is not None)
        ax.set_title(f"{option}\n" + "\n".join(textwrap.wrap(keys, 60)) if keys else option,
                     fontsize=8)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(options):]:
        ax.set_axis_off()
    for ax in axes[-1]:
        ax.set_xlabel("update k")
    cfg = configs[0]
    fig.suptitle(f"trainrun's learning-rate schedules (optimizer.lr={cfg.optimizer.lr:g}, "
                 f"trainer.max_steps={cfg.trainer.max_steps}); plateau fed a synthetic "
                 f"val/loss every {EVAL_EVERY} updates")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
