"""minimoe: a readable NumPy implementation of Qwen1.5-MoE-A2.7B (Qwen2-MoE).

    model = minimoe.load("path/to/Qwen1.5-MoE-A2.7B")    # or minimoe.default_model_path()
    tok = minimoe.load_tokenizer("path/to/Qwen1.5-MoE-A2.7B")
    logits = model.forward(tok.encode("Hello"))           # ids [T] -> [T, vocab]
"""

from .assets import default_model_path
from .backend import to_numpy
from .config import ModelConfig
from .errors import MinimoeError
from .model import KVCache, Model, load
from .params import ParameterCount, count_parameters
from .tokenizer import Tokenizer, load_tokenizer
from .upcycle import upcycle

__all__ = [
    "load", "load_tokenizer", "default_model_path", "Model", "KVCache", "Tokenizer", "ModelConfig",
    "MinimoeError", "ParameterCount", "count_parameters", "to_numpy", "upcycle",
]
__version__ = "0.1.0"
