"""fmjax.inspect's attention maps are readable at their written size: axis titles, a colour bar,
token strings on the ticks, nothing clipped or colliding, no text under 9 points."""

import numpy as np
import pytest

WORDS = ('▁the ▁internationalization ▁quick ▁brown ▁fox ▁jumps ▁over ▁a ▁lazy ▁dog , ▁and '
         '▁again .').split()


def _attention(heads, t, seed=0):
  rng = np.random.default_rng(seed)
  s = np.where(np.tril(np.ones((t, t), bool)), rng.normal(size=(heads, t, t)) * 2, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize('heads, t', [(4, 12), (2, 1), (6, 60)])
def test_attention_png_is_readable_at_its_written_size(heads, t, tmp_path):
  pytest.importorskip('matplotlib')
  from PIL import Image
  from fmjax.inference import attention_plot as plot
  tokens = (['<bos>'] + WORDS * 5)[:t]
  fig = plot.figure(_attention(heads, t), tokens, layer=1)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  panels = [ax for ax in fig.axes if ax.get_title().startswith('head')]
  bar = next(ax for ax in fig.axes if ax.get_ylabel() == 'attention probability')
  assert [ax.get_title() for ax in panels] == [f'head {h}' for h in range(heads)]
  cols = min(4, heads)
  assert [ax.get_ylabel() for ax in panels] == ['query position' if h % cols == 0 else '' for h in range(heads)]
  assert [ax.get_xlabel() for ax in panels] == ['key position' if h + cols >= heads else '' for h in range(heads)]
  labels = [plot.short_label(s) for s in tokens]    # every token's own string, cut past LABEL_CHARS
  assert t < 3 or labels[2] == '▁internat…'
  for ax in panels:
    shown = [lab.get_text() for lab in ax.get_yticklabels()]
    assert shown == [lab.get_text() for lab in ax.get_xticklabels()]
    if t <= 30:
      assert shown == labels
    else:          # every k-th position, as 'position token'
      k = int(shown[1].split()[0])
      assert shown == [f'{i} {plot.short_label(tokens[i])}' for i in range(0, t, k)] and k <= 3
  lo, hi = bar.get_ylim()
  assert len([x for x in bar.get_yticklabels() if lo <= x.get_position()[1] <= hi]) >= 3
  texts = [fig._suptitle, bar.yaxis.label] + [x for ax in panels for x in (
      ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()) if x.get_text()]
  assert min(x.get_fontsize() for x in texts) >= plot.MIN_FONT_POINTS
  for x in texts:     # nothing cut off by the image's edge
    box = x.get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, x
  for ax in panels:   # tick labels neither run into each other nor into another panel or the colour bar
    others = [o.get_window_extent(renderer) for o in fig.axes if o is not ax and o.get_visible() and o.axison]
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
      boxes = [x.get_window_extent(renderer) for x in ticks]
      assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
      assert not any(a.overlaps(o) for a in boxes for o in others)
  path = tmp_path / 'attention.png'
  plot.save(_attention(heads, t), tokens, 1, str(path))
  assert Image.open(path).size == tuple(round(v * plot.DPI) for v in fig.get_size_inches())
