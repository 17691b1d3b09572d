"""Files shipped inside the package: the small trained MoE that is minimoe's default model."""

from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent / "tiny-moe"


def default_model_path() -> Path:
    """The bundled model's folder (a Qwen2-MoE in the Hub's layout, trained by scripts/train_bundled_model.py)."""
    return BUNDLED_MODEL
