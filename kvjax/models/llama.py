"""A Llama-style decoder in plain JAX whose attention runs through kvjax.

RMSNorm, rotary position embeddings (interleaved pairs, llama.cpp's layout),
grouped-query attention and a SwiGLU MLP. `forward` works on one sequence
and a `kvjax.ModelCache` (one cache per layer, formats per layer), each run
of layers sharing a spec in a `fori_loop` over that run's stack; `jax.vmap`
it over a batch of sequences. `forward_without_cache` recomputes full
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


def _attention_inputs(config, p, x, pos):
  """q `[n, Hq, D]`, k and v `[n, H, D]` of one block, RoPE applied."""
  c = config
  n = x.shape[0]
  h = rms_norm(x, p["attn_norm"], c.norm_eps)
  q = (h @ p["wq"]).reshape(n, c.n_heads, c.head_dim)
  k = (h @ p["wk"]).reshape(n, c.n_kv_heads, c.head_dim)
  v = (h @ p["wv"]).reshape(n, c.n_kv_heads, c.head_dim)
  return rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta), v


def _block_output(config, p, x, attended):
  """The residual stream after attention output `[n, Hq, D]` and the MLP."""
  x = x + attended.reshape(x.shape[0], -1) @ p["wo"]
  h = rms_norm(x, p["ffn_norm"], config.norm_eps)
  return x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]


def _logits(config, params, x):
  x = rms_norm(x, params["final_norm"], config.norm_eps)
  head = params["embed"].T if config.tie_embeddings else params["lm_head"]
  return x @ head


def _layer_params(params, i):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                      params["layers"])


def cache_spec(config: LlamaConfig, **kw) -> kvjax.CacheSpec:
  """A `CacheSpec` with this model's kv heads and head_dim."""
  return kvjax.CacheSpec(num_kv_heads=config.n_kv_heads,
                         head_dim=config.head_dim, **kw)


def init_caches(config: LlamaConfig, spec, batch=None) -> kvjax.ModelCache:
  """Every layer's cache (`kvjax.init_layers`): `spec` is one `CacheSpec` for
  all layers or a sequence of one per layer (a per-layer policy); with
  `batch`, B sequences (leading axis B on every leaf)."""
  specs = [spec] * config.n_layers if isinstance(spec, kvjax.CacheSpec) else list(spec)
  if len(specs) != config.n_layers:
    raise ValueError(f"spec: expected one CacheSpec or {config.n_layers} (one per layer), "
                     f"got {len(specs)}")
  return kvjax.init_layers(specs, batch=batch)


def forward(params, config: LlamaConfig, caches, tokens, n_valid=None):
  """Runs `tokens: [n]` of one sequence through the model and its caches.

  Each run of layers sharing a spec runs in a `fori_loop` (one compiled
  layer per run instead of `n_layers`), each layer appending to and
  attending over its own layer of the run's stack in place.

  Args:
    params: the model's weights (per-layer arrays stacked on axis 0).
    config: its `LlamaConfig`.
    caches: the `ModelCache` from `init_caches` for this sequence.
    tokens: int32 `[n]`; with `n_valid`, only the first `n_valid` are real.
    n_valid: optional int32 scalar (ragged prefill under `vmap`).

  Returns:
    `(logits [n, vocab] float32, new caches)`.
  """
  start = kvjax.length(caches)
  pos = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
  x = params["embed"][tokens].astype(jnp.float32)
  for run, (first, n, _) in enumerate(kvjax.layer_runs(caches)):
    def layer(i, carry, first=first):
      x, stack = carry
      p = _layer_params(params, first + i)
      q, k, v = _attention_inputs(config, p, x, pos)
      stack = kvjax.append(stack, k, v, n_valid, layer=i)
      attended = kvjax.attend(stack, q, q_pos=pos, layer=i)
      return _block_output(config, p, x, attended), stack

    x, stack = jax.lax.fori_loop(0, n, layer, (x, caches.runs[run]))
    caches = caches.replace_run(run, stack)
  return _logits(config, params, x), caches


def forward_without_cache(params, config: LlamaConfig, tokens, store=None, exact=None):
  """Logits for every prefix of `tokens: [n]`, with full causal attention.

  `store`: optional `(fn, xs)`, `xs` a pytree with a leading axis of one
  entry per layer: layer `l` attends over `fn(k, v, xs[l]) -> (k', v')`
  (`[n, H, D]` each, e.g. its keys and values through store formats, as a
  cache would hold them: `kvjax.calibrate` measures formats' effects on
  next-token KL so). `exact: [n, n]` bool marks the pairs (query, key) that
  still read the layer's own keys and values (a cache's sinks and hot
  tail)."""
  n = tokens.shape[0]
  pos = jnp.arange(n, dtype=jnp.int32)
  causal = pos[None, :] <= pos[:, None]
  fn, xs = store if store is not None else (lambda k, v, _: (k, v), None)

  def layer(x, layer_xs):
    p, store_xs = layer_xs
    q, k, v = _attention_inputs(config, p, x, pos)
    k_store, v_store = fn(k, v, store_xs)
    group = q.shape[1] // k.shape[1]
    repeat = lambda a: jnp.repeat(a, group, axis=1)
    scores = lambda keys: jnp.einsum("qhd,khd->hqk", q, repeat(keys)) / math.sqrt(q.shape[-1])
    mix = lambda probs, values: jnp.einsum("hqk,khd->qhd", probs, repeat(values))
    if exact is None:
      probs = jax.nn.softmax(jnp.where(causal, scores(k_store), -jnp.inf), axis=-1)
      out = mix(probs, v_store)
    else:
      s = jnp.where(exact, scores(k), scores(k_store))
      probs = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
      out = mix(jnp.where(exact, probs, 0.0), v) + mix(jnp.where(exact, 0.0, probs), v_store)
    return _block_output(config, p, x, out), None

  x = params["embed"][tokens].astype(jnp.float32)
  x, _ = jax.lax.scan(layer, x, (params["layers"], xs))
  return _logits(config, params, x)


def attention_inputs_per_layer(params, config: LlamaConfig, tokens):
  """Each layer's queries, keys and values over `tokens: [n]` with full
  causal attention in float32 (no cache): `q [L, n, Hq, D]`, `k, v [L, n, H,
  D]`, RoPE applied (what a cache would store). For calibrating formats."""
  n = tokens.shape[0]
  pos = jnp.arange(n, dtype=jnp.int32)
  causal = pos[None, :] <= pos[:, None]

  def layer(x, p):
    q, k, v = _attention_inputs(config, p, x, pos)
    group = q.shape[1] // k.shape[1]
    kr, vr = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("qhd,khd->hqk", q, kr) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    return _block_output(config, p, x, jnp.einsum("hqk,khd->qhd", probs, vr)), (q, k, v)

  x = params["embed"][tokens].astype(jnp.float32)
  _, (q, k, v) = jax.lax.scan(layer, x, params["layers"])
  return q, k, v


# Per-layer formats chosen by `kvjax.calibrate` (docs/layers.md).
POLICY_VERSION = 1


def policy_specs(policy: dict, config, **spec_kwargs):
  """One `CacheSpec` per layer from a policy file's contents (as `python -m
  kvjax calibrate` writes it: `{"version": 1, "layers": [{"keys": fmt,
  "values": fmt}, ...]}`)."""
  if policy.get("version") != POLICY_VERSION or "layers" not in policy:
    raise ValueError(f"policy: expected version {POLICY_VERSION} with 'layers'")
  layers = policy["layers"]
  if len(layers) != config.n_layers:
    raise ValueError(f"policy: {len(layers)} layers, the model has {config.n_layers}")
  return [cache_spec(config, store=(layer["keys"], layer["values"]), **spec_kwargs)
          for layer in layers]
