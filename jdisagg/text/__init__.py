"""Text in and out: the tokenizer and chat template, streaming detokenization and stop
strings (no jax).

May import only the standard library, ``tokenizers`` and ``jinja2``.
"""
