"""A Llama-style decoder in plain JAX whose attention runs through kvjax.

RMSNorm, rotary position embeddings (interleaved pairs, llama.cpp's layout),
grouped-query attention and a SwiGLU MLP. `forward` works on one sequence;
`jax.vmap` it over a batch of caches. `forward_without_cache` recomputes full
causal attention over a whole prefix, the reference the cache must match.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import kvjax


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True


def random_params(config: LlamaConfig, key) -> dict:
  """Fixed-seed random weights, scaled so activations stay O(1)."""
  c = config
  keys = iter(jax.random.split(key, 16))

  def dense(shape, fan_in):
    return jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)

  layers = dict(
      attn_norm=jnp.ones((c.n_layers, c.dim)),
      wq=dense((c.n_layers, c.dim, c.n_heads * c.head_dim), c.dim),
      wk=dense((c.n_layers, c.dim, c.n_kv_heads * c.head_dim), c.dim),
      wv=dense((c.n_layers, c.dim, c.n_kv_heads * c.head_dim), c.dim),
      wo=dense((c.n_layers, c.n_heads * c.head_dim, c.dim), c.n_heads * c.head_dim),
      ffn_norm=jnp.ones((c.n_layers, c.dim)),
      w_gate=dense((c.n_layers, c.dim, c.ffn_dim), c.dim),
      w_up=dense((c.n_layers, c.dim, c.ffn_dim), c.dim),
      w_down=dense((c.n_layers, c.ffn_dim, c.dim), c.ffn_dim))
  params = dict(embed=jax.random.normal(next(keys), (c.vocab_size, c.dim)),
                layers=layers, final_norm=jnp.ones((c.dim,)))
  if not c.tie_embeddings:
    params["lm_head"] = dense((c.dim, c.vocab_size), c.dim)
  return params


def rms_norm(x, weight, eps):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * weight


def rope(x, pos, theta):
  """Rotates pairs (2i, 2i+1) of `x: [n, heads, D]` by `pos * theta^(-2i/D)`."""
  d = x.shape[-1]
  freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angle = pos.astype(jnp.float32)[:, None, None] * freq  # [n, 1, D/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  even, odd = x[..., 0::2], x[..., 1::2]
  return jnp.stack([even * cos - odd * sin, even * sin + odd * cos],
                   -1).reshape(x.shape)


def _layer(config, p, x, pos, attention):
  """One block; `attention(q, k, v) -> [n, Hq, D]` supplies the mixing."""
  c = config
  n = x.shape[0]
  h = rms_norm(x, p["attn_norm"], c.norm_eps)
  q = (h @ p["wq"]).reshape(n, c.n_heads, c.head_dim)
  k = (h @ p["wk"]).reshape(n, c.n_kv_heads, c.head_dim)
  v = (h @ p["wv"]).reshape(n, c.n_kv_heads, c.head_dim)
  q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
  x = x + attention(q, k, v).reshape(n, -1) @ p["wo"]
  h = rms_norm(x, p["ffn_norm"], c.norm_eps)
  return x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]


def _logits(config, params, x):
  x = rms_norm(x, params["final_norm"], config.norm_eps)
  head = params["embed"].T if config.tie_embeddings else params["lm_head"]
  return x @ head


def _layer_params(params, i):
  return jax.tree.map(lambda a: a[i], params["layers"])


def cache_spec(config: LlamaConfig, **kw) -> kvjax.CacheSpec:
  """A `CacheSpec` with this model's kv heads and head_dim."""
  return kvjax.CacheSpec(num_kv_heads=config.n_kv_heads,
                         head_dim=config.head_dim, **kw)


def init_caches(config: LlamaConfig, spec: kvjax.CacheSpec, batch=None):
  """One cache per layer (a list, so each layer's buffers update in place)."""
  return [kvjax.init(spec, batch=batch) for _ in range(config.n_layers)]


def forward(params, config: LlamaConfig, caches, tokens, n_valid=None):
  """Runs `tokens: [n]` of one sequence through the model and its caches.

  Args:
    params: the model's weights.
    config: its `LlamaConfig`.
    caches: list of `KVCache`, one per layer, for this sequence.
    tokens: int32 `[n]`; with `n_valid`, only the first `n_valid` are real.
    n_valid: optional int32 scalar (ragged prefill under `vmap`).

  Returns:
    `(logits [n, vocab] float32, new caches)`.
  """
  start = kvjax.length(caches[0])
  pos = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
  x = params["embed"][tokens].astype(jnp.float32)
  new_caches = []
  for i, cache in enumerate(caches):
    def attention(q, k, v, cache=cache):
      cache = kvjax.append(cache, k, v, n_valid)
      new_caches.append(cache)
      return kvjax.attend(cache, q, q_pos=pos)
    x = _layer(config, _layer_params(params, i), x, pos, attention)
  return _logits(config, params, x), new_caches


def forward_without_cache(params, config: LlamaConfig, tokens):
  """Logits for every prefix of `tokens: [n]`, with full causal attention."""
  n = tokens.shape[0]
  pos = jnp.arange(n, dtype=jnp.int32)
  x = params["embed"][tokens].astype(jnp.float32)
  causal = pos[None, :] <= pos[:, None]

  def attention(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    return jnp.einsum("hqk,khd->qhd", p, v)

  for i in range(config.n_layers):
    x = _layer(config, _layer_params(params, i), x, pos, attention)
  return _logits(config, params, x)
