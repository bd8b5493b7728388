"""BERT and RoBERTa masked-LM encoders (`BertForMaskedLM`, `RobertaForMaskedLM`).

Both map onto model.kind='encoder' with post-LN blocks, learned positions, token types, biases
and the MLM head tied to the word embeddings. They differ in names (bert./cls.predictions. vs
roberta./lm_head.) and in positions: RoBERTa numbers tokens from padding_idx + 1, which fmjax
reads as model.position_offset (its whole table, max_seq_len + offset rows, is kept, so conversions
round-trip exactly; max_position_embeddings = model.max_seq_len + position_offset).
HF's GELU ('gelu') is the erf form: fmjax activation 'gelu_exact'; 'gelu_new' is fmjax's 'gelu'.
"""

from __future__ import annotations

from dataclasses import dataclass

from fmjax.convert.families import llama, register
from fmjax.convert.mapping import ConversionError, Rule, identity, linear, reshape

_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu'}


@dataclass(frozen=True)
class EncoderFamily:
  """One HF masked-LM encoder family (the interface of fmjax/convert/families/__init__.py)."""
  NAME: str
  ARCHITECTURE: str
  MODEL_TYPES: tuple
  TITLES: tuple
  OPTIONAL_PREFIX: str          # the base-model prefix ('bert.'): a bare BertModel file omits it
  head: str                     # the MLM head's prefix (its output bias is head + 'bias')
  head_dense: str               # the head's dense transform, under `head`
  head_norm: str                # the head's LayerNorm, under `head`
  position_offset: int          # rows of the position table before token 0's (RoBERTa: pad + 1)
  special_ids: tuple            # (pad, bos, eos) written into config.json
  IGNORED: tuple = (r'position_ids$', r'^(bert\.|roberta\.)?pooler\.', r'^cls\.seq_relationship\.',
                    r'(predictions|lm_head)\.decoder\.(weight|bias)$')  # buffers, NSP/pooler, tied copies

  def mismatch(self, m) -> str | None:
    """Why an fmjax model config is not this family's shape, or None."""
    want = dict(kind='encoder', norm='layernorm', norm_position='post', positions='learned', use_bias=True)
    bad = [f'model.{k}={m.get(k)!r} (need {v!r})' for k, v in want.items() if m.get(k) != v]
    if m.activation not in ('gelu', 'gelu_exact'):
      bad.append(f'model.activation={m.activation!r} (need gelu_exact or gelu)')
    if m.get('type_vocab_size', 0) < 1:
      bad.append('model.type_vocab_size=0 (need >= 1)')
    if m.num_kv_heads not in (0, m.num_heads):
      bad.append(f'model.num_kv_heads={m.num_kv_heads} ({self.NAME} has no grouped KV heads)')
    if m.head_dim not in (0, m.d_model // m.num_heads):
      bad.append(f'model.head_dim={m.head_dim} ({self.NAME} needs d_model/num_heads)')
    if m.get('position_offset', 0) != self.position_offset:
      bad.append(f'model.position_offset={m.get("position_offset", 0)} (need {self.position_offset})')
    bad += llama.experts_on(m)
    return ', '.join(bad) or None

  def to_hf_config(self, m) -> dict:
    """The config.json of an fmjax model config."""
    act = 'gelu' if m.activation == 'gelu_exact' else 'gelu_new'
    pad, bos, eos = self.special_ids
    return dict(
        architectures=[self.ARCHITECTURE], model_type=self.MODEL_TYPES[0], vocab_size=m.vocab_size,
        hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        intermediate_size=m.mlp_dim, hidden_act=act, max_position_embeddings=m.max_seq_len + self.position_offset,
        type_vocab_size=m.type_vocab_size, layer_norm_eps=m.norm_eps, position_embedding_type='absolute',
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=m.init_std,
        tie_word_embeddings=True, is_decoder=False, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)

  def from_hf_config(self, hf: dict) -> dict:
    """fmjax model options from a BERT/RoBERTa config.json."""
    act = hf.get('hidden_act', 'gelu')
    if act not in _ACTIVATIONS:
      raise ConversionError(f'config.json: hidden_act={act!r} is not supported (gelu, gelu_new)')
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise ConversionError(f'config.json: position_embedding_type={hf["position_embedding_type"]!r} is not '
                            'supported (absolute)')
    if hf.get('is_decoder') or hf.get('add_cross_attention'):
      raise ConversionError('config.json: a decoder / cross-attention BERT is not an encoder; not supported')
    if not hf.get('tie_word_embeddings', True):
      raise ConversionError('config.json: tie_word_embeddings=false is not supported (fmjax ties the MLM head)')
    offset = 0 if self.position_offset == 0 else int(hf.get('pad_token_id', 1)) + 1
    if offset != self.position_offset:
      raise ConversionError(f'config.json: pad_token_id={hf.get("pad_token_id")} puts RoBERTa positions at '
                            f'{offset}; fmjax supports {self.position_offset} (pad_token_id=1)')
    d, h = hf['hidden_size'], hf['num_attention_heads']
    return dict(kind='encoder', vocab_size=hf['vocab_size'], d_model=d, num_layers=hf['num_hidden_layers'],
                num_heads=h, num_kv_heads=0, head_dim=0, mlp_dim=hf['intermediate_size'],
                max_seq_len=hf['max_position_embeddings'] - offset, position_offset=offset,
                activation=_ACTIVATIONS[act], norm='layernorm', norm_position='post',
                norm_eps=float(hf.get('layer_norm_eps', 1e-12)), positions='learned', use_bias=True,
                tie_embeddings=True, type_vocab_size=int(hf.get('type_vocab_size', 2)))

  def rules(self, m) -> list:
    """The mapping table for an fmjax model config."""
    d, h, f, v = m.d_model, m.num_heads, m.mlp_dim, m.vocab_size
    hd = d // h
    base, layer = self.OPTIONAL_PREFIX, self.OPTIONAL_PREFIX + 'encoder.layer.{i}.'
    norm = lambda hf, fm: [Rule(hf + '.weight', (fm + '/scale',), **identity((d,))),
                           Rule(hf + '.bias', (fm + '/bias',), **identity((d,)))]
    dense = lambda hf, fm, n_in, n_out, fm_in, fm_out: [
        Rule(hf + '.weight', (fm + '/kernel',), **linear(fm_in, fm_out)),
        Rule(hf + '.bias', (fm + '/bias',), **reshape((n_out,), fm_out))]
    table = [
        Rule(base + 'embeddings.word_embeddings.weight', ('embedding',), **identity((v, d))),
        Rule(base + 'embeddings.position_embeddings.weight', ('pos_embedding',),
             **identity((m.max_seq_len + self.position_offset, d))),
        Rule(base + 'embeddings.token_type_embeddings.weight', ('type_embedding',),
             **identity((m.type_vocab_size, d))),
        *norm(base + 'embeddings.LayerNorm', 'embed_norm'),
        *(rule for n in 'qkv' for rule in dense(
            layer + 'attention.self.' + {'q': 'query', 'k': 'key', 'v': 'value'}[n], f'layers_{{i}}/attn/{n}',
            d, d, (d,), (h, hd))),
        *dense(layer + 'attention.output.dense', 'layers_{i}/attn/o', d, d, (h, hd), (d,)),
        *norm(layer + 'attention.output.LayerNorm', 'layers_{i}/attn_norm'),
        *dense(layer + 'intermediate.dense', 'layers_{i}/mlp/wi', d, f, (d,), (f,)),
        *dense(layer + 'output.dense', 'layers_{i}/mlp/wo', f, d, (f,), (d,)),
        *norm(layer + 'output.LayerNorm', 'layers_{i}/mlp_norm'),
        *dense(self.head + self.head_dense, 'mlm_head/dense', d, d, (d,), (d,)),
        *norm(self.head + self.head_norm, 'mlm_head/norm'),
        Rule(self.head + 'bias', ('mlm_head/bias',), **identity((v,))),
    ]
    return table


BERT = register(EncoderFamily(
    NAME='bert', ARCHITECTURE='BertForMaskedLM', MODEL_TYPES=('bert',), TITLES=('BERT',), OPTIONAL_PREFIX='bert.',
    head='cls.predictions.', head_dense='transform.dense', head_norm='transform.LayerNorm', position_offset=0,
    special_ids=(0, None, None)))
ROBERTA = register(EncoderFamily(
    NAME='roberta', ARCHITECTURE='RobertaForMaskedLM', MODEL_TYPES=('roberta',), TITLES=('RoBERTa',),
    OPTIONAL_PREFIX='roberta.', head='lm_head.', head_dense='dense', head_norm='layer_norm', position_offset=2,
    special_ids=(1, 0, 2)))
