"""Pictures of routing: heatmaps of expert shares and per-token views (PNG bytes and HTML text).

Every function here is pure: it takes numbers and labels and returns the encoded PNG (``bytes``)
or the HTML page (``str``); the caller decides where and how to write it (atomically, on rank
zero). Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas instead of
``pyplot``, so nothing touches the global backend or needs a display, and rendering is safe
from any thread. Figures use a fixed size (no ``bbox_inches="tight"``), so the pixel size of a
PNG is ``figsize x dpi`` and is predictable for tests.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

DPI = 100
# Above this many cells a heatmap is too dense for readable per-cell percentages.
MAX_ANNOTATED_CELLS = 600
# The token strip: characters per line, and inches per character / per line of monospace text.
LINE_CHARS = 80
CHAR_W = 0.09
LINE_H = 0.32
MARGIN, TITLE_H, LEGEND_ROW_H, MIN_STRIP_W = 0.15, 0.3, 0.28, 2.5


def expert_colors(n: int) -> list[str]:
    """``n`` distinct hex colours, one per expert in gate-column order (tab10, then tab20, then hsv)."""
    if n <= 10:
        return [to_hex(colormaps["tab10"](i)) for i in range(n)]
    if n <= 20:
        return [to_hex(colormaps["tab20"](i)) for i in range(n)]
    return [to_hex(colormaps["hsv"](i / n)) for i in range(n)]


def _png_bytes(fig: Figure) -> bytes:
    """Encode ``fig`` as PNG at its own size and dpi."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _as_numpy(x: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# heatmaps
# ---------------------------------------------------------------------------------------------


def heatmap_figsize(n_rows: int, n_cols: int, n_panels: int = 1) -> tuple[float, float]:
    """Figure size (inches) of :func:`heatmap_png` for panels of ``n_rows x n_cols`` cells."""
    panel_w = 1.8 + 0.9 * max(n_cols, 1) + 1.0  # row labels + cells + colorbar
    height = 1.6 + 0.38 * max(n_rows, 1)  # title + column labels + cells
    return (round(panel_w * max(n_panels, 1), 2), round(height, 2))


def heatmap_png(
    panels: Mapping[str, torch.Tensor | np.ndarray],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    row_axis: str = "",
    col_axis: str = "expert",
    colorbar_label: str = "share of gate mass",
    dpi: int = DPI,
) -> bytes:
    """Side-by-side heatmaps (one panel per key, e.g. ``train`` and ``val``) of shares in [0, 1].

    Cells are annotated with percentages; NaN cells (no tokens) are left blank and marked "n/a".
    """
    names = list(panels)
    fig = Figure(figsize=heatmap_figsize(len(row_labels), len(col_labels), len(names)), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    cmap = colormaps["viridis"]
    annotate = len(row_labels) * len(col_labels) <= MAX_ANNOTATED_CELLS
    for ax, name in zip(axes, names, strict=True):
        values = _as_numpy(panels[name]).reshape(len(row_labels), len(col_labels))
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(name)
        ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=30, ha="right")
        ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
        ax.set_xlabel(col_axis)
        ax.set_ylabel(row_axis)
        if annotate:
            _annotate(ax, values)
        fig.colorbar(image, ax=ax, label=colorbar_label, aspect=max(20, len(row_labels)))  # thin bar when tall
    fig.suptitle(title)
    return _png_bytes(fig)


def _annotate(ax, values: np.ndarray) -> None:
    """Write each cell's percentage in a colour readable on viridis (white on dark, black on light)."""
    size = 9 if values.size <= 64 else 7
    for (i, j), v in np.ndenumerate(values):
        if math.isnan(v):
            ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="grey")
        else:
            colour = "white" if v < 0.6 else "black"
            ax.text(j, i, f"{100 * v:.1f}%", ha="center", va="center", fontsize=size, color=colour)


# ---------------------------------------------------------------------------------------------
# per-token views
# ---------------------------------------------------------------------------------------------


def _top_gates(gates: torch.Tensor | np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, N) gates -> (gates, index of the top expert per token, its gate clipped to [0, 1])."""
    g = _as_numpy(gates)
    if g.ndim != 2 or g.shape[1] != n_experts:
        raise ValueError(f"gates must have shape (tokens, {n_experts}), got {tuple(g.shape)}")
    top = g.argmax(axis=1) if len(g) else np.zeros(0, dtype=int)
    alpha = np.clip(g[np.arange(len(g)), top], 0.0, 1.0) if len(g) else np.zeros(0)
    return g, top, alpha


def _rgba_css(hex_colour: str, alpha: float) -> str:
    r, g, b = (round(255 * c) for c in to_rgb(hex_colour))
    return f"rgba({r}, {g}, {b}, {alpha:.3f})"


def token_routing_html(
    tokens: Sequence[str], experts: Sequence[str], gates: torch.Tensor | np.ndarray, *, title: str = "token routing"
) -> str:
    """An HTML page showing which expert each token was routed to.

    Each token is one ``<span class="tok">`` whose background is the colour of the expert with
    the highest gate, at an opacity equal to that gate (a top-1 gate below 1 is the share the
    expert got; the base weights keep the rest). Hovering shows every expert's gate. All text is
    HTML-escaped; whitespace in tokens is kept (``white-space: pre-wrap``).
    """
    if len(tokens) != len(gates):
        raise ValueError(f"{len(tokens)} tokens but {len(gates)} rows of gates")
    g, top, alpha = _top_gates(gates, len(experts))
    colours = expert_colors(len(experts))
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background-color: {c}"></span>{html.escape(name)}</span>'
        for name, c in zip(experts, colours, strict=True)
    )
    spans = []
    for i, text in enumerate(tokens):
        tip = "&#10;".join(f"{html.escape(name)}: {g[i, j]:.3f}" for j, name in enumerate(experts))
        spans.append(
            f'<span class="tok" data-expert="{html.escape(experts[top[i]])}" '
            f'style="background-color: {_rgba_css(colours[top[i]], float(alpha[i]))}" '
            f'title="{tip}">{html.escape(text)}</span>'
        )
    return _PAGE.format(title=html.escape(title), legend=legend, tokens="".join(spans))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.legend {{ margin-bottom: 1em; }}
.key {{ margin-right: 1.2em; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; vertical-align: middle; }}
.tokens {{ font-family: monospace; white-space: pre-wrap; line-height: 1.9; }}
.tok {{ border: 1px solid #ddd; padding: 1px 0; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>Colour: the expert with the highest gate (averaged over layers); opacity: that gate. Hover for all gates.</p>
<div class="legend">{legend}</div>
<div class="tokens">{tokens}</div>
</body>
</html>
"""


def _display(token: str) -> str:
    """A token as printable one-line text for the PNG strip (newlines and tabs made visible)."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _layout(tokens: Sequence[str], line_chars: int) -> list[tuple[int, int, int]]:
    """(line, start column, width) per token, wrapping at ``line_chars`` characters."""
    out, line, col = [], 0, 0
    for tok in tokens:
        width = max(len(tok), 1)
        if col and col + width > line_chars:
            line, col = line + 1, 0
        out.append((line, col, width))
        col += width
    return out


@dataclass(frozen=True)
class _Strip:
    """Geometry of the token strip, in inches: the figure, the token area, the legend."""

    placed: list[tuple[int, int, int]]
    lines: int
    width_chars: int
    legend_cols: int
    legend_rows: int
    fig_w: float
    fig_h: float


def _strip(tokens: Sequence[str], experts: Sequence[str], line_chars: int) -> _Strip:
    placed = _layout([_display(t) for t in tokens], line_chars)
    lines = placed[-1][0] + 1 if placed else 1
    width_chars = min(max((c + w for _, c, w in placed), default=1), line_chars)
    legend_cols = max(min(len(experts), 4), 1)
    legend_rows = math.ceil(len(experts) / legend_cols)
    # A legend entry: swatch and gaps (~0.55 in) plus its label (~0.08 in per character at 9 pt).
    legend_w = legend_cols * (0.55 + 0.08 * max((len(e) for e in experts), default=1))
    fig_w = round(max(width_chars * CHAR_W, legend_w, MIN_STRIP_W) + 2 * MARGIN, 2)
    fig_h = round(TITLE_H + LEGEND_ROW_H * legend_rows + lines * LINE_H + 2 * MARGIN, 2)
    return _Strip(placed, lines, width_chars, legend_cols, legend_rows, fig_w, fig_h)


def token_strip_figsize(
    tokens: Sequence[str], experts: Sequence[str], line_chars: int = LINE_CHARS
) -> tuple[float, float]:
    """Figure size (inches) of :func:`token_routing_png` for these tokens and experts."""
    geo = _strip(tokens, experts, line_chars)
    return (geo.fig_w, geo.fig_h)


def token_routing_png(
    tokens: Sequence[str],
    experts: Sequence[str],
    gates: torch.Tensor | np.ndarray,
    *,
    title: str = "token routing",
    line_chars: int = LINE_CHARS,
    dpi: int = DPI,
) -> bytes:
    """The tokens as a wrapped strip of boxes coloured like :func:`token_routing_html`, with a legend."""
    if len(tokens) != len(gates):
        raise ValueError(f"{len(tokens)} tokens but {len(gates)} rows of gates")
    _, top, alpha = _top_gates(gates, len(experts))
    colours = expert_colors(len(experts))
    geo = _strip(tokens, experts, line_chars)
    fig = Figure(figsize=(geo.fig_w, geo.fig_h), dpi=dpi)
    w, h = geo.fig_w, geo.fig_h
    # Axes in character units (x = column, y = line downwards), sized so one unit is CHAR_W
    # inches: boxes then line up with 10 pt monospace text (0.083 in per character).
    ax = fig.add_axes((MARGIN / w, MARGIN / h, geo.width_chars * CHAR_W / w, geo.lines * LINE_H / h))
    ax.set_xlim(0, geo.width_chars)
    ax.set_ylim(geo.lines, 0)
    ax.axis("off")
    for (line, col, width), text, t, a in zip(geo.placed, map(_display, tokens), top, alpha, strict=True):
        box = Rectangle(
            (col, line + 0.1), width, 0.8, facecolor=colours[t], alpha=float(a), edgecolor="#bbbbbb", lw=0.5
        )
        ax.add_patch(box)
        # parse_math=False: a "$" in a token must not switch matplotlib into mathtext.
        ax.text(col + width / 2, line + 0.5, text, ha="center", va="center", family="monospace", fontsize=10,
                parse_math=False)  # fmt: skip
    fig.text(MARGIN / w, 1 - MARGIN / h, title, ha="left", va="top", fontsize=10, parse_math=False)
    handles = [Patch(facecolor=c, label=name) for name, c in zip(experts, colours, strict=True)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(MARGIN / w, 1 - (MARGIN + TITLE_H) / h),
               ncol=geo.legend_cols, frameon=False, fontsize=9, borderaxespad=0, borderpad=0)  # fmt: skip
    return _png_bytes(fig)


# ---------------------------------------------------------------------------------------------
# line charts
# ---------------------------------------------------------------------------------------------


def line_png(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    dpi: int = DPI,
) -> bytes:
    """One line with markers per series of ``(x, y)`` points (sorted by x), e.g. a data-size sweep."""
    fig = Figure(figsize=(6.4, 4.2), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    for (name, points), colour in zip(series.items(), expert_colors(len(series)), strict=True):
        xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", color=colour, label=name)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    return _png_bytes(fig)
