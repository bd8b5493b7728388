"""Chat templates: ids and assistant masks against transformers' own rendering, and by hand."""

import json

import numpy as np
import pytest

from fmjax.data import chat_templates, conversations
from fmjax.data.tokenizers import ByteTokenizer, HFTokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
          "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_PLAIN = CHATML.replace('{% generation %}', '').replace('{% endgeneration %}', '')
MESSAGES = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi there'},
            {'role': 'assistant', 'content': 'hello'}, {'role': 'user', 'content': 'and now?'},
            {'role': 'assistant', 'content': 'bye now'}]


def qwen_style_tokenizer(directory, template=CHATML):
  """A tiny byte-level BPE with ChatML specials and no BOS, saved as transformers saves one."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(['hi there hello and now bye be brief user assistant system'] * 20, trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>',
      'bos_token': None, 'chat_template': template}))
  return str(directory / 'tokenizer.json')


def test_builtin_template_by_hand():
  tok = ByteTokenizer()
  t = chat_templates.for_tokenizer(tok)
  r = t.render(MESSAGES[1:3])
  enc = lambda s: list(tok.encode(s))
  want = [tok.bos_id] + enc('User: hi there\n') + enc('Assistant: ') + enc('hello') + [tok.eos_id] + enc('\n')
  assert r.ids.tolist() == want
  start = 1 + len(enc('User: hi there\nAssistant: '))
  assert np.flatnonzero(r.assistant).tolist() == list(range(start, start + 6))   # 'hello' and EOS
  assert t.prompt_ids(MESSAGES[1:2]).tolist() == [tok.bos_id] + enc('User: hi there\nAssistant: ')
  assert t.stop_ids == (tok.eos_id,)


@pytest.mark.hf
def test_jinja_ids_and_mask_equal_transformers(tmp_path):
  from transformers import AutoTokenizer
  path = qwen_style_tokenizer(tmp_path / 'tok')
  ours = chat_templates.for_tokenizer(HFTokenizer(path))
  theirs = AutoTokenizer.from_pretrained(str(tmp_path / 'tok'))
  out = theirs.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  r = ours.render(MESSAGES)
  assert r.ids.tolist() == list(out['input_ids'])
  assert r.assistant.astype(int).tolist() == list(out['assistant_masks'])
  gen = theirs.apply_chat_template(MESSAGES[:4], tokenize=True, add_generation_prompt=True, return_dict=True)
  assert ours.prompt_ids(MESSAGES[:4]).tolist() == list(gen['input_ids'])
  assert theirs.convert_tokens_to_ids('<|im_end|>') in ours.stop_ids


@pytest.mark.hf
def test_template_without_markers_masks_what_each_assistant_turn_adds(tmp_path):
  """Hand-built: the tokens of 'hello<|im_end|>\\n' and 'bye now<|im_end|>\\n' and nothing else."""
  path = qwen_style_tokenizer(tmp_path / 'tok', CHATML_PLAIN)
  tok = HFTokenizer(path)
  r = chat_templates.for_tokenizer(tok).render(MESSAGES)
  masked = tok.decode(r.ids[r.assistant])
  assert masked == 'hello<|im_end|>\nbye now<|im_end|>\n'
  assert set(r.turn[r.assistant].tolist()) == {2, 4}
  marked = chat_templates.for_tokenizer(HFTokenizer(qwen_style_tokenizer(tmp_path / 'm'))).render(MESSAGES)
  assert marked.assistant.tolist() == r.assistant.tolist()


def test_bad_templates_and_messages_are_one_line():
  tok = ByteTokenizer()
  with pytest.raises(chat_templates.ChatTemplateError, match="message 1 has role 'robot'"):
    chat_templates.for_tokenizer(tok).render([{'role': 'user', 'content': 'x'}, {'role': 'robot', 'content': 'y'}])
  with pytest.raises(chat_templates.ChatTemplateError, match='needs a Hugging Face tokenizer'):
    chat_templates.for_tokenizer(tok, 'my.jinja')


def test_sft_weights_are_the_mask_shifted_and_packing_keeps_conversations_apart(tmp_path):
  tok = ByteTokenizer()
  t = chat_templates.for_tokenizer(tok)
  convs = [conversations.Conversation([{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}],
                                      f'row {i}') for i in range(3)]
  convs.append(conversations.Conversation([{'role': 'user', 'content': 'only a question'}], 'row 3'))
  rows, counts = conversations.encode_sft(convs, t, 96, pack=True)   # 3 x 26 tokens in one row
  assert counts.kept == 3 and counts.dropped_no_assistant == 1 and 'row 3' in counts.describe('sft')
  r0 = t.render(convs[0].messages)
  n = len(r0.ids)
  assert rows['inputs'].shape == (1, 96)
  np.testing.assert_array_equal(rows['weights'][0, :n - 1], r0.assistant[1:])   # weight on assistant targets
  assert rows['weights'][0, n - 1] == 0                                           # never across conversations
  assert rows['segment_ids'][0, n] == 2 and rows['positions'][0, n] == 0
  unpacked, _ = conversations.encode_sft(convs[:3], t, 64, pack=False)
  assert unpacked['inputs'].shape == (3, 64)


def test_pairs_identical_dropped_and_chat_form_split(tmp_path):
  rows = [{'prompt': 'q', 'chosen': 'a', 'rejected': 'a'},
          {'chosen': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'yes'}],
           'rejected': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'no'}]}]
  (tmp_path / 'p.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  pairs = conversations.read_pairs(str(tmp_path / 'p.jsonl'))
  assert pairs[1].prompt == [{'role': 'user', 'content': 'q'}] and pairs[1].chosen[0]['content'] == 'yes'
  chosen, rejected, counts = conversations.encode_pairs(pairs, chat_templates.for_tokenizer(ByteTokenizer()), 32)
  assert counts.dropped_identical == 1 and p_where(counts) and chosen['inputs'].shape == (1, 32)
  assert ByteTokenizer().decode(chosen['targets'][0][chosen['weights'][0] > 0]) == 'yes'


def p_where(counts):
  return counts.examples['identical'][0].endswith('p.jsonl:1')


def test_unknown_role_names_the_row(tmp_path):
  (tmp_path / 'c.jsonl').write_text(json.dumps({'conversations': [{'from': 'alien', 'value': 'x'}]}) + '\n')
  with pytest.raises(Exception, match=r"c.jsonl:1: unknown from 'alien'"):
    conversations.read_conversations(str(tmp_path / 'c.jsonl'))
