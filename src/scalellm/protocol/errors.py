"""Typed errors that cross boundaries. A leaf module: no torch, no engine."""

from __future__ import annotations


class ScaleLLMError(Exception):
    """Base class of every error ScaleLLM raises on purpose."""


class InvalidParameterError(ScaleLLMError, ValueError):
    """A user-supplied parameter is out of range or of the wrong kind.

    `param` names the offending field so a server can put it in the OpenAI error body.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class ContextLengthError(InvalidParameterError):
    """Prompt + requested output does not fit the model's context."""


class ModelLoadError(ScaleLLMError):
    """A model file or directory cannot be loaded (missing, unsupported, inconsistent)."""


class UnsupportedModelError(ModelLoadError):
    """The architecture, tensor type or tokenizer kind is not supported."""


class KVCacheTooSmallError(ScaleLLMError):
    """The KV-cache budget cannot hold even one request of the maximum length."""
