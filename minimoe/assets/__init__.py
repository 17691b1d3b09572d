"""Files shipped inside the package: the two small trained models that make minimoe run offline.

``tiny-moe`` is a miniature Qwen1.5-MoE (60 routed experts, top-4, a shared expert 4 experts wide),
upcycled from ``tiny-dense``, a dense Qwen2, as Qwen1.5-MoE-A2.7B was from Qwen-1.8B.  Both were
trained by scripts/train_bundled_model.py; each folder's README.md is its model card.
"""

from pathlib import Path

from ..errors import MinimoeError

BUNDLED_MODELS = {
    "moe": Path(__file__).resolve().parent / "tiny-moe",
    "dense": Path(__file__).resolve().parent / "tiny-dense",
}


def default_model_path(kind: str = "moe") -> Path:
    """The folder of a bundled model, in the Hub's layout: ``"moe"`` (the default model) or its ``"dense"`` parent."""
    if kind not in BUNDLED_MODELS:
        raise MinimoeError(f"default_model_path({kind!r}): the bundled models are {sorted(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[kind]
