"""The one way the bench makes a figure: matplotlib's object API on an Agg canvas (no pyplot, no global state).

matplotlib is the bench's own dependency (the `bench` extra), imported only when a figure is drawn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_figure"]


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Any, Any]:
    """A figure of ``nrows x ncols`` axes (each ``width x height`` inches, constrained layout) and its axes grid.

    Example:
        ```py
        >>> fig, axes = new_figure(ncols=2)
        >>> axes.shape, [float(x) for x in fig.get_size_inches()]
        ((1, 2), [12.8, 4.2])
        ```
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes
