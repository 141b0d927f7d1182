"""SmolLM2-135M-Instruct through kvjax: the port is right (sensible text,
plausible perplexity) and a float32-store cache decodes exactly the tokens the
cache-free model chooses. Skipped, with the reason, without the model package
(CI installs it)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import demo
from kvjax.models import llama, smollm2

try:
  smollm2.gguf_path()
  for module in ("gguf", "tokenizers", "jinja2"):
    __import__(module)
  MISSING = None
except (smollm2.ModelNotInstalled, ImportError) as e:
  MISSING = str(e)

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"SmolLM2 not installed: {MISSING}")

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a KV cache is in a transformer.",
)
NEW_TOKENS = 64
TEXT = "/usr/share/common-licenses/Apache-2.0"


@functools.lru_cache(maxsize=None)
def model():
  return smollm2.load()


@functools.lru_cache(maxsize=None)
def free_decode(store):
  return decode(store)


def decode(store, forced=None):
  """Greedy decode of PROMPTS (ragged, batched) through a `store` cache."""
  config, params, tokenizer = model()
  work = demo.chat_workload("test", config, params, tokenizer, list(PROMPTS),
                            NEW_TOKENS)
  args = demo.parse_args(["--chunk", "32", "--tail", "16", "--migrate-batch", "16",
                          "--sinks", "4", "--hot-dtype", "float32"])
  _, logp, chosen, own = demo.run_format(work, store, args, forced)
  return work, logp, chosen, own


def test_tokenizer_and_chat_template():
  _, _, tokenizer = model()
  prompt = tokenizer.chat("Hi there")
  assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
      "<|im_start|>assistant\n")
  ids = tokenizer.encode(prompt)
  assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, <|im_end|> are single ids
  assert tokenizer.decode(ids) == prompt
  assert tokenizer.encode("2024") == [tokenizer.encode(d)[0] for d in "2024"]


def test_config_read_from_metadata():
  config, params, _ = model()
  assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads,
          config.head_dim, config.rope_theta) == (30, 576, 9, 3, 64, 100000.0)
  assert config.tie_embeddings and "lm_head" not in params
  assert params["layers"]["wq"].shape == (30, 576, 576)
  assert params["layers"]["wk"].shape == (30, 576, 192)


def test_perplexity_on_a_license_text_is_plausible():
  config, params, tokenizer = model()
  with open(TEXT) as f:
    ids = tokenizer.encode(f.read())[:256]
  logits = jax.jit(lambda p, t: llama.forward_without_cache(p, config, t))(
      params, jnp.asarray(ids))
  logp = jax.nn.log_softmax(logits[:-1], -1)
  nll = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(ids)[1:, None], -1))
  assert 2.0 < np.exp(nll) < 40.0, np.exp(nll)


def test_float32_cache_decodes_exactly_the_cache_free_tokens():
  config, params, tokenizer = model()
  work, _, _, own = free_decode("f32")
  answer = tokenizer.decode(own[:, 0])
  assert "Paris" in answer, answer
  full = jax.jit(lambda p, t: llama.forward_without_cache(p, config, t))
  for b in range(len(PROMPTS)):
    n = int(work.prompt_lengths[b])
    seq = np.concatenate([work.prompts[b, :n], own[:, b]])
    logits = np.asarray(full(params, jnp.asarray(seq)))
    # At each generated position the cache-free model picks the same token:
    # its own greedy decode would produce exactly this sequence.
    cache_free = logits[n - 1:n - 1 + NEW_TOKENS].argmax(-1)
    np.testing.assert_array_equal(cache_free, own[:, b], err_msg=f"prompt {b}")


def test_q8_cache_agrees_on_most_tokens():
  _, _, _, reference = free_decode("f32")
  _, _, chosen, _ = decode("q8", forced=reference)
  agree = np.mean(chosen == reference)
  assert agree >= 0.9, agree
