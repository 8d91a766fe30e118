"""Bidirectional Transformer encoders in Flax.

Two block families, chosen by `TransformerConfig.family`:

* ``"bert"``: learned absolute positions, token-type embeddings, post-LayerNorm,
  biased projections and a GELU MLP. This is all-MiniLM-L6-v2, BERT and most open
  embedders, and its parameters map one-to-one onto Hugging Face's ``BertModel``.
* ``"llm"``: pre-RMSNorm, rotary positions, grouped-query attention and a gated
  MLP, as in decoder language models (Gemma, Llama, Qwen). This is the Gecko /
  Gemini Embedding path: a decoder LM turned into an encoder. Each feature that
  tells Gemma 3 from Qwen3 is a config field (so a gin switch):

  - Gemma 3: ``norm_offset`` (RMSNorm scaled by ``1 + w``), ``qk_norm``,
    ``post_norms`` (four norms per block), sliding-window layers interleaved with
    global ones (``sliding_window``, ``sliding_window_pattern`` or
    ``layer_types``), ``rope_local_theta`` for the local layers,
    ``scale_embeddings``, ``query_pre_attn_scalar``, GeGLU (``gelu_tanh``).
  - Qwen3: ``qk_norm`` (plain weight), grouped-query attention, SwiGLU
    (``silu``), ``causal`` attention, ``head_dim`` independent of the width.

  ``causal`` (or bidirectional) attention and the pooling (`dual_encoder`) are
  independent of the family.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``,
``heads``, ``kv``, ...) so `embedder.partitioning` can map them onto a mesh, and
activations are annotated with logical constraints (``batch``, ``length``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedder.errors import ConfigError

Array = jax.Array
DType = Any

FAMILIES = ("bert", "llm")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # BERT's erf GELU
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # Gemma's
    "silu": jax.nn.silu,  # Llama's SwiGLU
    "relu": jax.nn.relu,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture and numerics of one encoder tower.

    Attributes:
      family: "bert" or "llm" (see the module docstring).
      vocab_size: number of token ids.
      hidden_size: model width (the "embed" axis).
      num_layers: number of Transformer blocks.
      num_heads: number of query heads.
      mlp_dim: width of the MLP's hidden layer.
      head_dim: width of one head; defaults to hidden_size // num_heads.
      num_kv_heads: key/value heads for grouped-query attention (llm family);
        defaults to num_heads (multi-head attention).
      max_len: longest sequence the position embeddings cover (bert family).
      type_vocab_size: token-type (segment) ids of the bert family.
      activation: one of ACTIVATIONS.
      norm_eps: epsilon of LayerNorm / RMSNorm.
      rope_theta: base of the rotary position frequencies (llm family).
      scale_embeddings: multiply token embeddings by sqrt(hidden_size) (Gemma).
      dropout_rate: dropout on embeddings, attention output and MLP output.
      attention_dropout_rate: dropout on the attention probabilities.
      dtype: compute dtype name ("float32" or "bfloat16"); softmax, norms and
        pooling stay in float32.
      param_dtype: storage dtype of the parameters.
      remat: rematerialise each block in the backward pass (saves activation
        memory at the cost of a second forward).
      pad_id: the padding token id; padding is masked out of attention.
      causal: each token attends only to itself and earlier tokens (a decoder
        LM as it was trained, e.g. Qwen3-Embedding); False is bidirectional
        (Gecko, EmbeddingGemma). llm family.
      norm_offset: RMSNorm multiplies by ``1 + w`` with w initialised at zero
        (Gemma) instead of by ``w`` initialised at one (Llama, Qwen).
      qk_norm: RMSNorm over each query and key head before the rotary
        embedding (Gemma 3, Qwen3).
      post_norms: an RMSNorm on the attention output and on the MLP output,
        before each residual sum (Gemma 2/3: four norms per block).
      query_pre_attn_scalar: attention logits are scaled by this ** -0.5;
        defaults to head_dim (Gemma 3's ``query_pre_attn_scalar``).
      sliding_window: the local layers attend to keys closer than this many
        positions (causal: ``0 <= q - k < window``; bidirectional:
        ``|q - k| < window``, as transformers' Gemma 3 bidirectional mask).
      sliding_window_pattern: with sliding_window, every this-many-th layer is
        global and the others local (Gemma 3's 5:1 pattern is 6); ignored when
        layer_types is given.
      layer_types: per layer, "full_attention" or "sliding_attention"
        (transformers' ``layer_types``); overrides sliding_window_pattern.
      rope_local_theta: RoPE base of the sliding (local) layers
        (``rope_local_base_freq``); defaults to rope_theta.
    """

    family: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    head_dim: int | None = None
    num_kv_heads: int | None = None
    max_len: int = 512
    type_vocab_size: int = 2
    activation: str = "gelu"
    norm_eps: float = 1e-12
    rope_theta: float = 10000.0
    scale_embeddings: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    pad_id: int = 0
    causal: bool = False
    norm_offset: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        if self.layer_types is not None:
            # A list from JSON or gin becomes a tuple: the config must stay hashable.
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.family not in FAMILIES:
            raise ConfigError(f"TransformerConfig.family={self.family!r}: expected one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"TransformerConfig.activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"TransformerConfig.{name}={getattr(self, name)!r}: expected one of {sorted(DTYPES)}"
                )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"TransformerConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
            raise ConfigError(
                f"TransformerConfig: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        llm_only = ("causal", "norm_offset", "qk_norm", "post_norms", "sliding_window", "layer_types")
        if self.family == "bert":
            used = [name for name in llm_only if getattr(self, name)]
            if used:
                raise ConfigError(f"TransformerConfig: {used} are llm-family options; family='bert'")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"TransformerConfig.layer_types has {len(self.layer_types)} entries for "
                    f"num_layers={self.num_layers}"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ConfigError(f"TransformerConfig.layer_types: {bad} are not in {LAYER_TYPES}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"TransformerConfig.sliding_window={self.sliding_window}: expected > 0")
        if SLIDING_ATTENTION in self.attention_types and self.sliding_window is None:
            raise ConfigError("TransformerConfig: sliding_attention layers need sliding_window")

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Per layer, FULL_ATTENTION or SLIDING_ATTENTION."""
        if self.layer_types is not None:
            return self.layer_types
        if self.sliding_window is None:
            return (FULL_ATTENTION,) * self.num_layers
        pattern = self.sliding_window_pattern
        if pattern is None:
            return (SLIDING_ATTENTION,) * self.num_layers
        # Gemma 3: layer i is global when (i + 1) is a multiple of the pattern.
        return tuple(
            FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(self.num_layers)
        )

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def compute_dtype(self) -> DType:
        return DTYPES[self.dtype]

    @property
    def params_dtype(self) -> DType:
        return DTYPES[self.param_dtype]


def _kernel_init(axes: tuple[str | None, ...], stddev: float = 0.02) -> nn.initializers.Initializer:
    # BERT and Gemma both initialise weights from a truncated-normal-ish N(0, 0.02).
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _zeros(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


def _transposed_equations(equation: str) -> tuple[str, str]:
    """For "A,B->C" with every index in exactly two of the three terms (a matmul
    against a weight, no batch index), the einsums of the two input gradients:
    "C,B->A" and "A,C->B"."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(equation: str, x: Array, y: Array) -> Array:
    """einsum of low-precision operands accumulated in float32, forward and backward.

    JAX's own transpose of a bf16 x bf16 -> f32 dot runs the backward dots with a
    bf16 output, which XLA's CPU backend executes without its fast (AMX / oneDNN)
    kernels; here the backward dots are bf16 x bf16 -> f32 as well (the cotangent
    is rounded to the operand dtype first, as mixed-precision training does).
    """
    return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(equation, x, y):
    return mixed_einsum(equation, x, y), (x, y)


def _mixed_einsum_bwd(equation, residuals, cotangent):
    x, y = residuals
    dx_eq, dy_eq = _transposed_equations(equation)
    ct = cotangent.astype(x.dtype)
    dx = jnp.einsum(dx_eq, ct, y, preferred_element_type=jnp.float32).astype(x.dtype)
    dy = jnp.einsum(dy_eq, x, ct, preferred_element_type=jnp.float32).astype(y.dtype)
    return dx, dy


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def _einsum(equation: str, x: Array, y: Array, dtype: DType) -> Array:
    """x, y cast to the compute dtype, contracted with float32 accumulation."""
    x, y = x.astype(dtype), y.astype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)
    return mixed_einsum(equation, x, y)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32.

    Attributes:
      eps: added to the mean square.
      param_dtype: storage dtype of the scale.
      offset: scale by ``1 + w`` with w initialised at zero (Gemma) instead of
        by ``w`` initialised at one.
      axis_name: logical axis of the scale ("embed", or "kv" for a per-head norm).
    """

    eps: float
    param_dtype: DType = jnp.float32
    offset: bool = False
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = _zeros if self.offset else _ones
        scale = self.param("scale", init((self.axis_name,)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = scale.astype(jnp.float32)
        return (y * (1.0 + scale if self.offset else scale)).astype(x.dtype)


def _rms_norm(config: TransformerConfig, name: str, axis_name: str = "embed") -> nn.Module:
    return RMSNorm(config.norm_eps, config.params_dtype, config.norm_offset, axis_name, name=name)


def attention_mask(
    mask: Array,
    causal: bool,
    sliding_window: int | None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Which keys each query may attend to.

    Args:
      mask: [batch, length] True for real tokens; padding keys are masked.
      causal: keys after the query are masked.
      sliding_window: if set, keys this far from the query or farther are masked
        (only earlier ones when causal; on both sides otherwise, as transformers'
        Gemma 3 with ``use_bidirectional_attention``).
      positions: [length] (or [batch, length]) indices the causal and window
        rules compare; by default 0..length-1.
      segment_ids: [batch, length] the text each token belongs to in a packed
        row (0 = padding): a query sees only keys of its own text, so the mask
        is block-diagonal. None: one text a row.

    Returns:
      [batch, query, key] bool.
    """
    length = mask.shape[1]
    if positions is None:
        positions = jnp.arange(length)
    if positions.ndim == 1:
        positions = positions[None]
    q, k = positions[:, :, None], positions[:, None, :]  # [batch or 1, query, key]
    allowed = jnp.ones(q.shape[:1] + (length, length), bool)
    if causal:
        allowed &= k <= q
    if sliding_window is not None:
        allowed &= jnp.abs(q - k) < sliding_window
    allowed = allowed & mask[:, None, :]
    if segment_ids is not None:
        allowed &= (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return allowed


def segment_positions(segment_ids: Array) -> Array:
    """Positions that restart at 0 at the start of each text of a packed row.

    Args:
      segment_ids: [batch, length] int, each text a contiguous run of one id
        (0 = padding; its positions are counted as a run of their own).

    Returns:
      [batch, length] int32: the index of each token inside its run.
    """
    length = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - run_start


# How attention is computed: "einsum" (this module's einsums) or "dot_product"
# (`jax.nn.dot_product_attention` with the mask; XLA picks the kernel). Both give
# the same numbers (tests/test_packing.py); "auto" takes dot_product where a
# fused kernel can serve it (GPU, TPU) and the einsums on CPU, whose bf16
# probabilities-times-values dot is only fast with float32 accumulation.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "dot_product")


def attention_implementation(requested: str = "auto") -> str:
    """The implementation `attend` uses for `requested` on the default backend."""
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"attention implementation {requested!r}: expected one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if requested != "auto":
        return requested
    return "einsum" if jax.default_backend() == "cpu" else "dot_product"


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    scale: float,
    dtype: DType,
    implementation: str = "auto",
    dropout: Any = None,
) -> Array:
    """Softmax attention of queries over keys under a boolean mask.

    Args:
      q: [batch, query, heads, head_dim]; k, v: [batch, key, kv_heads, head_dim]
        (grouped-query attention when kv_heads < heads).
      mask: [batch, query, key] bool (see `attention_mask`). A query with no key
        allowed (padding) gets a uniform average instead of NaN.
      scale: multiplies the logits (head_dim ** -0.5 or Gemma's scalar).
      dtype: the compute dtype of the probabilities-times-values product.
      implementation: see ATTENTION_IMPLEMENTATIONS.
      dropout: applied to the attention probabilities (then always the einsums,
        since `jax.nn.dot_product_attention` has no dropout); None: none.

    Returns:
      [batch, query, heads, head_dim] in `dtype`.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if dropout is None and attention_implementation(implementation) == "dot_product":
        out = jax.nn.dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask[:, None], scale=scale
        )
        return out.astype(dtype)
    if kv_heads != heads:
        # Grouped-query attention: each key/value head serves a group of query heads.
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    q = q * jnp.asarray(scale, q.dtype)
    # Batched dots keep JAX's own gradient: XLA's CPU runtime has no mixed
    # bf16 x bf16 -> f32 kernel for them.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    # Masked keys get the most negative logit (a fully masked query row, a
    # padding position, becomes uniform rather than NaN and is dropped by pooling).
    logits = jnp.where(mask[:, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v, preferred_element_type=jnp.float32).astype(
        dtype
    )


def _layer_norm(config: TransformerConfig, name: str) -> nn.Module:
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        dtype=jnp.float32,
        param_dtype=config.params_dtype,
        scale_init=_ones(("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


def apply_rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021), the half-split variant of Llama/Gemma.

    Args:
      x: [batch, length, heads, head_dim].
      positions: [batch, length] integer positions.
      theta: frequency base.

    Returns:
      x rotated, same shape and dtype.
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    angle = positions[..., None].astype(jnp.float32) * freq  # [batch, length, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Projection(nn.Module):
    """A linear map between named axes, written as one einsum.

    Flax's DenseGeneral initialises a flat kernel and reshapes it, which applies
    the logical sharding constraint to the wrong rank under a mesh; here the
    kernel is created in its final shape.

    Attributes:
      kernel_shape: shape of the kernel, e.g. (embed, heads, kv).
      kernel_axes: its logical axis names.
      equation: einsum from (input, kernel) to output, e.g. "...d,dhk->...hk".
      bias_axes: logical names of the bias (the output feature axes), or None
        for no bias.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    equation: str
    bias_axes: tuple[str | None, ...] | None = None
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _kernel_init(self.kernel_axes), self.kernel_shape, self.param_dtype)
        # Accumulate in float32 whatever the operand dtype: for bf16 operands this
        # is also the fast path on CPUs with AMX (bf16 -> bf16 dots are not).
        y = _einsum(self.equation, x, kernel, self.dtype)
        if self.bias_axes is not None:
            out_shape = self.kernel_shape[-len(self.bias_axes) :]
            bias = self.param("bias", _zeros(self.bias_axes), out_shape, self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention under a given mask.

    Attributes:
      config: the tower's config.
      rope_theta: the RoPE base of this layer (local and global layers differ);
        None: config.rope_theta.
      implementation: see ATTENTION_IMPLEMENTATIONS.
    """

    config: TransformerConfig
    rope_theta: float | None = None
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array,
        positions: Array,
        deterministic: bool,
        cache: tuple[Array, Array] | None = None,
        cache_index: Array | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        """mask is [batch, query, key] bool (see `attention_mask`); positions [batch, length].

        With ``cache`` (keys, values), each [batch, cache_len, kv_heads, kv]: this
        call's rotated keys and values are written into it at slot ``cache_index``
        (a scalar) and the queries attend over the whole cache (``mask`` is then
        [batch, query, cache_len]); returns (output, updated cache). Decoding
        (`embedder.lm.decode`) keeps the cache's shape fixed, so one step compiles once.
        """
        cfg = self.config
        use_bias = cfg.family == "bert"
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_size

        def proj(name, heads, head_axis):
            return Projection(
                kernel_shape=(d, heads, hd),
                kernel_axes=("embed", head_axis, "kv"),
                equation="bld,dhk->blhk",
                bias_axes=(head_axis, "kv") if use_bias else None,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                name=name,
            )(x)

        q = proj("query", h, "heads")  # [batch, length, heads, kv]
        k = proj("key", kvh, "kv_heads")  # [batch, length, kv_heads, kv]
        v = proj("value", kvh, "kv_heads")
        if cfg.qk_norm:
            q = _rms_norm(cfg, "query_norm", "kv")(q)
            k = _rms_norm(cfg, "key_norm", "kv")(k)
        if cfg.family == "llm":
            theta = cfg.rope_theta if self.rope_theta is None else self.rope_theta
            q = apply_rotary(q, positions, theta)
            k = apply_rotary(k, positions, theta)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, axis=1)
            cache = (k, v)
        q = _constrain(q, ("batch", "length", "heads", "kv"))
        dropout = None
        if cfg.attention_dropout_rate and not deterministic:
            dropout = functools.partial(nn.Dropout(cfg.attention_dropout_rate), deterministic=False)
        scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        out = attend(q, k, v, mask, scale, cfg.compute_dtype, self.implementation, dropout)
        out = _constrain(out, ("batch", "length", "heads", "kv"))
        out = Projection(
            kernel_shape=(h, hd, d),
            kernel_axes=("heads", "kv", "embed"),
            equation="blhk,hkd->bld",
            bias_axes=("embed",) if use_bias else None,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            name="out",
        )(out)
        return out if cache is None else (out, cache)


class Mlp(nn.Module):
    """The feed-forward block: plain (bert) or gated (llm)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        use_bias = cfg.family == "bert"

        def dense(name, shape, axes, equation, bias_axes):
            return Projection(
                kernel_shape=shape,
                kernel_axes=axes,
                equation=equation,
                bias_axes=bias_axes if use_bias else None,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                name=name,
            )

        act = ACTIVATIONS[cfg.activation]
        wi = functools.partial(
            dense,
            shape=(cfg.hidden_size, cfg.mlp_dim),
            axes=("embed", "mlp"),
            equation="bld,dm->blm",
            bias_axes=("mlp",),
        )
        if cfg.family == "llm":
            h = act(wi("wi_gate")(x)) * wi("wi_up")(x)
        else:
            h = act(wi("wi")(x))
        h = _constrain(h, ("batch", "length", "mlp"))
        return dense("wo", (cfg.mlp_dim, cfg.hidden_size), ("mlp", "embed"), "blm,md->bld", ("embed",))(h)


class Block(nn.Module):
    """One Transformer block of either family.

    Attributes:
      config: the tower's config.
      rope_theta: the RoPE base of this layer's attention; None: config.rope_theta.
      implementation: of the attention (see ATTENTION_IMPLEMENTATIONS).
    """

    config: TransformerConfig
    rope_theta: float | None = None
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array,
        positions: Array,
        deterministic: bool,
        cache: tuple[Array, Array] | None = None,
        cache_index: Array | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        """With ``cache``, returns (output, updated cache) (see `Attention`; llm family)."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        attention = Attention(cfg, self.rope_theta, self.implementation, name="attention")
        if cfg.family == "bert":
            # Post-LayerNorm (Devlin et al. 2019): norm after each residual sum.
            h = attention(x, mask, positions, deterministic)
            x = _layer_norm(cfg, "attention_norm")(x + dropout(h, deterministic=deterministic))
            h = Mlp(cfg, name="mlp")(x, deterministic)
            x = _layer_norm(cfg, "mlp_norm")(x + dropout(h, deterministic=deterministic))
        else:
            # Pre-RMSNorm: norm inside each residual branch (and, with post_norms,
            # on each branch's output too, as Gemma 2/3).
            h = attention(
                _rms_norm(cfg, "attention_norm")(x),
                mask,
                positions,
                deterministic,
                cache=cache,
                cache_index=cache_index,
            )
            if cache is not None:
                h, cache = h
            if cfg.post_norms:
                h = _rms_norm(cfg, "post_attention_norm")(h)
            x = x + dropout(h, deterministic=deterministic)
            h = Mlp(cfg, name="mlp")(_rms_norm(cfg, "mlp_norm")(x), deterministic)
            if cfg.post_norms:
                h = _rms_norm(cfg, "post_mlp_norm")(h)
            x = x + dropout(h, deterministic=deterministic)
        x = _constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))
        return x if cache is None else (x, cache)


class Encoder(nn.Module):
    """A stack of blocks over token embeddings; returns per-token hidden states.

    Call with ``tokens`` [batch, length] int32 (padding = ``config.pad_id``) and get
    ``hidden`` [batch, length, hidden_size] in the compute dtype. ``mask``
    [batch, length] (True = real token) overrides the padding derived from
    ``pad_id``, for text that contains the pad token itself (e.g. a literal "[PAD]").

    Packed rows (several texts a row) come with ``segment_ids`` [batch, length]
    (0 = padding, 1..S = the row's texts, each a contiguous run): attention is
    block-diagonal by text, and positions restart at 0 for each text (computed
    from the segment ids unless ``positions`` is given), so each text's states
    equal those of the text encoded alone in a row of its own.

    Attributes:
      config: the tower's config.
      implementation: of the attention (see ATTENTION_IMPLEMENTATIONS).
    """

    config: TransformerConfig
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        token_types: Array | None = None,
        deterministic: bool = True,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"Encoder expects tokens of shape [batch, length], got {tokens.shape}")
        batch, length = tokens.shape
        if mask is None:
            mask = tokens != cfg.pad_id  # [batch, length]
        if segment_ids is not None:
            if segment_ids.shape != tokens.shape:
                raise ValueError(
                    f"segment_ids {segment_ids.shape} must have the tokens' shape {tokens.shape}"
                )
            mask = mask & (segment_ids != 0)
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.params_dtype,
            param_dtype=cfg.params_dtype,
            embedding_init=_kernel_init(("vocab", "embed")),
            name="token_embed",
        )
        x = embed(tokens)  # [batch, length, embed] in the parameter dtype
        if cfg.scale_embeddings:
            # In the embedding dtype, as transformers' Gemma3TextScaledWordEmbedding
            # (sqrt(width) rounded to bf16 for bf16 weights).
            x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
        x = x.astype(cfg.compute_dtype)
        if cfg.family == "bert":
            if length > cfg.max_len:
                raise ValueError(
                    f"sequence length {length} exceeds the position embeddings (max_len={cfg.max_len})"
                )
            pos_table = self.param(
                "position_embed",
                _kernel_init(("length", "embed")),
                (cfg.max_len, cfg.hidden_size),
                cfg.params_dtype,
            )
            type_table = self.param(
                "type_embed",
                _kernel_init((None, "embed")),
                (cfg.type_vocab_size, cfg.hidden_size),
                cfg.params_dtype,
            )
            if token_types is None:
                token_types = jnp.zeros_like(tokens)
            if segment_ids is None:
                position_embeddings = pos_table[:length].astype(x.dtype)[None]
            else:
                # Restarted positions: a gather instead of the table's first rows.
                position_embeddings = jnp.take(pos_table, positions, axis=0).astype(x.dtype)
            x = x + position_embeddings + type_table[token_types].astype(x.dtype)
            x = _layer_norm(cfg, "embed_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))

        block_cls = Block
        if cfg.remat:
            # Recompute each block's activations in the backward pass; the
            # `deterministic` flag (argument 4, counting self) must stay static.
            block_cls = nn.remat(Block, static_argnums=(4,))
        # The masks are built once here and shared by every layer of their kind.
        mask_positions = None if segment_ids is None else positions
        masks = {
            FULL_ATTENTION: attention_mask(mask, cfg.causal, None, mask_positions, segment_ids),
            SLIDING_ATTENTION: attention_mask(
                mask, cfg.causal, cfg.sliding_window, mask_positions, segment_ids
            ),
        }
        thetas = {FULL_ATTENTION: cfg.rope_theta, SLIDING_ATTENTION: cfg.rope_local_theta or cfg.rope_theta}
        for i, kind in enumerate(cfg.attention_types):
            layer = block_cls(cfg, thetas[kind], self.implementation, name=f"layer_{i}")
            x = layer(x, masks[kind], positions, deterministic)
        if cfg.family == "llm":
            x = _rms_norm(cfg, "final_norm")(x)
        return x
