"""Checkpoint conversion: fmjax <-> Hugging Face (the families in families/) and params-only exports.

`python tools/convert_checkpoint.py {to-hf,from-hf,params-only} ...` (or `fmjax-convert`).
Mapping tables live per family (families/: llama.py, gpt2.py, bert.py, registered by name and HF
model_type in families/__init__.py); driver.py runs them tensor by tensor;
hf_tokenizer.py carries tokenizers both ways (tokenizer.json, GPT-2 vocab/merges, SentencePiece,
bytes); output.py stages every output so that nothing is clobbered or left half-written.
Only safetensors are read or written: nothing is ever unpickled.
"""

from fmjax.convert.mapping import ConversionError

__all__ = ['ConversionError']
