"""Shared plumbing of the plots: axes creation and scanpy-style ``show`` / ``save``."""

from __future__ import annotations

from pathlib import Path

from scanpy import settings

#: File extensions that ``save`` recognises at the end of a string to choose the format.
_FORMATS = (".pdf", ".png", ".svg", ".jpg", ".jpeg", ".eps", ".tif", ".tiff")


def new_axes(ax, figsize: tuple[float, float] = (4.5, 4.0)):
    """The given Axes, or a fresh figure's."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def figure_path(writekey: str, save: bool | str) -> Path:
    """Where ``save`` sends a figure, following scanpy: ``settings.figdir / f"{writekey}{save}"``.

    ``save=True`` uses ``settings.file_format_figs``; a string is appended to the default name, and its
    extension, when it ends with one of pdf, png, svg, jpg, eps or tif, chooses the format.
    """
    suffix, fmt = ("", settings.file_format_figs) if save is True else (str(save), settings.file_format_figs)
    for ext in _FORMATS:
        if suffix.lower().endswith(ext):
            suffix, fmt = suffix[: -len(ext)], ext[1:]
            break
    return Path(settings.figdir) / f"{writekey}{suffix}.{fmt}"


def finish(ax, writekey: str, show: bool | None, save: bool | str | None):
    """Save and/or show the figure of ``ax`` as scanpy does.

    ``show=None`` follows ``settings.autoshow`` (and does not show a saved figure); returns ``ax`` when
    ``show=False``, else None.
    """
    import matplotlib.pyplot as plt

    auto = show is None
    if auto:
        show = settings.autoshow and not save
    if save:
        path = figure_path(writekey, save)
        path.parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(path, bbox_inches="tight")
    if show:
        plt.show()
        return None
    if save and auto:
        plt.close(ax.figure)
        return None
    return ax
