"""Confusion-matrix figures for the linear probe (paper 001 §4.3 reports per-class confusion).

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so
evaluation inside a training worker neither needs a display nor leaks global figure state.

Legend: C classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where a figure is drawn: matplotlib costs a second a config check does not need
    from matplotlib.figure import Figure

__all__ = ["confusion_matrix_figure", "save_figure", "write_confusion_pngs"]

# Above this many classes, per-cell count labels become unreadable and are left out.
_MAX_ANNOTATED_CLASSES = 20


def confusion_matrix_figure(
    confusion: np.ndarray, class_names: Sequence[str], *, title: str
) -> Figure:
    """Draw a (C, C) confusion matrix: colour = row-normalised share, text = raw count.

    Row normalisation makes colours comparable across classes of different sizes; the counts
    stay readable in each cell (for up to 20 classes).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion_CC = np.asarray(confusion)
    C = len(class_names)
    if confusion_CC.shape != (C, C):
        raise ValueError(
            f"class_names: {C} names for a confusion matrix of shape {confusion_CC.shape}"
        )
    row_total_C1 = confusion_CC.sum(axis=1, keepdims=True)
    share_CC = confusion_CC / np.maximum(row_total_C1, 1)

    side = max(4.0, 0.45 * C + 2.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share_CC, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    ax.set_xticks(np.arange(C), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(np.arange(C), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if C <= _MAX_ANNOTATED_CLASSES:
        for i in range(C):
            for j in range(C):
                colour = "white" if share_CC[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(confusion_CC[i, j])), ha="center", va="center",
                        color=colour, fontsize=8)
    return fig


def write_confusion_pngs(confusions: Mapping[str, np.ndarray], class_names: Sequence[str],
                         folder: str | PathLike[str]) -> list[Path]:
    """``confusion_<name>.png`` in ``folder`` for each (C, C) matrix of ``confusions``, drawn as
    ``confusion_matrix_figure`` draws it.

    The matrices of one evaluation share their classes, so they share a layout: the first figure
    is laid out (constrained layout, the costly part of a draw), then kept with that layout and
    given each other matrix's colours, counts and title in turn: about 0.25 s a figure instead of
    0.5-0.75 s for a figure of its own."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    fig = None
    paths = []
    for name, confusion in confusions.items():
        confusion_CC = np.asarray(confusion)
        if fig is None:
            fig = confusion_matrix_figure(confusion_CC, class_names, title=name)
            fig.canvas.draw()
            fig.set_layout_engine("none")  # keep the positions the first draw found
            ax = fig.axes[0]
            image = ax.images[0]
            cells = ax.texts
        else:
            if confusion_CC.shape != image.get_array().shape:
                raise ValueError(f"confusions: '{name}' has shape {confusion_CC.shape}, the first "
                                 f"{image.get_array().shape}")
            share_CC = confusion_CC / np.maximum(confusion_CC.sum(axis=1, keepdims=True), 1)
            image.set_data(share_CC)
            ax.set_title(name)
            C = confusion_CC.shape[0]
            for k, cell in enumerate(cells):
                i, j = divmod(k, C)
                cell.set_text(str(int(confusion_CC[i, j])))
                cell.set_color("white" if share_CC[i, j] > 0.5 else "black")
        path = out / f"confusion_{name}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def save_figure(fig: Figure, path: str | PathLike[str]) -> None:
    """Write a figure (format from the file suffix, e.g. ``.png``), creating parent folders."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(out, dpi=120)
