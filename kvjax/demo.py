"""The decoding demo: a batch of sequences decoded through kvjax's cache, once
per store format, compared with a float32 cache.

    python -m kvjax demo [--model random] [--formats f32,bf16,q8,q4] ...

Each format prefills the same ragged prompts in chunks (`vmap` over the batch,
`n_valid` per row), then decodes inside one `lax.scan`, feeding every format
the tokens that the float32 cache chose greedily, so their next-token
distributions can be compared step by step (KL divergence and greedy-token
agreement against float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import _formats
from kvjax.models import llama

DEFAULT_FORMATS = ("f32", "bf16", "q8", "q4")
REFERENCE_FORMAT = "f32"


@dataclasses.dataclass
class Workload:
  """What the demo decodes: a model, its prompts and the cache geometry."""
  name: str
  config: llama.LlamaConfig
  params: dict
  prompts: np.ndarray  # int32 [B, P], right-padded
  prompt_lengths: np.ndarray  # int32 [B]
  new_tokens: int
  detokenize: object = None  # tokens -> str, for real models


def random_workload(args) -> Workload:
  config = llama.LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8,
                             n_kv_heads=2, head_dim=64, ffn_dim=768,
                             rope_theta=10000.0, tie_embeddings=False)
  params = llama.random_params(config, jax.random.key(0))
  # Sharpen attention and the output distribution, as a trained model's are,
  # so the cache's errors show in the next-token distribution.
  params["layers"]["wq"] = params["layers"]["wq"] * 4.0
  params["lm_head"] = params["lm_head"] * 6.0
  rng = np.random.default_rng(0)
  lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(np.int32)
  prompts = rng.integers(0, config.vocab_size, (args.batch, args.prompt_len),
                         dtype=np.int32)
  return Workload("random (4 layers, fixed seed)", config, params, prompts,
                  lengths, args.new_tokens)


def spec_for(work: Workload, store: str, args) -> kvjax.CacheSpec:
  total = int(work.prompt_lengths.max()) + work.new_tokens
  capacity = args.capacity or total
  hot = "float32" if store == REFERENCE_FORMAT else args.hot_dtype
  return llama.cache_spec(work.config, capacity=capacity, tail=args.tail,
                          migrate_batch=args.migrate_batch, sinks=args.sinks,
                          hot_dtype=hot, store=store)


def make_runner(work: Workload, spec: kvjax.CacheSpec, chunk: int):
  """Compiled prefill and decode programs for one cache spec."""
  config, params = work.config, work.params
  forward = jax.vmap(lambda caches, tokens, n: llama.forward(params, config, caches, tokens, n))

  def prefill(caches, tokens, n_valid):  # tokens [B, chunk], n_valid [B]
    return forward(caches, tokens, n_valid)[1]

  def decode(caches, first, forced):
    """Greedy decode; `forced: [T, B]` overrides the choice where >= 0."""
    def step(carry, forced_t):
      caches, token = carry
      logits, caches = forward(caches, token[:, None], None)
      logits = logits[:, 0]
      chosen = jnp.argmax(logits, -1).astype(jnp.int32)
      nxt = jnp.where(forced_t >= 0, forced_t, chosen)
      return (caches, nxt), (jax.nn.log_softmax(logits), chosen)
    (caches, _), (logp, chosen) = jax.lax.scan(step, (caches, first), forced)
    return caches, logp, chosen

  batch = work.prompts.shape[0]
  caches = llama.init_caches(config, spec, batch=batch)
  i32 = jax.ShapeDtypeStruct
  prefill_c = jax.jit(prefill, donate_argnums=0).lower(
      caches, i32((batch, chunk), jnp.int32), i32((batch,), jnp.int32)).compile()
  decode_c = jax.jit(decode, donate_argnums=0).lower(
      caches, i32((batch,), jnp.int32),
      i32((work.new_tokens, batch), jnp.int32)).compile()
  return caches, prefill_c, decode_c


def run_format(work: Workload, store: str, args, forced):
  spec = spec_for(work, store, args)
  t0 = time.perf_counter()
  caches, prefill, decode = make_runner(work, spec, args.chunk)
  compile_s = time.perf_counter() - t0
  # Prefill all prompt tokens but the last; the last starts the decode.
  lengths = work.prompt_lengths - 1
  t0 = time.perf_counter()
  for start in range(0, int(lengths.max()), args.chunk):
    tokens = np.zeros((len(lengths), args.chunk), np.int32)
    piece = work.prompts[:, start:start + args.chunk]
    tokens[:, :piece.shape[1]] = piece
    n_valid = np.clip(lengths - start, 0, args.chunk).astype(np.int32)
    caches = prefill(caches, tokens, n_valid)
  jax.block_until_ready(caches)
  prefill_s = time.perf_counter() - t0
  first = work.prompts[np.arange(len(lengths)), lengths]
  t0 = time.perf_counter()
  caches, logp, chosen = decode(caches, first, forced)
  jax.block_until_ready(logp)
  decode_s = time.perf_counter() - t0
  stats = kvjax.stats(caches[0])
  layers = len(caches)
  row = dict(
      format=store, compile_s=compile_s,
      prefill_tok_s=float(lengths.sum()) / prefill_s,
      decode_tok_s=work.new_tokens * len(lengths) / decode_s,
      sink_bytes=layers * sum(stats["sink_bytes"]),
      tail_bytes=layers * sum(stats["tail_bytes"]),
      store_bytes=layers * sum(stats["store_bytes"]),
      store_bits=stats["store_bits_per_value"][0],
      compression=float(np.mean(stats["compression_ratio"])))
  return row, np.asarray(logp), np.asarray(chosen)


def format_table(rows) -> str:
  head = ("format", "prefill tok/s", "decode tok/s", "sink KiB", "tail KiB",
          "store KiB", "store bits/val", "compression", "KL vs f32",
          "greedy agree")
  lines = [" | ".join(head), " | ".join("---" for _ in head)]
  for r in rows:
    lines.append(" | ".join([
        r["format"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.0f}",
        f"{r['sink_bytes'] / 1024:.0f}", f"{r['tail_bytes'] / 1024:.0f}",
        f"{r['store_bytes'] / 1024:.0f}", f"{r['store_bits']:.2f}",
        f"{r['compression']:.2f}x", f"{r['kl']:.2e}", f"{100 * r['agree']:.1f}%"]))
  return "\n".join(lines)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m kvjax demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="random", choices=["random"],
                 help="which model decodes (default: %(default)s)")
  p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                 help="comma-separated store formats (default: %(default)s)")
  p.add_argument("--batch", type=int, default=4, help="sequences decoded at once")
  p.add_argument("--prompt-len", type=int, default=384, help="longest prompt")
  p.add_argument("--new-tokens", type=int, default=48, help="tokens decoded")
  p.add_argument("--chunk", type=int, default=128, help="prefill chunk size")
  p.add_argument("--capacity", type=int, default=0,
                 help="cache capacity (default: longest prompt + new tokens)")
  p.add_argument("--tail", type=int, default=32)
  p.add_argument("--migrate-batch", type=int, default=32)
  p.add_argument("--sinks", type=int, default=4)
  p.add_argument("--hot-dtype", default="bfloat16",
                 choices=["float32", "bfloat16", "float16"])
  p.add_argument("--json", default="", help="also write the rows to this file")
  args = p.parse_args(argv)
  args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  unknown = [f for f in args.formats if f not in _formats.FORMATS]
  if unknown or not args.formats:
    p.error(f"--formats: unknown {unknown}; choose from {', '.join(_formats.FORMATS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  work = random_workload(args)
  formats = [REFERENCE_FORMAT] + [f for f in args.formats if f != REFERENCE_FORMAT]
  print(f"kvjax demo: model {work.name}, batch {len(work.prompt_lengths)}, "
        f"prompts {work.prompt_lengths.min()}-{work.prompt_lengths.max()} "
        f"tokens, {work.new_tokens} new tokens, formats {', '.join(formats)}",
        flush=True)
  rows, reference = [], None
  for store in formats:
    print(f"  [{len(rows) + 1}/{len(formats)}] {store}: compiling and decoding ...",
          end="", flush=True)
    if reference is None:  # float32 decodes freely; its tokens drive the rest
      forced = np.full((work.new_tokens, len(work.prompt_lengths)), -1, np.int32)
    else:
      forced = reference[1]
    row, logp, chosen = run_format(work, store, args, forced)
    if reference is None:
      reference = (logp, chosen)
    ref_logp, ref_chosen = reference
    p = np.exp(ref_logp)
    row["kl"] = float(np.mean(np.sum(p * (ref_logp - logp), -1)))
    row["agree"] = float(np.mean(chosen == ref_chosen))
    rows.append(row)
    print(f" done (compile {row['compile_s']:.1f}s)", flush=True)
  print()
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0
