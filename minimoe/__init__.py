"""minimoe: a readable NumPy implementation of Qwen1.5-MoE-A2.7B (Qwen2-MoE).

    model = minimoe.load("path/to/Qwen1.5-MoE-A2.7B")    # or minimoe.default_model_path()
    tok = minimoe.load_tokenizer("path/to/Qwen1.5-MoE-A2.7B")
    logits = model.forward(tok.encode("Hello"))           # ids [T] -> [T, vocab]

The package, floor by floor (each imports only from the floors below it; tests/test_layering.py
holds it so): the math (:mod:`.layers`), the forward pass's inputs (:mod:`.hooks`), the backends'
operations (:mod:`.backend`, :mod:`.ops`), the one composition of the model (:mod:`.model`); then
loading, generation and tracing (:mod:`.loading`, :mod:`.generate`, :mod:`.inspect.tracing`); then
inspection (:mod:`.inspect`), training (:mod:`.train`: ``minimoe.train.loss_and_grads``, ``AdamW``), corpus
statistics (:mod:`.atlas`: ``minimoe.atlas.load``), the GPU backend (:mod:`.gpu`) and the tools (:mod:`.tools`:
the CLI, benchmarks, upcycling).  Checkpoints are read and written by :mod:`.checkpoint`.
"""

from . import atlas, train
from .assets import default_model_path
from .backend import to_numpy
from .config import ModelConfig
from .errors import MinimoeError
from .hooks import Interventions
from .inspect.params import ParameterCount, count_parameters
from .inspect.trace import RoutingTrace
from .loading import LoadedModel, load
from .model import KVCache, Model
from .tokenizer import Tokenizer, load_tokenizer
from .tools.upcycle import upcycle

__all__ = [
    "load", "load_tokenizer", "default_model_path", "Model", "LoadedModel", "KVCache", "Tokenizer", "ModelConfig",
    "MinimoeError", "Interventions", "RoutingTrace", "ParameterCount", "count_parameters", "to_numpy", "upcycle",
]
__version__ = "0.1.0"
