"""The attention-map figure of one layer (`fmjax.inspect`), readable at the size it is written.

One panel per head (up to 4 a row): rows are query positions, columns key positions, colour the
attention probability (one colour bar for the figure). Ticks carry the token strings (cut to
LABEL_CHARS with '…'); when a row of tokens is too long for every label to fit its cell, every
k-th position is labelled, as 'position token'. Panels grow with the prompt up to MAX_PANEL_INCHES.
Written at DPI dots per inch; no text is smaller than MIN_FONT_POINTS.
"""

from __future__ import annotations

import math

import numpy as np

DPI = 100
MIN_FONT_POINTS = 9
LABEL_CHARS = 10             # longer token strings are cut to this many characters
MAX_PANEL_INCHES = 6.0       # a head's map is at most this wide and high
_LINE_INCHES = 0.17          # a 9 pt label line with its gap: the smallest cell that holds a label
_CHAR_INCHES = 0.075         # average width of a 9 pt character


def short_label(text: str) -> str:
  """A token string as the ticks show it."""
  return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + '…'


def tick_labels(tokens: list[str], cell_inches: float) -> tuple[list[int], list[str]]:
  """(positions, labels) of the ticks along one axis: every token when each label fits its cell,
  else every k-th position as 'position token'."""
  n = len(tokens)
  step = max(1, math.ceil(_LINE_INCHES / cell_inches))
  if step == 1:
    return list(range(n)), [short_label(t) for t in tokens]
  positions = list(range(0, n, step))
  return positions, [f'{i} {short_label(tokens[i])}' for i in positions]


def figure(heads: np.ndarray, tokens: list[str], layer: int):
  """The matplotlib Figure of one layer's attention `heads` (H, T, T) over `tokens` (not pyplot's)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  # no pyplot: no global state
  n_heads, t = heads.shape[0], len(tokens)
  cols = min(4, n_heads)
  rows = -(-n_heads // cols)
  panel = min(MAX_PANEL_INCHES, max(2.2, _LINE_INCHES * t))
  positions, labels = tick_labels(tokens, panel / t)
  label_inches = _CHAR_INCHES * max(len(s) for s in labels) + 0.35   # tick labels + axis title
  width = cols * (panel + label_inches + 0.25) + 1.3                  # + the colour bar
  height = rows * (panel + label_inches + 0.45) + 0.5                 # + panel titles, the figure title
  fig = Figure(figsize=(round(width * DPI) / DPI, round(height * DPI) / DPI), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  image = None
  for h, ax in enumerate(axes.flat):
    if h >= n_heads:
      ax.axis('off')
      continue
    image = ax.imshow(heads[h], cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
    ax.set_title(f'head {h}', fontsize=10)
    ax.set_xticks(positions, labels, rotation=90, fontsize=MIN_FONT_POINTS)
    ax.set_yticks(positions, labels, fontsize=MIN_FONT_POINTS)
    if h // cols == rows - 1 or h + cols >= n_heads:   # the lowest panel of its column
      ax.set_xlabel('key position', fontsize=10)
    if h % cols == 0:
      ax.set_ylabel('query position', fontsize=10)
  bar = fig.colorbar(image, ax=axes, shrink=0.9, aspect=25 * rows)
  bar.set_label('attention probability', fontsize=10)
  bar.ax.tick_params(labelsize=MIN_FONT_POINTS)
  fig.suptitle(f'layer {layer} attention: each row is a query, its colours the keys it attends', fontsize=11)
  return fig


def save(heads: np.ndarray, tokens: list[str], layer: int, path: str) -> None:
  """Write the figure of `heads` as a PNG at DPI."""
  figure(heads, tokens, layer).savefig(path, dpi=DPI)
