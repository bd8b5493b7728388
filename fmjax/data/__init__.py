"""Input data: files or TFDS -> ArrayRecord datasets -> tokenizers -> Grain batches.

  corpora     the embedded default corpus (the Python standard library's sources)
  formats     text / JSONL / Parquet files, plain or .gz / .zst, read as streams
  documents   local files -> documents (glob, UTF-8 decoding, paragraphs, JSONL fields, Parquet columns)
  local_build one streaming pass of local documents into ArrayRecord shards (parallel, bounded memory)
  builders    cached datasets of local documents (eval files, locks, stale builds); `open_split`, `describe`
  holdout     a validation split whenever possible: the hold-out of a build whose hash split is empty
  records     record sources as random-access `str` documents
  tfds_source prepared TFDS datasets by name, as ArrayRecord
  mixture     weighted sources (`data.mixture`), rows picked by a pure function of (seed, step)
  tokenizers  byte / SentencePiece / char / Hugging Face tokenizers, training, `check_vocab`
  tokenizer_inputs  documents and lines for tools/train_tokenizer.py
  packing     concat-then-split rows with a JSON-safe iterator state
  batches     rows -> the model batch format (inputs, targets, segment_ids, positions, weights)
  stream_set  global batches independent of the process count (document streams)
  pipeline    `make_train_iterator`, `make_eval_batches`, `check_eval_split`, Orbax checkpoint args
  errors      `DataError`
"""
