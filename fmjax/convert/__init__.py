"""Checkpoint conversion: fmjax <-> Hugging Face (Llama, GPT-2 families) and params-only exports.

`python tools/convert_checkpoint.py {to-hf,from-hf,params-only} ...` (or `fmjax-convert`).
Mapping tables live per family (llama.py, gpt2.py); driver.py runs them tensor by tensor;
hf_tokenizer.py carries tokenizers both ways (tokenizer.json, GPT-2 vocab/merges, SentencePiece,
bytes); output.py stages every output so that nothing is clobbered or left half-written.
Only safetensors are read or written: nothing is ever unpickled.
"""

from fmjax.convert.mapping import ConversionError

__all__ = ['ConversionError']
