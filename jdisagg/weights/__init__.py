"""Model loading: GGUF files (``gguf``), Hugging Face directories (``hf``), jdisagg
checkpoints (``checkpoint``) and the default model's fetch (``default``).

Each reader returns ``(ModelConfig, params, Tokenizer)`` with ``params`` a host numpy float32
tree shaped like ``jdisagg.model.abstract_params(cfg)``. Import the submodule you need: the
package imports none of them, so a host without the ``gguf`` package can still serve
random or checkpointed models.
"""
