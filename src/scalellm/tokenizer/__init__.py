"""Tokenizer layer: encode, chat templates, incremental detokenization, stop strings.

Knows nothing of models, torch or devices.
"""

from scalellm.tokenizer.detokenizer import IncrementalDetokenizer
from scalellm.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]
