"""The model families the decoder runs: what each does differently from Llama, as data.

:class:`~hyperrag.model.decoder.Decoder` runs one explicit forward over a Hugging Face
``*ForCausalLM``'s own modules. The families it supports differ in a handful of places, each a
field of :class:`Family` here (all off: Llama), so supporting a family is a table entry, not a
forward of its own:

- Llama, Mistral: the plain layer (Mistral may slide a window over every layer);
- Qwen2: biases on q/k/v (the projections' own ``nn.Linear`` bias, which every kernel path adds);
- Qwen3: a per-head RMSNorm of queries and keys before RoPE;
- Gemma 3 (``Gemma3ForCausalLM``, ``gemma3_text``): q/k norms, RMSNorms that scale by
  ``1 + weight``, norms after attention and after the MLP too, attention scaled by
  ``query_pre_attn_scalar ** -0.5``, sliding-window layers next to full ones with a RoPE base of
  their own (the rotary module takes the layer type), an optional final logit soft cap. Its
  ``sqrt(hidden)`` embedding scale and its GELU are its modules' own (``embed_tokens``,
  ``mlp.act_fn``), which the decoder calls as they are.

What a config then asks of the decoder (per-layer windows and layer types, the attention scale,
the cap) is read once into an :class:`Architecture`. Anything else is refused by name, before
any KV is computed: a forward that silently skipped a family's detail would still run and
store wrong KV.
"""
from __future__ import annotations

from dataclasses import dataclass

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """How one family's layer differs from Llama's."""

    name: str
    qk_norm: bool = False  # RMSNorm (``self_attn.q_norm`` / ``k_norm``) over each head of q and k, before RoPE
    norm_offset: float = 0.0  # every RMSNorm scales by ``norm_offset + weight`` (Gemma keeps weight - 1)
    # ``post_attention_layernorm`` normalizes the attention output (before the residual add), and
    # ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` wrap the MLP (Gemma);
    # otherwise ``post_attention_layernorm`` is the MLP's input norm (Llama)
    sandwich_norms: bool = False
    rope_per_layer_type: bool = False  # the rotary module is called with the layer's type (Gemma 3)
    query_scale_field: str | None = None  # attention scales by config.<field> ** -0.5; None: head_dim ** -0.5


LLAMA = Family("llama")
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3", qk_norm=True),
    "gemma3_text": Family("gemma3_text", qk_norm=True, norm_offset=1.0, sandwich_norms=True,
                          rope_per_layer_type=True, query_scale_field="query_pre_attn_scalar"),
}


class UnsupportedModel(ValueError):
    """A model whose architecture, or an option of it, the decoder does not run."""


def family_of(config) -> Family:
    """The family of a Hugging Face config (by ``model_type``); anything else is refused by name."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedModel(f"model type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[kind]


@dataclass(frozen=True)
class Architecture:
    """What the decoder reads from one model's config: its family, geometry and per-layer attention."""

    family: Family
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    eps: float
    layer_types: tuple[str, ...]  # per layer, FULL or SLIDING
    windows: tuple[int | None, ...]  # per layer: a key is attended if query position - key position < window; None: all
    attn_scale: float | None  # SDPA's ``scale``; None: its default, head_dim ** -0.5
    final_softcap: float | None  # logits = cap x tanh(logits / cap)


def architecture(config) -> Architecture:
    """The :class:`Architecture` of a config, or :class:`UnsupportedModel` naming what is not run."""
    family = family_of(config)
    kind = config.model_type
    for option in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, option, None):
            raise UnsupportedModel(f"model type {kind!r} with {option}={getattr(config, option)!r} is not supported")
    n_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: one window (or none) for every layer
        types = [SLIDING if window else FULL] * n_layers
    types = tuple(types[:n_layers])
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise UnsupportedModel(f"model type {kind!r}: layer types {unknown} are not supported; supported: {FULL}, {SLIDING}")
    if SLIDING in types and not window:
        raise UnsupportedModel(f"model type {kind!r} has sliding-window layers but no sliding_window size")
    scale = None
    if family.query_scale_field is not None:
        scale = float(getattr(config, family.query_scale_field)) ** -0.5
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Architecture(
        family=family, n_layers=n_layers, n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim, hidden_size=config.hidden_size, eps=config.rms_norm_eps, layer_types=types,
        windows=tuple(window if t == SLIDING else None for t in types), attn_scale=scale,
        final_softcap=getattr(config, "final_logit_softcapping", None) or None,
    )
