"""Chat templates: a conversation -> token ids with a mask of the assistant's tokens (SFT / DPO loss).

A `ChatTemplate` renders `messages` ([{'role', 'content'}], roles in ROLES) into `Rendered`: ids, a
per-token `assistant` mask and the index of the assistant message each token belongs to (`turn`).

Jinja templates (the tokenizer's `chat_template`, or a .jinja file) render as transformers'
`apply_chat_template` does: a sandboxed environment with trim_blocks and lstrip_blocks, the loop
controls, `raise_exception`, `strftime_now` and a non-escaping `tojson`, and the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`. The text is tokenized once (special
tokens written in it recognised); a token is an assistant token when its characters overlap an
assistant span, as transformers' return_assistant_tokens_mask marks them. The spans are the
`{% generation %}...{% endgeneration %}` blocks when the template has them; otherwise, for assistant
message i, the text that rendering messages[:i+1] adds to rendering messages[:i] with the generation
prompt (its content and the end-of-turn the template writes), which needs a template that renders
conversations incrementally.

The built-in template 'fmjax' (byte, char and SentencePiece tokenizers, and any without a template)
works on ids:

  [bos] ("System: " content "\\n")?  then per message  "User: " content "\\n"  or
  "Assistant: " [content <eos>] "\\n"

where the bracketed part is the assistant span; the generation prompt is "Assistant: ". Text pieces
are encoded with tokenizer.encode, bos and eos are the tokenizer's ids. A system message may only come
first.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime

import numpy as np

from fmjax.data.errors import DataError

ROLES = ('system', 'user', 'assistant')
BUILTIN = 'fmjax'
_OPEN, _CLOSE = '\U000F0000', '\U000F0001'    # private-use marks around {% generation %} output
_GENERATION = re.compile(r'\{%-?\s*generation\s*-?%\}')
_PROBE = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]


class ChatTemplateError(DataError):
  """A chat template that does not compile or render, or messages it cannot take."""


@dataclasses.dataclass
class Rendered:
  """One conversation as the template renders it."""
  ids: np.ndarray          # int32 token ids (bos included where the template writes it)
  assistant: np.ndarray    # bool: tokens of assistant messages (content and their end-of-turn)
  turn: np.ndarray         # int32: index in messages of a token's assistant message, -1 elsewhere
  text: str | None         # the rendered text (Jinja templates); None for the built-in


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def check_messages(messages) -> None:
  """Each message a dict with a role in ROLES and a string content (ChatTemplateError naming the index)."""
  if not isinstance(messages, (list, tuple)):
    raise ChatTemplateError(f'messages must be a list of {{role, content}} dicts, not {type(messages).__name__}')
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ChatTemplateError(f'message {i} is a {type(m).__name__}, not a {{role, content}} dict')
    if m.get('role') not in ROLES:
      raise ChatTemplateError(f'message {i} has role {m.get("role")!r}: use one of {", ".join(ROLES)}')
    if not isinstance(m.get('content'), str):
      raise ChatTemplateError(f'message {i} ({m["role"]}) has content of type {type(m.get("content")).__name__}, '
                              'not a string')
    if _OPEN in m['content'] or _CLOSE in m['content']:
      raise ChatTemplateError(f'message {i} holds the private-use characters U+F0000/U+F0001 that mark '
                              'assistant spans: remove them')


def _compile(source: str, name: str):
  """The template compiled as transformers compiles chat templates, {% generation %} marking its output."""
  import jinja2  # pylint: disable=import-outside-toplevel
  import jinja2.ext  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

  class GenerationMarks(jinja2.ext.Extension):
    """{% generation %}body{% endgeneration %} -> the body between the two private-use marks."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method('_marked'), [], [], body).set_lineno(lineno)

    def _marked(self, caller):
      return _OPEN + caller() + _CLOSE

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationMarks, jinja2.ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateError as e:
    where = f' (line {e.lineno})' if getattr(e, 'lineno', None) else ''
    raise ChatTemplateError(f'chat template {name} does not compile{where}: {_first_line(e)}') from None


def _token_mask(offsets, spans: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """Tokens whose characters overlap a (start, end, turn) span (spans in order): mask and turn."""
  assistant = np.zeros(len(offsets), bool)
  turn = np.full(len(offsets), -1, np.int32)
  k = 0
  for t, (start, end) in enumerate(offsets):
    while k < len(spans) and start >= spans[k][1]:
      k += 1
    if k == len(spans):
      break
    if end > spans[k][0]:
      assistant[t], turn[t] = True, spans[k][2]
  return assistant, turn


class ChatTemplate:
  """A tokenizer's way of writing conversations: the built-in 'fmjax' template or a Jinja one."""

  def __init__(self, tokenizer, name: str = BUILTIN, source: str | None = None):
    self.tokenizer, self.name, self.source = tokenizer, name, source
    self._compiled = None if source is None else _compile(source, name)
    self._marked = source is not None and bool(_GENERATION.search(source))
    self.stop_ids = self._stop_ids()

  def __repr__(self) -> str:
    return f'ChatTemplate({self.name!r})'

  def __getstate__(self):
    return {'tokenizer': self.tokenizer, 'name': self.name, 'source': self.source}

  def __setstate__(self, state):
    self.__init__(state['tokenizer'], state['name'], state['source'])

  def _stop_ids(self) -> tuple[int, ...]:
    """eos, plus (Jinja) the special tokens inside the assistant span of a probe conversation."""
    stops = [int(self.tokenizer.eos_id)]
    if self.source is not None:
      try:
        probe = self.render(_PROBE)
      except ChatTemplateError:
        return tuple(stops)
      special = self.tokenizer.special_token_ids()
      stops += [int(i) for i in probe.ids[probe.assistant] if int(i) in special and int(i) not in stops]
    return tuple(stops)

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """The conversation's ids, assistant mask and turns (ChatTemplateError if the template refuses it)."""
    check_messages(messages)
    if self.source is None:
      return self._render_builtin(messages, add_generation_prompt)
    text, spans = self._text_and_spans(messages, add_generation_prompt)
    ids, offsets = self.tokenizer.encode_with_offsets(text)
    assistant, turn = _token_mask(offsets, spans)
    return Rendered(np.asarray(ids, np.int32), assistant, turn, text)

  def prompt_ids(self, messages: list[dict]) -> np.ndarray:
    """What generation continues: the conversation rendered with the generation prompt."""
    return self.render(messages, add_generation_prompt=True).ids

  # Jinja templates.

  def _variables(self) -> dict:
    """bos_token, eos_token, pad_token as transformers passes them: the ones the tokenizer's config names."""
    names = getattr(self.tokenizer, 'configured_tokens', None) or {}
    return {f'{k}_token': names[k] for k in ('bos', 'eos', 'pad') if names.get(k)}

  def _jinja(self, messages, add_generation_prompt: bool) -> str:
    """The rendered text, generation marks included."""
    import jinja2  # pylint: disable=import-outside-toplevel
    try:
      return self._compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **self._variables())
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
      raise ChatTemplateError(f'chat template {self.name} failed to render: {_first_line(e)}') from None

  def _text_and_spans(self, messages, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int, int]]]:
    """The text and its assistant (start, end, message index) character spans."""
    assistants = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    if self._marked:
      return self._marked_spans(self._jinja(messages, add_generation_prompt), assistants)
    full = self._plain(messages, add_generation_prompt)
    spans = []
    for i in assistants:
      prefix = self._plain(messages[:i], True)
      upto = self._plain(messages[:i + 1], False)
      if not upto.startswith(prefix) or not full.startswith(upto):
        raise ChatTemplateError(
            f'chat template {self.name} does not render conversations incrementally (rendering messages 0..{i} '
            'does not extend the earlier turns), so assistant tokens cannot be found: add {% generation %} '
            'markers around assistant content in the template, or use finetune.chat_template=fmjax')
      if len(upto) > len(prefix):
        spans.append((len(prefix), len(upto), i))
    return full, spans

  def _plain(self, messages, add_generation_prompt: bool) -> str:
    return self._jinja(messages, add_generation_prompt).replace(_OPEN, '').replace(_CLOSE, '')

  def _marked_spans(self, marked: str, assistants: list[int]) -> tuple[str, list[tuple[int, int, int]]]:
    """Strip the generation marks, recording each block's span; blocks are numbered by assistant message."""
    pieces, spans, pos, start = [], [], 0, None
    for part in re.split(f'([{_OPEN}{_CLOSE}])', marked):
      if part == _OPEN:
        start = pos
      elif part == _CLOSE:
        if start is not None and pos > start:
          k = len(spans)
          spans.append((start, pos, assistants[k] if k < len(assistants) else -1))
        start = None
      else:
        pieces.append(part)
        pos += len(part)
    return ''.join(pieces), spans

  # The built-in template.

  def _render_builtin(self, messages, add_generation_prompt: bool) -> Rendered:
    tok = self.tokenizer
    pieces = [(np.asarray([tok.bos_id], np.int32), -1)]

    def encode(text):
      return np.asarray(tok.encode(text), np.int32)

    for i, m in enumerate(messages):
      if m['role'] == 'system':
        if i:
          raise ChatTemplateError(f'message {i} is a system message: the fmjax chat template takes one only as '
                                  'the first message')
        pieces.append((encode('System: ' + m['content'] + '\n'), -1))
      elif m['role'] == 'user':
        pieces.append((encode('User: ' + m['content'] + '\n'), -1))
      else:
        pieces.append((encode('Assistant: '), -1))
        pieces.append((np.concatenate([encode(m['content']), np.asarray([tok.eos_id], np.int32)]), i))
        pieces.append((encode('\n'), -1))
    if add_generation_prompt:
      pieces.append((encode('Assistant: '), -1))
    ids = np.concatenate([p for p, _ in pieces]).astype(np.int32)
    turn = np.concatenate([np.full(len(p), t, np.int32) for p, t in pieces])
    return Rendered(ids, turn >= 0, turn, None)


def for_tokenizer(tokenizer, spec: str = '') -> ChatTemplate:
  """The chat template `spec` names: '' the tokenizer's own (HF tokenizers that have one) else the
  built-in, 'fmjax' the built-in, else the path of a Jinja file."""
  if spec == BUILTIN or (not spec and not getattr(tokenizer, 'chat_template', None)):
    return ChatTemplate(tokenizer)
  if not spec:
    return ChatTemplate(tokenizer, 'tokenizer', tokenizer.chat_template)
  from fmjax.data import documents, tokenizers  # pylint: disable=import-outside-toplevel
  if not isinstance(tokenizer, tokenizers.HFTokenizer):
    raise ChatTemplateError(f'chat template {spec} is a Jinja file, which needs a Hugging Face tokenizer.json '
                            f'(its text holds special-token strings); tokenizer {tokenizer.spec!r} is not one: '
                            'use finetune.chat_template=fmjax')
  return ChatTemplate(tokenizer, spec, documents.read_utf8(spec, 'chat template'))
