"""fmjax's own datatrove pipeline blocks: what datatrove does not ship.

- `TextFileReader`: one document per text file (plain or .gz), like fmjax's `data.source=text`.
- `RankShardReader`: the intermediate shard of this task only (`{rank:05d}.jsonl.gz`), so a dedup
  stage sees exactly the documents, in the order, that its signature stage indexed.
- `BlankFilter`: drops whitespace-only documents (the data layer never trains on them).
- `Measure`: documents, bytes, tokens and a log2 length histogram at one point of the pipeline,
  recorded as datatrove stats (summed over tasks, kept per task, so resumed runs still add up).
- `CountingPIIFormatter`: e-mail (datatrove's pattern) and IPv4/IPv6 (fmjax.curate.pii) redaction,
  counting what it replaced and the addresses it kept, by kind.
"""

from __future__ import annotations

import math

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from fmjax.curate import pii

LENGTH_BINS = 32  # bin i holds documents of 2**i <= UTF-8 bytes < 2**(i+1) (bin 0 also holds 0 and 1)


class TextFileReader(BaseDiskReader):
  """Each file is one document (UTF-8; .gz/.zst decompressed). Binary files are skipped and counted."""

  name = 'text files'

  def read_file(self, filepath: str) -> DocumentsPipeline:
    with self.data_folder.open(filepath, 'rb', compression='infer') as f:
      data = f.read()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError:
      text = None
    if text is None or '\0' in text:
      logger.warning(f'skipping binary file {filepath} (NUL bytes or not UTF-8)')
      self.stat_update('binary_files_skipped')
      return
    document = self.get_document_from_dict({'text': text, 'id': filepath}, filepath, 0)
    if document:
      yield document


class RankShardReader(JsonlReader):
  """Reads `{rank:05d}.jsonl.gz` of its folder: the one intermediate shard of this task (none: no documents)."""

  name = 'task shard'

  def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    if data:
      yield from data
    shard = f'{rank:05d}.jsonl.gz'
    if self.data_folder.exists(shard):
      for doc in self.read_files_shard([shard]):
        self.update_doc_stats(doc)
        yield doc


class BlankFilter(BaseFilter):
  """Removes documents with no visible text."""

  name = 'blank'

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    return bool(doc.text.strip()) or (False, 'blank')


def length_bin(nbytes: int) -> int:
  """The log2 histogram bin of a document of `nbytes` UTF-8 bytes."""
  return min(LENGTH_BINS - 1, int(math.log2(nbytes)) if nbytes > 1 else 0)


class Measure(PipelineStep):
  """Counts documents, bytes, tokens and lengths passing this point; `cluster_key` also tallies
  the exact-duplicate cluster sizes that ExactDedupFilter leaves in each kept document's metadata."""

  type = 'measure'

  def __init__(self, point: str, tokenizer: str = 'byte', cluster_key: str = ''):
    self.name = point
    super().__init__()
    self.tokenizer_spec = tokenizer
    self.cluster_key = cluster_key
    self._tokenizer = None

  def count_tokens(self, doc: Document, nbytes: int) -> int:
    """Tokens of the document under the run's tokenizer (cached in metadata while the text is unchanged)."""
    if self.tokenizer_spec == 'byte':
      return nbytes
    cached = doc.metadata.get('_tokens')
    if cached and cached[0] == len(doc.text):
      return cached[1]
    if self._tokenizer is None:
      from fmjax.data.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel
      self._tokenizer = load_tokenizer(self.tokenizer_spec)
    count = int(self._tokenizer.encode(doc.text).size)
    doc.metadata['_tokens'] = (len(doc.text), count)
    return count

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    for doc in data:
      with self.track_time():
        nbytes = len(doc.text.encode('utf-8'))
        self.stat_update('documents')
        self.stat_update('bytes', value=nbytes)
        self.stat_update('tokens', value=self.count_tokens(doc, nbytes))
        self.stat_update(f'length_bin_{length_bin(nbytes):02d}')
        if self.cluster_key and doc.metadata.get(self.cluster_key):
          self.stat_update(f'cluster_size_{int(doc.metadata[self.cluster_key]) + 1}')
      yield doc


class CountingPIIFormatter(PIIFormatter):
  """E-mail addresses (datatrove's pattern) and IPv4/IPv6 addresses (fmjax.curate.pii) replaced by
  placeholders, counted by kind ('email', 'ip'; 'ip_kept' for loopback/unspecified, and with
  only_remove_public_ips non-global, addresses left as they are)."""

  def __init__(self, *, remove_emails: bool, remove_ips: bool, only_remove_public_ips: bool,
               email_placeholder: str, ip_placeholder: str):
    super().__init__(remove_emails=remove_emails, remove_ips=False, email_replacement=(email_placeholder,))
    self.redact_ips, self.public_only, self.ip_placeholder = remove_ips, only_remove_public_ips, ip_placeholder

  def format(self, text: str) -> str:
    found = 0
    if self.remove_emails:
      emails = sum(1 for _ in self.emails_replacer.regex.finditer(text))
      if emails:
        self.stat_update('email', value=emails)
        text = self.emails_replacer.replace(text)
      found += emails
    if self.redact_ips:
      text, ips, kept = pii.redact(text, self.ip_placeholder, self.public_only)
      if ips:
        self.stat_update('ip', value=ips)
      if kept:
        self.stat_update('ip_kept', value=kept)
      found += ips
    if found:
      self.stat_update('documents_with_pii')
    return text
