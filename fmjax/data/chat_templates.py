"""Chat templates: a conversation rendered into token ids, with the mask of its assistant tokens.

Two kinds:
- Jinja (a Hugging Face tokenizer's `chat_template`, or a .jinja file), rendered as transformers
  renders it (sandboxed, trim_blocks / lstrip_blocks, `raise_exception`, `tojson`; variables
  `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`), then tokenized as one
  text. Assistant spans are the template's `{% generation %}` blocks when it has them; otherwise the
  text each assistant message adds after the generation prompt: render(messages[:i+1]) minus
  render(messages[:i], add_generation_prompt=True), which needs a template that renders
  conversations incrementally. A token is an assistant token when its text starts inside a span.
- The built-in 'fmjax' template, for byte, char and SentencePiece tokenizers, at the id level:
    [bos] ("System: " content "\\n")? then per exchange "User: " content "\\n" "Assistant: " [content <eos>] "\\n"
  where the bracketed part is the assistant span and "Assistant: " is the generation prompt.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from fmjax.data.errors import DataError

ROLES = ('system', 'user', 'assistant')
_OPEN, _CLOSE = '\ue000', '\ue001'      # private-use marks around {% generation %} output, stripped


class ChatTemplateError(DataError):
  """A chat template that cannot render a conversation (or cannot be compiled)."""


@dataclasses.dataclass
class Rendered:
  """A rendered conversation: ids, the assistant-token mask and each token's assistant message index."""
  ids: np.ndarray
  assistant: np.ndarray
  turn: np.ndarray
  text: str | None = None


def check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatTemplateError('a conversation must be a non-empty list of messages')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ROLES:
      role = m.get('role') if isinstance(m, dict) else type(m).__name__
      raise ChatTemplateError(f'message {i} has role {role!r}; roles are {", ".join(ROLES)}')
    if not isinstance(m.get('content'), str):
      raise ChatTemplateError(f'message {i} ({m["role"]}) has no string content')


class ChatTemplate:
  """Renders conversations for one tokenizer (see the module docstring)."""

  def __init__(self, tokenizer, name: str, source: str | None = None):
    self.tokenizer, self.name, self.source = tokenizer, name, source
    self._jinja = None
    if source is not None:
      self._jinja = _compile(source, name)
    self.stop_ids = self._stop_ids()

  def render(self, messages, add_generation_prompt: bool = False) -> Rendered:
    check_messages(messages)
    if self._jinja is None:
      return self._builtin(messages, add_generation_prompt)
    return self._render_jinja(messages, add_generation_prompt)

  def prompt_ids(self, messages) -> np.ndarray:
    return self.render(messages, add_generation_prompt=True).ids

  # -- built-in --------------------------------------------------------------------------------------
  def _builtin(self, messages, add_generation_prompt: bool) -> Rendered:
    tok = self.tokenizer
    ids, mask, turn = [tok.bos_id], [False], [-1]

    def put(piece, assistant=False, index=-1):
      piece = [int(x) for x in (tok.encode(piece) if isinstance(piece, str) else piece)]
      ids.extend(piece)
      mask.extend([assistant] * len(piece))
      turn.extend([index] * len(piece))

    for i, m in enumerate(messages):
      if m['role'] == 'system':
        if i:
          raise ChatTemplateError(f'message {i}: a system message must come first')
        put(f'System: {m["content"]}\n')
      elif m['role'] == 'user':
        put(f'User: {m["content"]}\n')
      else:
        put('Assistant: ')
        put(list(tok.encode(m['content'])) + [tok.eos_id], True, i)
        put('\n')
    if add_generation_prompt:
      put('Assistant: ')
    return Rendered(np.asarray(ids, np.int32), np.asarray(mask, bool), np.asarray(turn, np.int32))

  # -- Jinja -----------------------------------------------------------------------------------------
  def _text(self, messages, add_generation_prompt: bool) -> str:
    tok = self.tokenizer
    special = getattr(tok, 'special_tokens', {})
    try:
      return self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                bos_token=special.get('bos', ''), eos_token=special.get('eos', ''),
                                pad_token=special.get('pad', ''))
    except Exception as e:  # noqa: BLE001 - a template's own exception or a jinja error, as one line
      raise ChatTemplateError(f'chat template {self.name!r} failed to render: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None

  def _render_jinja(self, messages, add_generation_prompt: bool) -> Rendered:
    raw = self._text(messages, add_generation_prompt)
    spans = []   # (start, end, message index)
    if _OPEN in raw:
      text, pos, starts = [], 0, []
      assistants = iter([i for i, m in enumerate(messages) if m['role'] == 'assistant'])
      for ch in raw:
        if ch == _OPEN:
          starts.append(pos)
        elif ch == _CLOSE:
          spans.append((starts.pop(), pos, next(assistants, -1)))
        else:
          text.append(ch)
          pos += 1
      text = ''.join(text)
    else:
      text = raw
      for i, m in enumerate(messages):
        if m['role'] != 'assistant':
          continue
        before = self._text(messages[:i], True) if i else ''
        upto = self._text(messages[:i + 1], False)
        if not upto.startswith(before) or not text.startswith(upto):
          raise ChatTemplateError(f'chat template {self.name!r} does not render conversations incrementally (message '
                                  f'{i}); add {{% generation %}} markers to it or set finetune.chat_template=fmjax')
        spans.append((len(before), len(upto), i))
    ids, offsets = self.tokenizer.encode_with_offsets(text)
    mask = np.zeros(len(ids), bool)
    turn = np.full(len(ids), -1, np.int32)
    for k, (start, _) in enumerate(offsets):
      for a, b, i in spans:
        if a <= start < b:
          mask[k], turn[k] = True, i
          break
    return Rendered(np.asarray(ids, np.int32), mask, turn, text)

  def _stop_ids(self) -> tuple[int, ...]:
    """eos, and (Jinja) the special tokens that close an assistant message in a probe conversation."""
    stops = {int(self.tokenizer.eos_id)}
    if self._jinja is not None:
      try:
        r = self.render([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}])
      except ChatTemplateError:
        return tuple(sorted(stops))
      special = self.tokenizer.special_token_ids()
      stops.update(int(t) for t, a in zip(r.ids, r.assistant) if a and int(t) in special)
    return tuple(sorted(stops))


def _compile(source: str, name: str):
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import ext, nodes  # pylint: disable=import-outside-toplevel
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ChatTemplateError('chat templates need jinja2: pip install jinja2') from None

  class Generation(ext.Extension):
    """{% generation %}...{% endgeneration %}: the block's output between private-use marks."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return nodes.CallBlock(self.call_method('_mark'), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      return _OPEN + caller() + _CLOSE

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols])
  env.filters['tojson'] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
  env.globals['raise_exception'] = raise_exception
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f'chat template {name!r} does not compile: {e}') from None


def for_tokenizer(tokenizer, spec: str = '') -> ChatTemplate:
  """'' : the tokenizer's own chat_template (an HF tokenizer that has one), else the built-in; 'fmjax': the
  built-in; else a .jinja file (HF tokenizers only)."""
  from fmjax.data.tokenizers import HFTokenizer  # pylint: disable=import-outside-toplevel
  from fmjax.data import documents  # pylint: disable=import-outside-toplevel
  if spec == 'fmjax':
    return ChatTemplate(tokenizer, 'fmjax')
  if not spec:
    own = getattr(tokenizer, 'chat_template', None)
    return ChatTemplate(tokenizer, 'tokenizer', own) if own else ChatTemplate(tokenizer, 'fmjax')
  if not isinstance(tokenizer, HFTokenizer):
    raise ChatTemplateError(f'finetune.chat_template={spec!r}: a Jinja template needs a Hugging Face tokenizer '
                            f'(this one is {tokenizer!r}); use the built-in one (chat_template=fmjax)')
  return ChatTemplate(tokenizer, spec, documents.read_utf8(spec, 'finetune.chat_template'))
