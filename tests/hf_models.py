"""Tiny Hugging Face models and tokenizers made in the test (transformers + tokenizers; nothing downloaded)."""

import json
import os

import numpy as np
import tokenizers as hf_tokenizers
import torch
import transformers

BOS3, EOS3 = '<|begin_of_text|>', '<|end_of_text|>'
GPT2_EOS = '<|endoftext|>'


WORDS = ('the quick brown fox jumps over lazy dog while seven wizards quietly hex jolly zebras near old '
         'rivers and bright mountains under clear skies def return class import lambda yield café naïve').split()


def corpus(n=300, seed=0):
  """A few KB of word salad with some code and non-ASCII."""
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) + ('.\n' if i % 3 else ':\n    x = 1\n')
          for i in range(n)]


def train_bpe(specials, vocab_size=400):
  """A byte-level BPE (as GPT-2 and Llama 3 use) trained on the corpus by `tokenizers`."""
  t = hf_tokenizers
  tok = t.Tokenizer(t.models.BPE())
  tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = t.decoders.ByteLevel()
  trainer = t.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus(), trainer)
  return tok


def _perturb(model, scale):
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  model.eval()
  return model


def save_perturbed(model, path, scale=0.1):
  """Add scale * randn to every weight (norms and biases too; torch's current seed), save as safetensors."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def make_llama3(path):
  """Llama-3 style: GQA, llama3 RoPE scaling, theta 5e5, eps 1e-6, tied embeddings, tokenizer.json."""
  tok = train_bpe([BOS3, EOS3])
  tok.post_processor = hf_tokenizers.processors.TemplateProcessing(
      single=f'{BOS3} $A', special_tokens=[(BOS3, tok.token_to_id(BOS3))])
  os.makedirs(path)
  tok.save(os.path.join(path, 'tokenizer.json'))
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump(dict(tokenizer_class='PreTrainedTokenizerFast', bos_token=BOS3, eos_token=EOS3,
                   model_max_length=256), f)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
      tie_word_embeddings=True, bos_token_id=tok.token_to_id(BOS3), eos_token_id=tok.token_to_id(EOS3),
      rope_parameters=dict(rope_type='llama3', rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=64))
  model = _perturb(transformers.LlamaForCausalLM(cfg), 0.2)
  model.save_pretrained(path, safe_serialization=True)
  return model


def verify_import(hf_dir, out_dir, capsys, window: int) -> str:
  """`fmjax-convert from-hf --verify` of `hf_dir` (byte tokenizer): passes against transformers in float64
  on rows at least 3 windows long; returns its verify line."""
  from fmjax.convert.cli import main as convert_main  # pylint: disable=import-outside-toplevel
  capsys.readouterr()
  assert convert_main(['from-hf', '--hf-dir', str(hf_dir), '--out', str(out_dir), '--tokenizer', 'byte',
                       '--verify']) == 0
  line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith('verify: '))
  tokens = int(line.rsplit(' tokens', 1)[0].rsplit('x', 1)[1])
  assert tokens >= 3 * window, line
  return line


def greedy_pair(model, workdir, prompt: str, new: int):
  """(prompt ids, fmjax's greedy tokens, transformers' greedy tokens) of `new` tokens after `prompt`, from the
  fmjax checkpoint in `workdir` and the transformers `model` it was imported from."""
  from fmjax.checkpoints import restore  # pylint: disable=import-outside-toplevel
  from fmjax.inference import generate as generate_lib  # pylint: disable=import-outside-toplevel
  gen = generate_lib.generate(restore.restore(str(workdir)), [prompt], max_new_tokens=new)
  ids = gen.prompt_tokens[0]
  with torch.no_grad():
    want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
  return ids, gen.tokens[0], want


def imported_models(tmp_path_factory, build):
  """A module fixture's body: name -> (the transformers model `build(name)` makes, perturbed and saved, its base
  directory, the from-hf result (byte tokenizer)), each made once."""
  from fmjax.convert import driver  # pylint: disable=import-outside-toplevel
  made = {}

  def get(name):
    if name not in made:
      base = tmp_path_factory.mktemp(name)
      torch.manual_seed(0)
      model = save_perturbed(build(name), base / 'hf')
      model.config._attn_implementation = 'eager'
      out = driver.from_hf(str(base / 'hf'), str(base / 'fm'), tokenizer='byte', log=lambda s: None)
      made[name] = (model, base, out)
    return made[name]
  return get


def one_line(call, *words) -> str:
  """The message of the ConversionError `call()` raises: one line holding every one of `words`."""
  import pytest  # pylint: disable=import-outside-toplevel
  from fmjax.convert import ConversionError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConversionError) as err:
    call()
  message = str(err.value)
  assert '\n' not in message and all(w in message for w in words), message
  return message
