"""Mapping tables between Hugging Face tensor names and fmjax parameter paths.

A family (llama.py, gpt2.py) lists `Rule`s: one HF tensor <-> one or more fmjax parameters with a
transform each way (the MaxText scheme). '{i}' in a name stands for the layer index. fmjax paths
are written in the unrolled layout ('layers_{i}/attn/q/kernel'); `locate` maps them into a scanned
tree. Transforms work on NumPy arrays, one tensor at a time.

Mixture-of-experts files hold one tensor per expert ('...experts.{j}.w1.weight', '{j}' = expert index)
where fmjax stacks the experts on a leading axis ('layers_{i}/moe/wi_0', (E, D, F)): a rule with
`experts=E` stands for E HF tensors, each one expert's slice of its fmjax parameters, and its transforms
act on that slice, so conversion still moves one HF tensor at a time. `layers` limits a per-layer rule to
some layers (the MoE layers, or the dense ones, of a model that mixes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from fmjax.errors import UserError


class ConversionError(UserError):
  """A checkpoint, tensor or flag that cannot be converted; the message names it."""


@dataclass(frozen=True)
class Rule:
  hf: str                      # HF tensor name; '{i}' = layer index
  fm: tuple                    # fmjax parameter paths ('/'-separated); '{i}' = layer index
  hf_shape: tuple              # shape of the HF tensor
  to_hf: Callable              # (*fm arrays) -> HF array
  from_hf: Callable            # HF array -> tuple of fm arrays
  layers: tuple | None = None  # the layers a per-layer rule covers (None: all)
  experts: int = 0             # > 0: '{j}' in hf = expert index; one HF tensor per expert, each a slice of fm

  @property
  def per_layer(self) -> bool:
    return '{i}' in self.hf


class Entry(NamedTuple):
  """One HF tensor of the model: its name, layer index (or None) and expert index (or None), and its rule."""
  name: str
  layer: int | None
  expert: int | None
  rule: Rule


def expand(rules, num_layers: int) -> list[Entry]:
  """Every HF tensor of the model, rule by rule (a layer's experts in order)."""
  out = []
  for rule in rules:
    layers = (range(num_layers) if rule.layers is None else rule.layers) if rule.per_layer else [None]
    experts = range(rule.experts) if rule.experts else [None]
    out.extend(Entry(rule.hf.format(i=i, j=j), i, j, rule) for i in layers for j in experts)
  return out


def locate(path: str, layer: int | None, scanned: bool, expert: int | None = None):
  """(keys into the params tree, index into that leaf: () for the whole leaf, else the position along the
  stacked layer axis (scanned) and then along the expert axis (an expert's slice))."""
  keys = path.split('/')
  index = () if expert is None else (expert,)
  if layer is None:
    return keys, index
  if scanned:
    return ['layers'] + keys[1:], (layer,) + index
  return [keys[0].format(i=layer)] + keys[1:], index


# -- transforms -------------------------------------------------------------------------------------

def identity(shape):
  """A tensor stored the same way on both sides."""
  return dict(hf_shape=tuple(shape), to_hf=lambda x: x, from_hf=lambda x: (x,))


def linear(in_shape, out_shape):
  """torch nn.Linear weight [out, in] <-> fmjax kernel in_shape + out_shape."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return dict(hf_shape=(n_out, n_in),
              to_hf=lambda k: k.reshape(n_in, n_out).T,
              from_hf=lambda w: (w.T.reshape(tuple(in_shape) + tuple(out_shape)),))


def reshape(hf_shape, fm_shape):
  """A tensor stored flat on one side and reshaped on the other (attention biases: (H*D,) <-> (H, D))."""
  return dict(hf_shape=tuple(hf_shape), to_hf=lambda x: x.reshape(hf_shape),
              from_hf=lambda w: (w.reshape(fm_shape),))


def conv1d(in_shape, out_shape):
  """GPT-2 Conv1D weight [in, out] <-> fmjax kernel in_shape + out_shape (no transpose)."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return dict(hf_shape=(n_in, n_out),
              to_hf=lambda k: k.reshape(n_in, n_out),
              from_hf=lambda w: (w.reshape(tuple(in_shape) + tuple(out_shape)),))


def fused(parts: int, lead: tuple, shape: tuple):
  """One HF tensor = `parts` fmjax tensors of `lead + shape` concatenated on the last HF axis."""
  n = math.prod(shape)
  return dict(hf_shape=tuple(lead) + (parts * n,),
              to_hf=lambda *xs: np.concatenate([x.reshape(tuple(lead) + (n,)) for x in xs], axis=-1),
              from_hf=lambda w: tuple(p.reshape(tuple(lead) + tuple(shape)) for p in np.split(w, parts, axis=-1)))


def stacked_linear(in_shape, out_shapes):
  """One torch nn.Linear weight whose output rows stack several fmjax kernels ([sum of outs, in]: Phi-3's
  qkv_proj, q then k then v rows, and gate_up_proj, gate then up) <-> fmjax kernels in_shape + out_shape each."""
  n_in, sizes = math.prod(in_shape), [math.prod(s) for s in out_shapes]
  cuts = np.cumsum(sizes)[:-1]
  return dict(hf_shape=(sum(sizes), n_in),
              to_hf=lambda *ks: np.concatenate([k.reshape(n_in, n).T for k, n in zip(ks, sizes)], axis=0),
              from_hf=lambda w: tuple(p.T.reshape(tuple(in_shape) + tuple(s))
                                      for p, s in zip(np.split(w, cuts, axis=0), out_shapes)))
