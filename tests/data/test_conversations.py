"""Chat data: reading conversations (messages, ShareGPT, Parquet) and pairs, and encoding SFT rows and DPO pairs."""

import gzip
import json

import numpy as np
import pytest

from fmjax.data import chat_templates, conversations, tokenizers
from fmjax.data.conversations import Conversation, Pair
from fmjax.data.errors import DataError

CHATS = [
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
     {'role': 'assistant', 'content': 'Hello.'}],
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'},
     {'role': 'user', 'content': 'And 3+3?'}, {'role': 'assistant', 'content': '6'}],
]
SHAREGPT = {'system': 'system', 'user': 'human', 'assistant': 'gpt'}


def _byte_template():
  return chat_templates.for_tokenizer(tokenizers.ByteTokenizer())


def _jsonl(path, rows, opener=open):
  with opener(path, 'wt', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(path)


def test_messages_sharegpt_and_parquet_read_the_same(tmp_path):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  for d in 'abc':
    (tmp_path / d).mkdir()
  _jsonl(tmp_path / 'a' / 'x.jsonl', [{'messages': c, 'id': i} for i, c in enumerate(CHATS)])
  _jsonl(tmp_path / 'b' / 'x.jsonl.gz', [{'conversations': [{'from': SHAREGPT[m['role']], 'value': m['content']}
                                                           for m in c]} for c in CHATS], gzip.open)
  pq.write_table(pa.Table.from_pylist([{'messages': c} for c in CHATS]), str(tmp_path / 'c' / 'x.parquet'))
  read = {d: conversations.read_conversations(str(tmp_path / d / '*')) for d in 'abc'}
  for d in 'abc':
    assert [c.messages for c in read[d]] == CHATS, d
  assert read['a'][1].where.endswith('a/x.jsonl:2') and read['c'][0].where.endswith('x.parquet:row 1')
  assert conversations.read_conversations(str(tmp_path / 'b' / '*'), field='conversations')[0].messages == CHATS[0]


@pytest.mark.parametrize('row,match', [
    ({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'robot', 'content': 'b'}]},
     r"x.jsonl:2: messages\[1\] has role 'robot'; allowed roles: system, user, assistant"),
    ({'conversations': [{'from': 'alien', 'value': 'b'}]}, r"x.jsonl:2: conversations\[0\] has from 'alien'; allowed"),
    ({'text': 'hi', 'id': 3}, r"x.jsonl:2: no field 'messages' or 'conversations' \(it has text, id\)"),
    ({'messages': [{'role': 'user', 'content': ['a']}]}, r'x.jsonl:2: messages\[0\] \(user\) content is list'),
])
def test_bad_rows_name_file_line(tmp_path, row, match):
  path = _jsonl(tmp_path / 'x.jsonl', [{'messages': CHATS[0]}, row])
  with pytest.raises(DataError, match=match):
    conversations.read_conversations(path)


def _convs(*chats):
  return [Conversation(c, f'f.jsonl:{i + 1}') for i, c in enumerate(chats)]


def test_sft_weights_are_the_mask_shifted_to_targets():
  template = _byte_template()
  batch, counts = conversations.encode_sft(_convs(*CHATS), template, seq_len=200, pack=False)
  assert batch['inputs'].shape == (2, 200) and counts.kept == 2 and counts.read == 2
  for r, chat in enumerate(CHATS):
    rendered = template.render(chat)
    n = len(rendered.ids)
    assert batch['inputs'][r, :n].tolist() == rendered.ids.tolist()
    assert batch['targets'][r, :n - 1].tolist() == rendered.ids[1:].tolist()
    assert batch['weights'][r, :n - 1].tolist() == rendered.assistant[1:].astype(np.float32).tolist()
    assert (batch['weights'][r, n - 1:] == 0).all() and (batch['segment_ids'][r, n:] == 0).all()
    assert (batch['inputs'][r, n:] == template.tokenizer.pad_id).all()
  # last_turn: only the final assistant message's tokens.
  last, _ = conversations.encode_sft(_convs(CHATS[1]), template, seq_len=200, pack=False, loss_on='last_turn')
  rendered = template.render(CHATS[1])
  want = (rendered.assistant & (rendered.turn == 3))[1:].astype(np.float32)
  assert last['weights'][0, :len(want)].tolist() == want.tolist() and 0 < want.sum() < rendered.assistant.sum()


def test_packing_places_whole_conversations():
  template = _byte_template()
  lengths = [len(template.render(c).ids) for c in CHATS]
  chats = [CHATS[0], CHATS[1], CHATS[0]]
  seq_len = lengths[0] + lengths[1] - 1     # rows of lengths[0] + lengths[1] tokens: the third starts row 2
  batch, counts = conversations.encode_sft(_convs(*chats), template, seq_len=seq_len)
  assert batch['inputs'].shape == (2, seq_len) and counts.kept == 3 and counts.truncated == 0
  a, b = lengths
  seg, pos = batch['segment_ids'], batch['positions']
  assert seg[0].tolist() == [1] * a + [2] * (b - 1)
  assert pos[0].tolist() == list(range(a)) + list(range(b - 1))
  assert seg[1, :a].tolist() == [1] * a and (seg[1, a:] == 0).all()
  row = np.concatenate([template.render(CHATS[0]).ids, template.render(CHATS[1]).ids])
  mask = np.concatenate([template.render(CHATS[0]).assistant, template.render(CHATS[1]).assistant])
  assert batch['inputs'][0].tolist() == row[:-1].tolist()
  assert batch['weights'][0].tolist() == mask[1:].astype(np.float32).tolist()
  assert batch['weights'][0, a - 1] == 0          # no loss across the conversation boundary


def test_truncate_drop_and_counts():
  template = _byte_template()
  long_prompt = [{'role': 'user', 'content': 'x' * 300}, {'role': 'assistant', 'content': 'y'}]
  long_answer = [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'z' * 300}]
  no_assistant = [{'role': 'user', 'content': 'alone'}]
  convs = _convs(CHATS[0], long_prompt, long_answer, no_assistant)
  batch, counts = conversations.encode_sft(convs, template, seq_len=64)
  assert (counts.read, counts.kept, counts.truncated) == (4, 2, 1)
  assert counts.dropped_too_long == 1 and counts.examples['dropped_too_long'] == ['f.jsonl:2']
  assert counts.dropped_no_assistant == 1 and counts.examples['dropped_no_assistant'] == ['f.jsonl:4']
  assert counts.describe('sft train') == ('sft train: 4 conversations, 2 kept (1 truncated), 1 dropped: too long '
                                          '(f.jsonl:2), 1 dropped: no assistant turn (f.jsonl:4)')
  assert batch['inputs'].shape[0] == 2 and batch['weights'][1].sum() > 0      # the truncated answer keeps its loss
  _, dropping = conversations.encode_sft(convs, template, seq_len=64, too_long='drop')
  assert dropping.kept == 1 and dropping.dropped_too_long == 2 and dropping.truncated == 0
  with pytest.raises(DataError, match='no conversation left.*1 dropped: no assistant turn'):
    conversations.encode_sft(_convs(no_assistant), template, seq_len=64)


def test_render_errors_are_counted(tmp_path):
  pytest.importorskip('tokenizers')
  import chat_fixtures  # pylint: disable=import-outside-toplevel
  tok = tokenizers.load_tokenizer(chat_fixtures.qwen_style_tokenizer(tmp_path / 'q'))
  path = tmp_path / 't.jinja'
  path.write_text("{% for m in messages %}{% if m.content == 'bad' %}{{ raise_exception('no bad words') }}{% endif %}"
                  "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  template = chat_templates.for_tokenizer(tok, str(path))
  bad = [{'role': 'user', 'content': 'bad'}, {'role': 'assistant', 'content': 'ok'}]
  batch, counts = conversations.encode_sft(_convs(CHATS[1], bad), template, seq_len=64)
  assert counts.kept == 1 and counts.dropped_render == 1 and 'no bad words' in counts.examples['dropped_render'][0]
  assert counts.examples['dropped_render'][0].startswith('f.jsonl:2') and batch['weights'].sum() > 0
  assert template.stop_ids == (tok.eos_id,)


def test_encode_pairs_layout_and_identical():
  template = _byte_template()
  prompt = [{'role': 'user', 'content': 'Name a colour.'}]
  pairs = [Pair(prompt, [{'role': 'assistant', 'content': 'Blue.'}], [{'role': 'assistant', 'content': 'Dog!'}],
                'p.jsonl:1'),
           Pair(prompt, [{'role': 'assistant', 'content': 'Same'}], [{'role': 'assistant', 'content': 'Same'}],
                'p.jsonl:2'),
           Pair(CHATS[1][:3], [CHATS[1][3]], [{'role': 'assistant', 'content': 'seven'}], 'p.jsonl:3')]
  chosen, rejected, counts = conversations.encode_pairs(pairs, template, seq_len=96)
  assert chosen['inputs'].shape == rejected['inputs'].shape == (2, 96)
  assert counts.dropped_identical == 1 and counts.examples['dropped_identical'] == ['p.jsonl:2']
  assert 'pairs, 2 kept' in counts.describe('dpo') and 'chosen = rejected (p.jsonl:2)' in counts.describe('dpo')
  for batch, side in ((chosen, pairs[2].chosen), (rejected, pairs[2].rejected)):
    rendered = template.render(CHATS[1][:3] + side)
    n = len(rendered.ids)
    assert batch['inputs'][1, :n].tolist() == rendered.ids.tolist()
    want = (rendered.assistant & (rendered.turn == 3))[1:]      # the response only, not the earlier answer
    assert batch['weights'][1, :n - 1].tolist() == want.astype(np.float32).tolist()
    assert (batch['segment_ids'][1, :n] == 1).all() and (batch['segment_ids'][1, n:] == 0).all()
  # Truncation: a response pushed past seq_len drops the pair; too_long='drop' drops any long side.
  long = Pair([{'role': 'user', 'content': 'x' * 200}], pairs[0].chosen, pairs[0].rejected, 'p.jsonl:4')
  _, _, counts = conversations.encode_pairs(pairs[:1] + [long], template, seq_len=96)
  assert counts.kept == 1 and counts.examples['dropped_too_long'] == ['p.jsonl:4']
  tail = Pair(prompt, pairs[0].chosen, [{'role': 'assistant', 'content': 'r' * 200}], 'p.jsonl:5')
  _, _, counts = conversations.encode_pairs([tail], template, seq_len=96)
  assert counts.kept == 1 and counts.truncated == 1
  with pytest.raises(DataError, match='no preference pair left.*too long'):
    conversations.encode_pairs([tail], template, seq_len=96, too_long='drop')


def test_read_pairs_forms(tmp_path):
  user, turns = {'role': 'user', 'content': 'Hi'}, CHATS[1]
  rows = [{'prompt': 'Hi', 'chosen': 'Hello.', 'rejected': 'Go away.'},
          {'prompt': 'Hi', 'chosen': [user, {'role': 'assistant', 'content': 'A'}],     # UltraFeedback style
           'rejected': [user, {'role': 'assistant', 'content': 'B'}]},
          {'chosen': turns, 'rejected': turns[:3] + [{'role': 'assistant', 'content': '7'}]},
          {'prompt': [user], 'chosen': [{'role': 'assistant', 'content': 'A'}], 'rejected': [
              {'role': 'assistant', 'content': 'B'}]}]
  pairs = conversations.read_pairs(_jsonl(tmp_path / 'p.jsonl', rows))
  assert pairs[0].prompt == [user] and pairs[0].chosen == [{'role': 'assistant', 'content': 'Hello.'}]
  assert pairs[1].prompt == [user] and pairs[1].rejected == [{'role': 'assistant', 'content': 'B'}]
  assert pairs[2].prompt == turns[:3] and pairs[2].chosen == turns[3:] and pairs[2].where.endswith('p.jsonl:3')
  assert pairs[3].prompt == [user] and pairs[3].chosen == [{'role': 'assistant', 'content': 'A'}]
  bad = _jsonl(tmp_path / 'bad.jsonl', [rows[0], {'chosen': [user], 'rejected': [user]}])
  with pytest.raises(DataError, match='bad.jsonl:2: .*(chosen does not end in an assistant|no user message)'):
    conversations.read_pairs(bad)
  bad = _jsonl(tmp_path / 'bad2.jsonl', [{'prompt': 'Hi', 'chosen': [user, {'role': 'assistant', 'content': 'A'}],
                                          'rejected': [user, {'role': 'assistant', 'content': 'B'}, user]}])
  with pytest.raises(DataError, match='bad2.jsonl:1: rejected does not end in an assistant message'):
    conversations.read_pairs(bad)
  with pytest.raises(DataError, match="bad3.jsonl:1: no field 'rejected'"):
    conversations.read_pairs(_jsonl(tmp_path / 'bad3.jsonl', [{'prompt': 'a', 'chosen': 'b'}]))
