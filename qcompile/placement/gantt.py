"""Gantt charts of a placement: the predicted schedule (one bar per fused group) and, after
a run, the measured one (one bar per segment), one row per device, on one time axis."""
from __future__ import annotations

from pathlib import Path

from qcompile.errors import ConfigError

__all__ = ["plot"]


def _bars(plan: dict):
    """[(device, start_s, end_s, label)] of the predicted schedule of a plan dict."""
    pred, a = plan["predicted"], plan["assignment"]
    return [(a[g], pred["start"][g], pred["finish"][g], g) for g in a]


def plot(plan: dict, timeline: list[dict] | None, path, *, title: str | None = None) -> Path:
    """Write the chart as a PNG to ``path`` and return it. ``plan`` is
    :meth:`Placement.to_json`'s dict; ``timeline`` a run's ``PlacedExecutable.timeline``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError(f"the Gantt chart needs matplotlib ({e})",
                          hint="pip install 'qcompile[plot]'") from None
    devices = [d["name"] for d in plan["devices"]]
    panels = [("predicted", _bars(plan))]
    if timeline:
        panels.append(("measured", [(t["device"], t["start"], t["end"], t["segment"]) for t in timeline]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.2 + 0.6 * len(devices) * len(panels)),
                             sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10")
    horizon = max((e for _, bars in panels for _, _, e, _ in bars), default=0.0) * 1e3
    for ax, (name, bars) in zip(axes[:, 0], panels):
        for dev, s, e, label in bars:
            row = devices.index(dev) if dev in devices else len(devices)
            ax.barh(row, (e - s) * 1e3, left=s * 1e3, height=0.6, color=colors(row % 10),
                    edgecolor="black", linewidth=0.3)
            if (e - s) * 1e3 > 0.06 * horizon:
                ax.text((s + e) / 2 * 1e3, row, label, ha="center", va="center", fontsize=6,
                        clip_on=True)
        end = max((e for _, _, e, _ in bars), default=0.0) * 1e3
        ax.set_yticks(range(len(devices)), devices)
        ax.invert_yaxis()
        ax.set_title(f"{name}: {end:.3f} ms", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time (ms)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
