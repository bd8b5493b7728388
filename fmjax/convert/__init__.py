"""Checkpoint conversion: fmjax <-> Hugging Face (Llama, GPT-2 families) and params-only exports.

`python tools/convert_checkpoint.py {to-hf,from-hf,params-only} ...` (or `fmjax-convert`).
Mapping tables live per family (llama.py, gpt2.py); driver.py runs them tensor by tensor.
Only safetensors are read or written: nothing is ever unpickled.
"""

from fmjax.convert.mapping import ConversionError

__all__ = ['ConversionError']
