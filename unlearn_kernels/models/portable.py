"""Saved tokenizers that load in transformers 4.x as well as 5.x.

transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` into ``tokenizer_config.json``
for tokenizers backed by a ``tokenizer.json``; transformers 4.x has no such class and refuses
the folder ("Tokenizer class TokenizersBackend does not exist"). Both versions load the same
``tokenizer.json`` through ``PreTrainedTokenizerFast``, so that name is written instead; the
tokenizer itself (``tokenizer.json``) is untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

PORTABLE_NAMES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_tokenizer_portable(folder: Path | str) -> bool:
    """Rewrite a transformers-5-only ``tokenizer_class`` in ``folder``; True if it changed."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file() or not (Path(folder) / "tokenizer.json").is_file():
        return False
    config = json.loads(path.read_text())
    portable = PORTABLE_NAMES.get(config.get("tokenizer_class"))
    if portable is None:
        return False
    config["tokenizer_class"] = portable
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
