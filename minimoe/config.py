"""Model configuration: one dataclass read from a Hugging Face ``config.json``.

Two spellings of the same file exist in the wild and both are read here:

* the Hub's original (transformers 4.x): ``rope_theta``, ``torch_dtype``;
* transformers 5.x ``save_pretrained``: ``rope_parameters: {rope_theta, rope_type}``,
  ``dtype`` and a per-layer ``layer_types`` list.

Supported: ``Qwen2MoeForCausalLM`` (model_type ``qwen2_moe``), its dense sibling
``Qwen2ForCausalLM`` (``qwen2``: every layer a dense SwiGLU MLP), and three MoE
cousins that differ from Qwen2-MoE in a few named ways (:data:`FAMILIES`):
Mixtral (``mixtral``), OLMoE (``olmoe``) and Qwen3-MoE (``qwen3_moe``).  Anything
that would make the network compute something else (rope scaling, sliding-window
attention, another activation, q/k/v clipping) is refused with a
:class:`~minimoe.errors.MinimoeError` rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import MinimoeError



@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face model type differs from Qwen2-MoE: each difference one named fact.

    The router is the same in all of them (softmax over every expert, then the top k);
    what varies is whether the k weights are renormalised, whether a gated shared
    expert runs beside the routed ones, how q and k are normalised, the tensor names,
    and which config keys hold the expert count and width.
    """

    architecture: str  # the transformers class
    shared_expert: bool = False  # a sigmoid-gated shared expert beside the routed ones (Qwen2-MoE)
    always_renormalise: bool = False  # top-k weights always rescaled to sum to 1 (Mixtral), else norm_topk_prob
    qk_norm: str | None = None  # "projection": RMSNorm over all of q and of k (OLMoE); "head": per head (Qwen3-MoE)
    qkv_bias: bool = False  # biases on q/k/v (Qwen2); the others have none (``attention_bias`` is refused)
    experts_keys: tuple[str, ...] = ("num_experts",)  # config.json keys for the number of routed experts, in order
    expert_width_key: str = "moe_intermediate_size"  # "intermediate_size" when every expert is full width
    sparse_step: bool = False  # reads decoder_sparse_step / mlp_only_layers (else every layer is sparse)
    rope_theta: float = 10000.0  # transformers' default when config.json gives none
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = False
    # What transformers' config class puts in when config.json omits num_key_value_heads: a fixed
    # count (the size the class was written for), not num_attention_heads; None: as many as query heads.
    num_key_value_heads: int | None = None
    # The embedding row transformers keeps out of training (nn.Embedding's padding_idx) when config.json gives no
    # pad_token_id, and the load-balancing loss's weight when it gives no router_aux_loss_coef.
    pad_token_id: int | None = None
    router_aux_loss_coef: float = 0.001


FAMILIES: dict[str, Family] = {
    "qwen2_moe": Family("Qwen2MoeForCausalLM", shared_expert=True, qkv_bias=True, sparse_step=True,
                        num_key_value_heads=16),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, experts_keys=(), num_key_value_heads=32),
    "mixtral": Family("MixtralForCausalLM", always_renormalise=True, experts_keys=("num_local_experts",),
                      expert_width_key="intermediate_size", rope_theta=1e6, rms_norm_eps=1e-5, num_key_value_heads=8),
    "olmoe": Family("OlmoeForCausalLM", qk_norm="projection", expert_width_key="intermediate_size",
                    rms_norm_eps=1e-5, pad_token_id=1, router_aux_loss_coef=0.01),
    # transformers 5.x writes Qwen3-MoE's expert count as num_local_experts; the Hub's files say num_experts.
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qk_norm="head", experts_keys=("num_experts", "num_local_experts"),
                        sparse_step=True, num_key_value_heads=4),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture facts minimoe needs; field names follow ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    qk_norm: str | None = None  # see Family.qk_norm
    # Mixture-of-experts fields; a dense ``qwen2`` model has num_experts == 0.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None  # its embedding row gets no gradient in training (as nn.Embedding's padding_idx)

    def is_sparse_layer(self, layer: int) -> bool:
        """True when decoder layer ``layer`` uses the MoE block (the one home of this rule).

        Same rule as transformers' ``Qwen2MoeDecoderLayer``: sparse iff the layer is
        not listed in ``mlp_only_layers``, the model has experts, and
        ``(layer + 1) % decoder_sparse_step == 0``.
        """
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def sparse_layers(self) -> list[int]:
        """Indices of the decoder layers that use the MoE block."""
        return [layer for layer in range(self.num_hidden_layers) if self.is_sparse_layer(layer)]

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def routing_rule(self) -> str:
        """The gating rule in words, e.g. ``softmax over 60 experts, top-4, not renormalised, + gated shared expert``."""
        if not self.num_experts:
            return "dense: no router"
        renormalised = "renormalised to sum 1" if self.norm_topk_prob else "not renormalised"
        shared = ", + sigmoid-gated shared expert" if self.has_shared_expert else ""
        return f"softmax over {self.num_experts} experts, top-{self.num_experts_per_tok}, {renormalised}{shared}"

    @property
    def num_kv_groups(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` (or a folder holding one)."""
        return cls.from_dict(*read_config_file(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build a config from the parsed JSON of either spelling; refuse what we do not support."""
        return _parse(raw, source)


def read_config_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """The parsed ``config.json`` at ``path`` (the file, or a folder holding it), and its path for messages."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MinimoeError(f"{path}: no config.json found")
    return read_json_object(path), str(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object (config.json, tokenizer_config.json, ...)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MinimoeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MinimoeError(f"{path}: expected a JSON object at the top level")
    return value


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    def fail(message: str) -> MinimoeError:
        return MinimoeError(f"{source}: {message}")

    def require(key: str, kind: type = int) -> Any:
        if key not in raw or raw[key] is None:
            raise fail(f"missing required field {key!r}")
        return _typed(raw[key], kind, key, fail)

    def optional(key: str, default: Any, kind: type) -> Any:
        value = raw.get(key)
        return default if value is None else _typed(value, kind, key, fail)

    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise fail(
            f"model_type {model_type!r} is not supported; minimoe runs "
            + ", ".join(f"{name} ({family.architecture})" for name, family in FAMILIES.items())
        )
    family = FAMILIES[model_type]

    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise fail(f"hidden_act {activation!r} is not supported (only 'silu', as in SwiGLU)")

    rope_theta, rope_type = _rope(raw, fail, family.rope_theta)
    if rope_type not in (None, "default"):
        raise fail(f"rope scaling ({rope_type!r}) is not supported; only plain RoPE")

    _refuse_sliding_window(raw, fail)
    _refuse_unimplemented(raw, family, fail)

    hidden = require("hidden_size")
    heads = require("num_attention_heads")
    kv_heads = optional("num_key_value_heads", family.num_key_value_heads or heads, int)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise fail(f"num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})")
    head_dim = optional("head_dim", None, int)
    if head_dim is None:
        if hidden % heads:
            raise fail(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
        head_dim = hidden // heads
    if head_dim % 2:
        raise fail(f"head_dim ({head_dim}) must be even for rotate-half RoPE")

    moe: dict[str, Any] = {}
    if family.experts_keys:
        experts_key = next((key for key in family.experts_keys if raw.get(key) is not None), family.experts_keys[0])
        moe = dict(
            num_experts=require(experts_key),
            num_experts_per_tok=require("num_experts_per_tok"),
            moe_intermediate_size=require(family.expert_width_key),
            shared_expert_intermediate_size=require("shared_expert_intermediate_size") if family.shared_expert else 0,
            norm_topk_prob=True if family.always_renormalise else optional("norm_topk_prob", family.norm_topk_prob, bool),
            decoder_sparse_step=optional("decoder_sparse_step", 1, int) if family.sparse_step else 1,
            mlp_only_layers=tuple(optional("mlp_only_layers", [], list)) if family.sparse_step else (),
            router_aux_loss_coef=optional("router_aux_loss_coef", family.router_aux_loss_coef, float),
        )
        if moe["num_experts"] > 0 and not 0 < moe["num_experts_per_tok"] <= moe["num_experts"]:
            raise fail(
                f"num_experts_per_tok ({moe['num_experts_per_tok']}) must be between 1 and "
                f"num_experts ({moe['num_experts']})"
            )
        if moe["decoder_sparse_step"] < 1:
            raise fail(f"decoder_sparse_step must be >= 1, got {moe['decoder_sparse_step']}")
        if not all(isinstance(layer, int) for layer in moe["mlp_only_layers"]):
            raise fail(f"mlp_only_layers must list layer indices, got {moe['mlp_only_layers']!r}")

    config = ModelConfig(
        model_type=model_type,
        vocab_size=require("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=require("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=require("intermediate_size"),
        max_position_embeddings=require("max_position_embeddings"),
        rms_norm_eps=optional("rms_norm_eps", family.rms_norm_eps, float),
        rope_theta=rope_theta,
        tie_word_embeddings=optional("tie_word_embeddings", False, bool),
        qkv_bias=optional("qkv_bias", True, bool) if family.qkv_bias else False,
        qk_norm=family.qk_norm,
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
        bos_token_id=optional("bos_token_id", None, int),
        # an explicit null means none, as in transformers; an absent key, the family's default
        pad_token_id=optional("pad_token_id", None, int) if "pad_token_id" in raw else family.pad_token_id,
        eos_token_id=_eos(raw.get("eos_token_id"), fail),
        **moe,
    )
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
        if getattr(config, field) <= 0:
            raise fail(f"{field} must be positive, got {getattr(config, field)}")
    return config


def _typed(value: Any, kind: type, key: str, fail) -> Any:
    """Check a JSON value's type (ints are accepted where floats are expected)."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise fail(f"field {key!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise fail(f"field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _rope(raw: dict[str, Any], fail, default_theta: float) -> tuple[float, str | None]:
    """(rope_theta, rope_type) from either spelling: ``rope_parameters`` (5.x) or ``rope_theta`` (4.x)."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise fail(f"rope_parameters must be an object with rope_theta, got {params!r}")
        theta, rope_type = params["rope_theta"], params.get("rope_type", "default")
    else:
        theta = raw.get("rope_theta", default_theta)
        rope_type = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else str(scaling)
    return _typed(theta, float, "rope_theta", fail), rope_type


def _refuse_sliding_window(raw: dict[str, Any], fail) -> None:
    """Sliding-window attention changes the mask; we only implement full causal attention.

    Qwen configs carry a ``sliding_window`` size that only counts when ``use_sliding_window``
    is true; Mixtral's has no such switch: any ``sliding_window`` there is used.
    """
    if raw.get("use_sliding_window"):
        raise fail("use_sliding_window is true; sliding-window attention is not supported")
    if raw.get("model_type") == "mixtral" and raw.get("sliding_window") is not None:
        raise fail(f"sliding_window is {raw['sliding_window']}: Mixtral would attend over a sliding window, "
                   "which minimoe does not implement (only full causal attention)")
    layer_types = raw.get("layer_types") or []
    windowed = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if windowed:
        raise fail(
            f"layer_types marks layers {windowed} as {layer_types[windowed[0]]!r}; "
            "only 'full_attention' is supported"
        )


def _refuse_unimplemented(raw: dict[str, Any], family: Family, fail) -> None:
    """Family options that would change the computation and that minimoe does not implement."""
    if raw.get("clip_qkv") is not None:
        raise fail(f"clip_qkv is {raw['clip_qkv']}: clipping q/k/v (an OLMoE option) is not supported")
    if raw.get("attention_bias") and not family.qkv_bias:
        raise fail("attention_bias is true: biases on the attention projections are not supported for "
                   f"{raw.get('model_type')} (only Qwen2's q/k/v biases)")


def _eos(value: Any, fail) -> int | tuple[int, ...] | None:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise fail(f"eos_token_id must be an integer or a list of integers, got {value!r}")


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """The config.json files bundled with minimoe, by name (e.g. ``qwen1.5-moe-a2.7b``)."""
    return {path.stem: path for path in sorted(SHIPPED_CONFIGS.glob("*.json"))}
