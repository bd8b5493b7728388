"""Chat templates: ids and assistant masks as transformers renders them (generation markers), hand-built
masks for incremental templates, the built-in template, stop ids and one-line errors."""

import pickle

import numpy as np
import pytest

pytest.importorskip('tokenizers')
pytest.importorskip('jinja2')

from fmjax.data import chat_templates, tokenizers  # noqa: E402
from fmjax.data.chat_templates import ChatTemplateError  # noqa: E402
import chat_fixtures  # noqa: E402

MESSAGES = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello!'},
            {'role': 'assistant', 'content': 'Hi there.'}, {'role': 'user', 'content': 'What is two plus two?'},
            {'role': 'assistant', 'content': 'Four.'}]
STYLES = {'qwen': chat_fixtures.qwen_style_tokenizer, 'llama3': chat_fixtures.llama3_style_tokenizer}


def _load(tmp_path, style, markers=False):
  path = STYLES[style](tmp_path / f'{style}{int(markers)}', generation_markers=markers)
  return tokenizers.load_tokenizer(path)


def _reference(tok):
  transformers = pytest.importorskip('transformers')
  return transformers.AutoTokenizer.from_pretrained(tok.directory)


@pytest.mark.parametrize('style', STYLES)
def test_generation_markers_match_transformers(tmp_path, style):
  tok = _load(tmp_path, style, markers=True)
  template = chat_templates.for_tokenizer(tok)
  assert template.name == 'tokenizer' and '{% generation %}' in template.source
  reference = _reference(tok)
  for messages in (MESSAGES, MESSAGES[1:3], MESSAGES[:4]):
    ours = template.render(messages)
    out = reference.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours.ids.tolist() == list(out['input_ids'])
    assert ours.assistant.astype(int).tolist() == list(out['assistant_masks'])
    assert ours.assistant.any() and ours.text == reference.apply_chat_template(messages, tokenize=False)
    assert ours.ids.dtype == np.int32 and len(ours.turn) == len(ours.ids)
    assert set(ours.turn[ours.assistant].tolist()) == {i for i, m in enumerate(messages) if m['role'] == 'assistant'}
    assert (ours.turn[~ours.assistant] == -1).all()


def _expected(tok, pieces):
  """Ids and mask of (text, is_assistant, turn) pieces encoded one by one."""
  ids, mask, turn = [], [], []
  for text, assistant, t in pieces:
    part = tok.encode(text).tolist()
    ids += part
    mask += [assistant] * len(part)
    turn += [t] * len(part)
  return ids, mask, turn


def test_qwen_style_without_markers_by_hand(tmp_path):
  tok = _load(tmp_path, 'qwen')
  template = chat_templates.for_tokenizer(tok)
  ids, mask, turn = _expected(tok, [
      ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n', 0, -1),
      ('Hi there.<|im_end|>\n', 1, 2),      # content, end of turn and the newline the template writes after it
      ('<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n', 0, -1),
      ('Four.<|im_end|>\n', 1, 4)])
  ours = template.render(MESSAGES)
  assert ours.ids.tolist() == ids and ours.assistant.tolist() == [bool(m) for m in mask] and ours.turn.tolist() == turn
  assert ours.ids.tolist() == list(_reference(tok).apply_chat_template(MESSAGES, tokenize=True, return_dict=True)
                                   ['input_ids'])
  # No system message: the template's default system prompt comes first, outside the mask.
  ours = template.render(MESSAGES[1:3])
  ids, mask, _ = _expected(tok, [(f'<|im_start|>system\n{chat_fixtures.QWEN_SYSTEM}<|im_end|>\n'
                                  '<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n', 0, -1),
                                 ('Hi there.<|im_end|>\n', 1, 1)])
  assert ours.ids.tolist() == ids and ours.assistant.tolist() == [bool(m) for m in mask]


def test_llama3_style_without_markers_by_hand(tmp_path):
  tok = _load(tmp_path, 'llama3')
  template = chat_templates.for_tokenizer(tok)
  head = '<|start_header_id|>{}<|end_header_id|>\n\n'
  ids, mask, turn = _expected(tok, [
      ('<|begin_of_text|>' + head.format('system') + 'Be brief.<|eot_id|>' + head.format('user') + 'Hello!<|eot_id|>'
       + head.format('assistant'), 0, -1),
      ('Hi there.<|eot_id|>', 1, 2),
      (head.format('user') + 'What is two plus two?<|eot_id|>' + head.format('assistant'), 0, -1),
      ('Four.<|eot_id|>', 1, 4)])
  ours = template.render(MESSAGES)
  assert ours.ids.tolist() == ids and ours.assistant.tolist() == [bool(m) for m in mask] and ours.turn.tolist() == turn
  assert ours.ids[0] == tok.bos_id
  assert ours.ids.tolist() == list(_reference(tok).apply_chat_template(MESSAGES, tokenize=True, return_dict=True)
                                   ['input_ids'])


@pytest.mark.parametrize('style,stop', [('qwen', '<|im_end|>'), ('llama3', '<|eot_id|>')])
@pytest.mark.parametrize('markers', [False, True])
def test_prompt_ids_and_stop_ids(tmp_path, style, stop, markers):
  tok = _load(tmp_path, style, markers)
  template = chat_templates.for_tokenizer(tok)
  reference = _reference(tok)
  prompt = MESSAGES[:4]
  expected = reference.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
  assert template.prompt_ids(prompt).tolist() == list(expected['input_ids'])
  stop_id = tok.encode(stop).tolist()
  assert len(stop_id) == 1 and stop_id[0] in template.stop_ids and tok.eos_id in template.stop_ids
  clone = pickle.loads(pickle.dumps(template))
  assert clone.render(MESSAGES).ids.tolist() == template.render(MESSAGES).ids.tolist()


def test_hf_tokenizer_chat_template_sources(tmp_path):
  tok = _load(tmp_path, 'qwen')
  assert tok.chat_template and '<|im_start|>' in tok.chat_template
  assert pickle.loads(pickle.dumps(tok)).chat_template == tok.chat_template
  ids, offsets = tok.encode_with_offsets('<|im_start|>user\nHi')
  assert ids[0] == tok.encode('<|im_start|>')[0] and offsets[0] == (0, 12) and len(offsets) == len(ids)
  assert ids[0] in tok.special_token_ids()
  # A list of named templates: the 'default' one; a chat_template.jinja file when the config has none.
  import json  # pylint: disable=import-outside-toplevel
  config_path = tmp_path / 'qwen0' / 'tokenizer_config.json'
  config = json.loads(config_path.read_text())
  config['chat_template'] = [{'name': 'tool_use', 'template': 'x'}, {'name': 'default', 'template': 'D'}]
  config_path.write_text(json.dumps(config))
  assert tokenizers.load_tokenizer(str(tmp_path / 'qwen0' / 'tokenizer.json')).chat_template == 'D'
  del config['chat_template']
  config_path.write_text(json.dumps(config))
  (tmp_path / 'qwen0' / 'chat_template.jinja').write_text('J{{ messages }}')
  assert tokenizers.load_tokenizer(str(tmp_path / 'qwen0' / 'tokenizer.json')).chat_template == 'J{{ messages }}'
  (tmp_path / 'qwen0' / 'chat_template.jinja').unlink()
  plain = tokenizers.load_tokenizer(str(tmp_path / 'qwen0' / 'tokenizer.json'))
  assert plain.chat_template is None and chat_templates.for_tokenizer(plain).name == 'fmjax'


def test_builtin_template_on_bytes_by_hand():
  tok = tokenizers.ByteTokenizer()
  template = chat_templates.for_tokenizer(tok)
  assert template.name == 'fmjax' and template.source is None and template.stop_ids == (tok.eos_id,)
  enc = lambda text: [b + 3 for b in text.encode()]  # noqa: E731
  ours = template.render(MESSAGES)
  ids = ([1] + enc('System: Be brief.\nUser: Hello!\nAssistant: ') + enc('Hi there.') + [2] + enc('\n')
         + enc('User: What is two plus two?\nAssistant: ') + enc('Four.') + [2] + enc('\n'))
  assert ours.ids.tolist() == ids and ours.text is None
  first = 1 + len('System: Be brief.\nUser: Hello!\nAssistant: ')
  second = first + len('Hi there.') + 1 + len('\nUser: What is two plus two?\nAssistant: ')
  mask = np.zeros(len(ids), bool)
  mask[first:first + 10] = True
  mask[second:second + 6] = True
  assert ours.assistant.tolist() == mask.tolist()
  assert ours.turn[first] == 2 and ours.turn[second + 5] == 4 and ours.turn[0] == -1
  assert template.prompt_ids(MESSAGES[1:2]).tolist() == [1] + enc('User: Hello!\nAssistant: ')
  with pytest.raises(ChatTemplateError, match='message 1 is a system message'):
    template.render(MESSAGES[1:2] + [MESSAGES[0], MESSAGES[2]])


def test_jinja_file_refused_for_non_hf_tokenizers(tmp_path):
  path = tmp_path / 't.jinja'
  path.write_text('{{ messages }}')
  with pytest.raises(ChatTemplateError, match='needs a Hugging Face tokenizer'):
    chat_templates.for_tokenizer(tokenizers.ByteTokenizer(), str(path))
  assert chat_templates.for_tokenizer(tokenizers.ByteTokenizer(), 'fmjax').name == 'fmjax'


@pytest.mark.parametrize('messages,match', [
    ([{'role': 'tool', 'content': 'x'}], "message 0 has role 'tool'"),
    ([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': None}], 'message 1 .* not a string'),
    (['hi'], 'message 0 is a str')])
def test_bad_messages(messages, match):
  with pytest.raises(ChatTemplateError, match=match):
    chat_templates.for_tokenizer(tokenizers.ByteTokenizer()).render(messages)


def _file_template(tmp_path, source):
  tok = _load(tmp_path, 'qwen')
  path = tmp_path / 'custom.jinja'
  path.write_text(source)
  return chat_templates.for_tokenizer(tok, str(path))


def test_render_error_compile_error_and_non_incremental(tmp_path):
  raising = _file_template(tmp_path, "{% for m in messages %}{% if m.role == 'system' %}"
                                     "{{ raise_exception('System role not supported') }}{% endif %}"
                                     "{{ m.content }}{% endfor %}")
  assert raising.name.endswith('custom.jinja')
  with pytest.raises(ChatTemplateError) as e:
    raising.render(MESSAGES)
  assert 'custom.jinja failed to render: System role not supported' in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ChatTemplateError) as e:
    _file_template(tmp_path, '{% for m in messages %}{{ m.content }')
  assert 'custom.jinja does not compile' in str(e.value) and '\n' not in str(e.value)
  # Rewrites earlier turns once the conversation grows: the message count is written first.
  rewriting = _file_template(tmp_path, "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                                       "{{ m.content }}<|im_end|>\n{% endfor %}"
                                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with pytest.raises(ChatTemplateError, match='does not render conversations incrementally.*chat_template=fmjax'):
    rewriting.render(MESSAGES)


@pytest.mark.parametrize('style', STYLES)
def test_special_token_variables_as_transformers_passes_them(tmp_path, style):
  """bos_token is the configured one (none for Qwen: it renders empty, not a guessed token)."""
  tok = _load(tmp_path, style)
  source = ("{{ bos_token }}[{{ pad_token }}]{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  path = tmp_path / 'vars.jinja'
  path.write_text(source)
  ours = chat_templates.for_tokenizer(tok, str(path)).render(MESSAGES[1:3])
  reference = _reference(tok).apply_chat_template(MESSAGES[1:3], chat_template=source, tokenize=False)
  assert ours.text == reference
