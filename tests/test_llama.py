"""The example Llama decoder: decoding through a float32 kvjax cache equals
recomputing full causal attention without a cache."""

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.models import llama

CONFIG = llama.LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4,
                           n_kv_heads=2, head_dim=16, ffn_dim=96,
                           tie_embeddings=False)


def test_cached_decode_matches_cache_free_model():
  params = llama.random_params(CONFIG, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (40,), 0, CONFIG.vocab_size)
  want = llama.forward_without_cache(params, CONFIG, tokens)
  spec = llama.cache_spec(CONFIG, capacity=48, tail=4, migrate_batch=4,
                          sinks=2, hot_dtype="float32", store="f32")
  # Two runs of layers (per-layer specs), both float32, so exact.
  other = llama.cache_spec(CONFIG, capacity=48, tail=6, migrate_batch=2,
                           sinks=2, hot_dtype="float32", store="f32")
  caches = llama.init_caches(CONFIG, [spec, other])
  assert caches.run_layers == (1, 1)
  forward = jax.jit(lambda c, t, n: llama.forward(params, CONFIG, c, t, n))
  # A padded prefill chunk (n_valid), then one token at a time.
  chunk = jnp.zeros(24, jnp.int32).at[:20].set(tokens[:20])
  logits, caches = forward(caches, chunk, jnp.int32(20))
  got = [logits[:20]]
  for t in range(20, 40):
    logits, caches = forward(caches, tokens[t:t + 1], None)
    got.append(logits)
  got = jnp.concatenate(got)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert (jnp.argmax(got, -1) == jnp.argmax(want, -1)).all()
  layers = kvjax.stats(caches)["layers"]
  assert [l["store_tokens"] for l in layers] == [40 - 2 - 6, 40 - 2 - 6]


def test_rope_rotates_pairs_and_preserves_norm():
  x = jax.random.normal(jax.random.key(0), (5, 3, 8))
  pos = jnp.arange(5)
  y = llama.rope(x, pos, 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[0], x[0])  # position 0: no rotation
  # Relative property: <rope(q, p), rope(k, p)> does not depend on p.
  a = llama.rope(x[:1], jnp.array([7]), 100.0)
  b = llama.rope(x[1:2], jnp.array([7]), 100.0)
  np.testing.assert_allclose(jnp.sum(a * b), jnp.sum(x[0] * x[1]), rtol=1e-5)
