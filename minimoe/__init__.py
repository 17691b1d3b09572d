"""minimoe: a readable NumPy implementation of Qwen1.5-MoE-A2.7B (Qwen2-MoE).

    model = minimoe.load("path/to/Qwen1.5-MoE-A2.7B")
    logits = model.forward(ids)            # ids [T] -> [T, vocab]
"""

from .config import ModelConfig
from .errors import MinimoeError
from .model import KVCache, Model, load
from .params import ParameterCount, count_parameters

__all__ = ["load", "Model", "KVCache", "ModelConfig", "MinimoeError", "ParameterCount", "count_parameters"]
__version__ = "0.1.0"
