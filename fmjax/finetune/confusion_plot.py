"""The confusion-matrix figure of a classification report, readable at the size it is written.

Rows are the true class, columns the predicted class, each cell its count; a colour bar gives the
scale. The figure grows with the number of classes and the length of their names (names over
LABEL_CHARS lose their middle to '…'), the title wraps to the figure's width, and the layout keeps every
label inside the image. Written at DPI dots per inch; text is MIN_FONT_POINTS or larger, except the
counts of more than 16 classes (7 points, to fit their cells).
"""

from __future__ import annotations

import io
import textwrap

import numpy as np

DPI = 100
LABEL_CHARS = 24          # longer class names are cut to this many characters
MIN_FONT_POINTS = 9       # no text is smaller (about 12 pixels high at DPI)


def short_label(name: str) -> str:
  """A class name as the axes show it."""
  name = str(name)
  if len(name) <= LABEL_CHARS:
    return name
  tail = (LABEL_CHARS - 1) // 2      # keep both ends: names often differ only at the end
  return name[:LABEL_CHARS - 1 - tail] + '…' + name[-tail:]


def _count(n: int) -> str:
  return f'{n / 1000:.1f}k' if n >= 10_000 else str(n)


def figure(rep: dict, title: str = ''):
  """The matplotlib Figure of `rep`'s confusion matrix (not registered with pyplot: nothing to close)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  # no pyplot: no global state
  cm = np.asarray(rep['confusion'], np.int64)
  labels = [short_label(n) for n in rep['class_names']]
  n = len(labels)
  cell = 0.6 if n <= 8 else 0.45 if n <= 16 else 0.32          # inches per cell
  count_points = 11 if n <= 8 else 9 if n <= 16 else 7          # counts only go below MIN_FONT_POINTS
  label_inches = 0.09 * max(len(s) for s in labels)           # at 10 pt
  width = max(5.0, 0.9 + label_inches + n * cell + 1.4)
  rotate = label_inches > 0.9 * (width - 2.3 - label_inches) / n    # slanted when a name is wider than its cell
  height = max(4.2, 1.2 + n * cell + (0.75 * label_inches if rotate else 0.3) + 0.6)
  fig = Figure(figsize=(width, height), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)   # drawn and saved with Agg, whatever pyplot's backend
  ax = fig.add_subplot()
  im = ax.imshow(cm, cmap='Blues', vmin=0, vmax=max(int(cm.max()), 1))
  ax.set_xticks(range(n), labels, rotation=45 if rotate else 0, ha='right' if rotate else 'center',
                rotation_mode='anchor', fontsize=10)
  ax.set_yticks(range(n), labels, fontsize=10)
  ax.set_xlabel('predicted class', fontsize=11)
  ax.set_ylabel('true class', fontsize=11)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, _count(int(cm[i, j])), ha='center', va='center', fontsize=count_points,
              color='white' if im.norm(cm[i, j]) > 0.55 else 'black')
  bar = fig.colorbar(im, ax=ax, shrink=min(0.85, 0.4 + 0.08 * n))
  bar.set_label('examples', fontsize=10)
  bar.ax.tick_params(labelsize=MIN_FONT_POINTS)
  title = title or f'accuracy {rep["accuracy"]:.3f}, macro-F1 {rep["macro_f1"]:.3f}'
  chars = max(30, int(width * 72 / (11 * 0.6)))               # characters of 11 pt text per line
  ax.set_title('\n'.join(textwrap.wrap(title, chars)), fontsize=11)
  return fig


def png(rep: dict, title: str = '') -> bytes:
  """The figure as PNG bytes."""
  fig = figure(rep, title)
  out = io.BytesIO()
  fig.savefig(out, format='png', dpi=DPI)
  return out.getvalue()
