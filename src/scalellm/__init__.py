"""ScaleLLM: end-to-end LLM serving. The offline API is two names: LLM, SamplingParams.

Imports are lazy so that light parts (gateway, bench, protocol) never pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from scalellm.entrypoints.llm import LLM
    from scalellm.protocol.sampling_params import SamplingParams


def __getattr__(name: str) -> object:
    if name == "LLM":
        from scalellm.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from scalellm.protocol.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'scalellm' has no attribute {name!r}")
