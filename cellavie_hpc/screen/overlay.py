"""PNG overlays: the refocused phase of an image with every infected cell boxed and labelled (matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

STAGE_COLOURS = {"ring": "#ff2d2d", "trophozoite": "#ff9f1a", "schizont": "#ff00d4"}


def write_overlay(path: str | Path, phase: np.ndarray, cells: dict[str, np.ndarray], title: str,
                  max_side_px: int = 1024) -> Path:
    """Save `phase` (H, W, rad) as a grey image with boxes (y0, x0, y1, x1) around cells called infected.

    Large images are shown at most `max_side_px` wide (boxes are scaled with them) to keep files small.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = phase.shape
    step = max(1, int(np.ceil(max(h, w) / max_side_px)))
    shown = phase[::step, ::step]
    dpi = 100
    fig = Figure(figsize=(shown.shape[1] / dpi, shown.shape[0] / dpi + 0.35), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, shown.shape[0] / (shown.shape[0] + 0.35 * dpi)))
    ax.imshow(shown, cmap="gray", vmin=-0.5, vmax=3.0, interpolation="nearest")
    ax.set_axis_off()
    infected = np.flatnonzero(np.asarray(cells["infected"], bool))
    for k in infected:
        y0, x0, y1, x1 = (np.asarray(cells["box"][k], float) / step).tolist()
        colour = STAGE_COLOURS.get(str(cells["stage"][k]), "#ff2d2d")
        pad = 3
        ax.add_patch(Rectangle((x0 - pad, y0 - pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, fill=False,
                               edgecolor=colour, linewidth=1.5))
        ax.text(x0, y0 - pad - 2, f"{cells['stage'][k]} {cells['p_infected'][k]:.2f}", color=colour, fontsize=7)
    fig.suptitle(f"{title}: {len(infected)} infected of {len(cells['cy'])} cells", fontsize=9, y=0.995)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
