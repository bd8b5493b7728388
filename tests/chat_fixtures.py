"""Tiny real chat tokenizers for tests: Qwen2.5-style (ChatML) and Llama-3-style (header) byte-level BPE.

Each writes tokenizer.json and a tokenizer_config.json (bos/eos/pad and the family's chat template) into a
directory, so that both fmjax's HFTokenizer and transformers' AutoTokenizer load it. Training is
deterministic (a fixed corpus, one thread of work), and offline.
"""

from __future__ import annotations

import json
import os

CORPUS = ['Hello! How can I help you today?', 'What is two plus two? Two plus two is four.',
          'You are a helpful assistant. Answer briefly.', 'The capital of France is Paris.',
          'system user assistant tool', 'def add(a, b):\n    return a + b\n', 'Thanks, bye!  See you.']

QWEN_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'
QWEN_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
LLAMA3_SPECIALS = ('<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                   '<|eot_id|>')


def _qwen_template(default_system: bool, generation_markers: bool) -> str:
  """Qwen2.5-Instruct's ChatML template (tool calls left out)."""
  if default_system:
    system = ("{%- else %}\n    {{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}\n")
  else:
    system = ''
  if generation_markers:
    assistant = ("        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
                 "{% endgeneration %}{{- '\\n' }}\n")
  else:
    assistant = "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
  return ("{%- if messages[0]['role'] == 'system' %}\n"
          "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
          + system +
          "{%- endif %}\n"
          "{%- for message in messages %}\n"
          "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
          "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
          "    {%- elif message.role == 'assistant' %}\n"
          + assistant +
          "    {%- endif %}\n"
          "{%- endfor %}\n"
          "{%- if add_generation_prompt %}\n"
          "    {{- '<|im_start|>assistant\\n' }}\n"
          "{%- endif %}\n")


def _llama3_template(generation_markers: bool) -> str:
  """Llama 3 Instruct's header template (content trimmed, bos_token first)."""
  if generation_markers:
    body = ("{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' %}"
            "{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}"
            "{% if message['role'] == 'assistant' %}{{ header }}{% generation %}"
            "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
            "{% else %}{{ header + message['content'] | trim + '<|eot_id|>' }}{% endif %}")
  else:
    body = ("{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
            " + message['content'] | trim + '<|eot_id|>' %}"
            "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}")
  return ("{% set loop_messages = messages %}{% for message in loop_messages %}" + body + "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _write(directory: str, specials, config: dict) -> str:
  from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,  # pylint: disable=import-outside-toplevel
                          trainers)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'tokenizer.json')
  tok.save(path)
  added = {str(tok.token_to_id(s)): {'content': s, 'lstrip': False, 'normalized': False, 'rstrip': False,
                                     'single_word': False, 'special': True} for s in specials}
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'added_tokens_decoder': added,
            'model_max_length': 4096, 'clean_up_tokenization_spaces': False, **config}
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=1)
  return path


def qwen_style_tokenizer(directory: str, generation_markers: bool = False, default_system: bool = True) -> str:
  """A Qwen2.5-Instruct-like tokenizer (ChatML, no BOS, eos <|im_end|>, pad <|endoftext|>); its tokenizer.json."""
  return _write(str(directory), QWEN_SPECIALS, {
      'bos_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>',
      'chat_template': _qwen_template(default_system, generation_markers)})


def llama3_style_tokenizer(directory: str, generation_markers: bool = False) -> str:
  """A Llama-3-Instruct-like tokenizer (<|begin_of_text|> BOS, eos <|eot_id|>); its tokenizer.json."""
  return _write(str(directory), LLAMA3_SPECIALS, {
      'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>', 'pad_token': '<|end_of_text|>',
      'chat_template': _llama3_template(generation_markers)})
