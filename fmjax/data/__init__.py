"""Input data: corpora -> TFDS ArrayRecord datasets -> tokenizers -> Grain batches.

  corpora     the embedded default corpus (the Python standard library's sources)
  documents   local files -> documents (glob, UTF-8 decoding, paragraphs, JSONL)
  builders    cached TFDS datasets of local documents; any TFDS dataset; `open_split`
  tokenizers  byte / SentencePiece tokenizers, training, `check_vocab`
  packing     concat-then-split rows with a JSON-safe iterator state
  batches     rows -> the model batch format (inputs, targets, segment_ids, positions, weights)
  pipeline    `make_train_iterator`, `make_eval_batches`, Orbax checkpoint args
  errors      `DataError`
"""
