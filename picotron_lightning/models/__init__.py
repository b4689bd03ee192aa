"""Reference models used by the examples, tests and benchmarks."""

from picotron_lightning.models.llama import PRESETS, Llama, LlamaConfig, llama_config
from picotron_lightning.models.module import CausalLMModule

__all__ = ["PRESETS", "CausalLMModule", "Llama", "LlamaConfig", "llama_config"]
