"""Look inside a trained model: `python -m fmjax.inspect --workdir DIR --prompt TEXT --out OUT`.

Writes to OUT:
  attention_layer<i>.png   attention probabilities of every head of layer i: query positions down,
                           key positions across, token strings on the ticks, a colour bar
                           (fmjax/inference/attention_plot.py)
  logit_lens.png           top next-token guess from each layer's residual stream (after the
                           final norm and LM head), coloured by its probability
  token_loss.png           per-token loss (nats) of the prompt, highlighted by colour
  inspect.json             all of the above as numbers
For an encoder (model.kind='encoder') the attention maps are bidirectional, the lens reads each
position's own token through the MLM head, and token i's loss is that of predicting it with it
replaced by the mask token (one row per token: the pseudo-log-likelihood).
Attention and residuals are captured by running the model with the 'intermediates' collection
mutable (the blocks `sow` them); training never does, so its path is unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import cli
from fmjax.model.logits import head_logits, is_encoder


def lens_logits(model_cfg, params, hidden):
  """Logits read from residual stream `hidden` (..., D) through the model's own head (final norm, LM or
  MLM head, logit transform: fmjax/model/logits.py)."""
  return head_logits(model_cfg, params, hidden)


def _per_layer(tree, layers: int, path: Sequence[str]) -> jax.Array:
  """A sown value stacked over layers (L, ...) from a scanned or unrolled intermediates tree."""
  def get(node):
    for key in path:
      node = node[key]
    return node[0]  # sow keeps a tuple of values
  if 'layers' in tree:
    return get(tree['layers'])
  return jnp.stack([get(tree[f'layers_{i}']) for i in range(layers)])


def capture(model, params, tokens):
  """Run `tokens` (B, T) once. Returns (logits (B,T,V), attention (L,B,H,T,T), residuals (L,B,T,D))."""
  cfg = model.cfg
  logits, state = model.apply({'params': params}, tokens, mutable=['intermediates'])
  inter = state['intermediates']
  attention = _per_layer(inter, cfg.num_layers, ('attn', 'attention'))
  residuals = _per_layer(inter, cfg.num_layers, ('residual',))
  return logits, attention, residuals


def analyse(restored, text: str, top_k: int = 5, params=None) -> dict:
  """Attention, logit lens and per-token loss of `text` (with BOS when trained with it)."""
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  from fmjax.inference.generate import batch_rows, encode_prompts  # pylint: disable=import-outside-toplevel
  params = restored.params if params is None else params
  ids = encode_prompts(restored, [text])[0]
  t = len(ids)
  tokens = np.zeros((batch_rows(restored, 1), t), np.int32)
  tokens[0] = ids
  cfg = restored.cfg.model

  def run(params, tokens):
    logits, attention, residuals = capture(restored.model, params, tokens)
    lens = jax.nn.softmax(lens_logits(cfg, params, residuals[:, 0]).astype(jnp.float32), axis=-1)  # (L, T, V)
    probs = jax.nn.softmax(logits[0].astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(lens, top_k)
    return attention[:, 0], lens, top_p, top_i, probs

  with shd.activate(restored.mesh, restored.run.rules):
    attention, lens, top_p, top_i, probs = jax.device_get(jax.jit(run)(params, tokens))
    if is_encoder(cfg):
      loss = _masked_token_loss(restored, params, ids)
    else:
      loss = -np.log(np.maximum(probs[np.arange(t - 1), ids[1:]], 1e-30))
  return {'text': text, 'token_ids': ids, 'tokens': [token_label(restored.tokenizer, i) for i in ids],
          'attention': attention, 'lens_probs': lens, 'lens_top_p': top_p, 'lens_top_ids': top_i,
          'output_probs': probs, 'token_loss': loss}


def _masked_token_loss(restored, params, ids) -> np.ndarray:
  """Encoder: loss (nats) of each token predicted with it replaced by the mask token (T rows at once)."""
  from fmjax.inference.generate import batch_rows  # pylint: disable=import-outside-toplevel
  t = len(ids)
  rows = np.zeros((batch_rows(restored, t), t), np.int32)
  rows[:t] = ids
  rows[np.arange(t), np.arange(t)] = restored.tokenizer.mask_id

  def run(params, rows):
    logp = jax.nn.log_softmax(restored.model.apply({'params': params}, rows)[:t].astype(jnp.float32), -1)
    return -logp[jnp.arange(t), jnp.arange(t), jnp.asarray(ids)]
  return np.asarray(jax.device_get(jax.jit(run)(params, rows)))


def token_label(tokenizer, token_id: int) -> str:
  """A short printable label of one token."""
  names = {tokenizer.pad_id: '<pad>', tokenizer.bos_id: '<bos>', tokenizer.eos_id: '<eos>'}
  if token_id in names:
    return names[token_id]
  text = tokenizer.decode([token_id]).replace(' ', '\u2423')
  return text if text.isprintable() else text.encode('unicode_escape').decode('ascii')


def to_json(result: dict, tokenizer) -> dict:
  """The JSON-safe summary written to inspect.json."""
  labels = lambda ids: [token_label(tokenizer, int(i)) for i in ids]
  lens = [[{'top': [[lab, float(p)] for lab, p in zip(labels(ids), ps)]}
           for ids, ps in zip(layer_ids, layer_ps)] for layer_ids, layer_ps in
          zip(result['lens_top_ids'], result['lens_top_p'])]
  return {
      'text': result['text'], 'tokens': result['tokens'], 'token_ids': [int(i) for i in result['token_ids']],
      'attention': np.round(result['attention'], 6).tolist(),          # [layer][head][query][key]
      'logit_lens': lens,                                               # [layer][position] -> top tokens
      'token_loss': [float(x) for x in result['token_loss']],  # decoder: token i+1 given 0..i; encoder: token i masked
      'mean_loss': float(np.mean(result['token_loss'])) if len(result['token_loss']) else None,
  }


def write_plots(result: dict, out: str, tokenizer) -> list[str]:
  """The PNG files; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from fmjax.inference import attention_plot  # pylint: disable=import-outside-toplevel
  labels, paths = result['tokens'], []
  t = len(labels)
  for layer, heads in enumerate(result['attention']):                  # (L, H, T, T)
    paths.append(os.path.join(out, f'attention_layer{layer}.png'))
    attention_plot.save(np.asarray(heads), labels, layer, paths[-1])

  top_p, top_i = result['lens_top_p'][:, :, 0], result['lens_top_ids'][:, :, 0]   # (L, T)
  fig, ax = plt.subplots(figsize=(2.5 + 0.6 * t, 2.2 + 0.6 * len(top_p)))
  image = ax.imshow(top_p, cmap='Blues', vmin=0.0, vmax=1.0, aspect='auto')
  bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
  bar.set_label('probability of the top token', fontsize=9)
  bar.ax.tick_params(labelsize=9)
  for layer in range(top_p.shape[0]):
    for pos in range(t):
      ax.text(pos, layer, token_label(tokenizer, int(top_i[layer, pos])), ha='center', va='center', fontsize=9)
  ax.set_xticks(range(t), labels, rotation=90, fontsize=9)
  ax.set_yticks(range(top_p.shape[0]), [f'layer {i}' for i in range(top_p.shape[0])], fontsize=9)
  ax.set_xlabel('input token (position)', fontsize=10)
  ax.set_ylabel('after block', fontsize=10)
  guess = 'token (MLM head)' if len(result['token_loss']) == t else 'next token'
  ax.set_title(f'logit lens: the top {guess} read from each block (colour = its probability)', fontsize=10)
  fig.tight_layout()
  paths.append(os.path.join(out, 'logit_lens.png'))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)

  loss = result['token_loss']
  fig, ax = plt.subplots(figsize=(1.5 + 0.35 * t, 3.0))
  colours = plt.cm.Reds(loss / max(float(loss.max()) if len(loss) else 1.0, 1e-6))
  ax.bar(range(t - len(loss), t), loss, color=colours)   # decoders: from token 1; encoders: every token
  ax.set_xticks(range(t), labels, fontsize=9)
  ax.set_xlabel('input token (the loss of predicting it)', fontsize=10)
  ax.set_ylabel('loss (nats)', fontsize=10)
  ax.set_title(f'per-token loss (mean {float(np.mean(loss)) if len(loss) else 0.0:.3f})', fontsize=10)
  fig.tight_layout()
  paths.append(os.path.join(out, 'token_loss.png'))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def run_command(args, overrides: Sequence[str]) -> int:
  """`python -m fmjax.inspect` after its flags are parsed (fmjax/inspect.py): write the plots and JSON."""
  from fmjax.checkpoints import restore  # pylint: disable=import-outside-toplevel
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise cli.UsageError('fmjax.inspect needs matplotlib: pip install "matplotlib>=3.8"') from None
  restored = restore.restore(args.workdir, restore.mesh_overrides(args.mesh) + overrides, args.step)
  result = analyse(restored, args.prompt, min(args.top_k, restored.cfg.model.vocab_size))
  os.makedirs(args.out, exist_ok=True)
  paths = write_plots(result, args.out, restored.tokenizer)
  paths.append(os.path.join(args.out, 'inspect.json'))
  with open(paths[-1], 'w') as f:
    json.dump(to_json(result, restored.tokenizer), f)
  print(f'mean loss {float(np.mean(result["token_loss"])):.3f} nats over {len(result["token_loss"])} tokens; '
        f'wrote {", ".join(os.path.basename(p) for p in paths)} to {args.out}')
  return 0
