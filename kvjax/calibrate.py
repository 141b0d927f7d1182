"""`python -m kvjax calibrate`: a per-layer, per-side (keys, values) store
format policy chosen by measurement.

    python -m kvjax calibrate --bits 4.0 [--text FILE] [--out policy.json]
    python -m kvjax demo --policy policy.json      # the policy as a table row

It runs the demo's model (SmolLM2-135M, or `--model random`) over a
calibration text in float32 and records every layer's queries, keys and
values. For each layer, side and candidate format it measures the
attention-output error of storing that side in that format (the rest exact):
`sum ||out - out_ref||^2 / sum ||out_ref||^2` over the text's positions,
each position reading its sinks and hot tail exactly, as a decoding cache
with `--sinks`, `--tail` and `--migrate-batch` reads them. One forward pass
per layer and side with that side alone in the `--probe` format gives the
side's next-token KL per unit of attention error, so each candidate's error
becomes a predicted KL. It then picks, per layer and side, the formats with
the lowest total predicted KL whose average bits per value, measured from
the encoded arrays, is at most `--bits` (exactly: a knapsack over the
layer-sides by dynamic programming). `--refine` rounds then measure,
around that policy, every layer-side's move to its next cheaper and next
dearer format (the model run with every layer encoding its own keys and
values, so errors compound as in a cache) and solve the knapsack again over
the measured changes, keeping the result only if its measured KL is lower.
Last it measures next-token KL against a float32 cache of the chosen policy and of
the uniform candidates near the budget, each through a real kvjax cache over
the same text.

The policy file is plain JSON, one entry per layer:

    {"version": 1, "bits_per_value": 3.98, "layers": [{"keys": "q8",
     "values": "turbo3"}, ...], ...the measurements...}
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _formats
from kvjax.models import llama

CANDIDATES = ("f32", "bf16", "q8", "q4", "turbo4", "turbo3.5", "turbo3", "turbo2.5",
              "turbo2", "turbo1")
DEFAULT_TEXT = str(pathlib.Path(__file__).resolve().parent / "data" / "calibration.txt")
POLICY_VERSION = llama.POLICY_VERSION
policy_specs = llama.policy_specs  # a policy read back into specs (the demo uses it too)


def bits_per_value(fmt: str, head_dim: int) -> float:
  """Bits per value of `fmt`, measured from its encoded arrays."""
  x = jnp.ones((16, head_dim), jnp.float32)
  enc = _formats.FORMATS[fmt].encode(x)
  return 8.0 * sum(a.nbytes for a in jax.tree.leaves(enc)) / x.size


def roundtrip(fmt: str, x, sinks: int):
  """`x: [L, n, H, D]` as a cache stores it: positions >= `sinks` encoded in
  `fmt` (split formats: each head's channel order from its first non-sink
  token), the sinks exact."""
  f = _formats.FORMATS[fmt]
  order = f.outlier_order(x[:, sinks]) if f.split else None  # [L, H, D]
  order = None if order is None else order[:, None]
  y = f.decode(f.encode(x, order), order)
  keep = (jnp.arange(x.shape[1]) < sinks)[None, :, None, None]
  return jnp.where(keep, x, y)


def exact_keys(n: int, sinks: int, tail: int, migrate_batch: int) -> np.ndarray:
  """`[n, n]` bool: key `j` is read exactly (a sink, or in the hot tail) by
  the decode step of query `i`, when the cache holds tokens `0..i`: the tail
  keeps the newest `tail` tokens and migrates `migrate_batch` at a time, so
  it holds `tail + (m - tail) % migrate_batch` of the `m` non-sink tokens."""
  held = np.arange(n) + 1 - sinks
  hot = np.where(held <= tail, held, tail + (held - tail) % migrate_batch)
  first_hot = np.arange(n) + 1 - np.maximum(hot, 0)
  j = np.arange(n)[None, :]
  return (j < sinks) | (j >= first_hot[:, None])


@jax.jit
def _attention(q, k, v, k_store, v_store, exact):
  """Causal attention of one layer, q `[n, Hq, D]`, k, v `[n, H, D]`, as a
  cache computes it: pairs `exact [n, n]` read `k, v`, the others the
  store's `k_store, v_store`."""
  n, hq, d = q.shape
  group = hq // k.shape[1]
  repeat = lambda a: jnp.repeat(a, group, axis=1)
  scores = lambda keys: jnp.einsum("qhd,khd->hqk", q, repeat(keys), precision="highest")
  s = jnp.where(exact, scores(k), scores(k_store)) / math.sqrt(d)
  causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
  out = lambda probs, values: jnp.einsum("hqk,khd->qhd", probs, repeat(values),
                                         precision="highest")
  return out(jnp.where(exact, p, 0.0), v) + out(jnp.where(exact, 0.0, p), v_store)


@jax.jit
def _divergence(ref, logp):
  """Mean over positions of KL(ref || logp), both log-probabilities."""
  return jnp.mean(jnp.sum(jnp.exp(ref) * (ref - logp), -1))


@jax.jit
def _relative_error(out, ref):
  return jnp.sum((out - ref) ** 2) / jnp.sum(ref ** 2)


def attention_errors(q, k, v, candidates, sinks, exact, start=0):
  """`{side: {format: [L] relative errors}}` for side "keys" and "values"
  over the positions from `start` on; `exact`: the pairs a cache reads from
  its sinks and hot tail (`exact_keys`)."""
  layers = q.shape[0]
  ref = [_attention(q[l], k[l], v[l], k[l], v[l], exact) for l in range(layers)]
  out = {"keys": {}, "values": {}}
  for fmt in candidates:
    kq, vq = roundtrip(fmt, k, sinks), roundtrip(fmt, v, sinks)
    out["keys"][fmt] = [
        float(_relative_error(_attention(q[l], k[l], v[l], kq[l], v[l], exact)[start:],
                              ref[l][start:]))
        for l in range(layers)]
    out["values"][fmt] = [
        float(_relative_error(_attention(q[l], k[l], v[l], k[l], vq[l], exact)[start:],
                              ref[l][start:]))
        for l in range(layers)]
  return out


def policy_logits(params, config, tokens, formats, sinks: int, exact):
  """`logp(key_index [L], value_index [L]) -> [n, vocab]`: next-token
  log-probabilities over `tokens` of the model whose layer `l` stores its
  keys in `formats[key_index[l]]` (values likewise; index -1: exact) while
  each position reads its `exact` pairs (sinks, hot tail) as they are: what
  decoding through caches of those formats computes, token by token. Each
  layer encodes its own keys and values inside the forward pass, as a cache
  does, so errors compound through the layers; one compile serves every
  policy."""
  branches = [lambda x: x] + [lambda x, f=f: roundtrip(f, x[None], sinks)[0] for f in formats]

  def through_formats(k, v, index):
    return (jax.lax.switch(index[0] + 1, branches, k),
            jax.lax.switch(index[1] + 1, branches, v))

  # The weights, tokens and mask are arguments, not constants: folding
  # constants of a model's size into the program costs XLA minutes and GBs.
  logp = jax.jit(lambda p, t, e, ik, iv: jax.nn.log_softmax(llama.forward_without_cache(
      p, config, t, (through_formats, (ik, iv)), e)))
  exact = jnp.asarray(exact)
  return lambda ik, iv: logp(params, tokens, exact, jnp.asarray(ik, jnp.int32),
                             jnp.asarray(iv, jnp.int32))


def policy_kl(params, config, tokens, formats, sinks: int, exact, start=0):
  """`kl(key_index [L], value_index [L]) -> float`: next-token KL against
  float32 (mean over the positions of `tokens` from `start` on) of
  `policy_logits`' model."""
  logp = policy_logits(params, config, tokens, formats, sinks, exact)
  ref = logp(np.full(config.n_layers, -1), np.full(config.n_layers, -1))[start:]
  return lambda key_index, value_index: float(
      _divergence(ref, logp(key_index, value_index)[start:]))


def kl_sensitivity(kl, layers: int, probe_index: int, probe: str, errors):
  """`{side: [L]}`: next-token KL per unit of attention error, each layer's
  side alone through `probe` (one forward pass each, `kl` from `policy_kl`):
  the factor that turns a format's measured attention error into its
  predicted KL."""
  out = {"keys": [], "values": []}
  for l in range(layers):
    one = np.full(layers, -1)
    one[l] = probe_index
    none = np.full(layers, -1)
    for side, (ik, iv) in (("keys", (one, none)), ("values", (none, one))):
      out[side].append(max(kl(ik, iv), 0.0) / max(errors[side][probe][l], 1e-30))
  return out


def frontier(errors, bits, side, layer):
  """The formats of one layer's side that no cheaper format beats on
  measured attention error, cheapest first."""
  kept, least = [], math.inf
  for f in sorted(bits, key=lambda f: bits[f]):
    if errors[side][f][layer] < least:
      kept.append(f)
      least = errors[side][f][layer]
  return kept


def refine(kl, choice, formats, errors, bits, budget, rounds: int, log=print):
  """Improves `choice` (per layer `(key format, value format)`) by measured
  KL: around the current policy, each layer-side's move to the next cheaper
  and the next dearer format on its frontier is measured through `kl`
  (`policy_kl`), the moves' effects are taken as additive and the best
  assignment within `budget` solved for (`choose`); the result is kept only
  if its measured KL is lower. Returns `(choice, its KL, history)`."""
  sides = ("keys", "values")
  index = lambda pol, s: [formats.index(pair[s]) for pair in pol]
  kl_of = lambda pol: kl(index(pol, 0), index(pol, 1))
  current, best = list(choice), kl_of(choice)
  history = [best]
  for r in range(rounds):
    deltas = {side: {f: [math.inf] * len(current) for f in formats} for side in sides}
    for l, pair in enumerate(current):
      for s, side in enumerate(sides):
        deltas[side][pair[s]][l] = 0.0
        line = frontier(errors, bits, side, l)
        if pair[s] not in line:
          line = sorted(set(line) | {pair[s]}, key=lambda f: bits[f])
        at = line.index(pair[s])
        for f in line[max(at - 1, 0):at] + line[at + 1:at + 2]:
          trial = [list(p) for p in current]
          trial[l][s] = f
          deltas[side][f][l] = kl_of([tuple(p) for p in trial]) - best
    proposal = choose(deltas, bits, budget)
    measured = kl_of(proposal)
    history.append(measured)
    moved = sum(a != b for a, b in zip(sum(proposal, ()), sum(current, ())))
    log(f"  refine round {r + 1}: {moved} layer-sides moved, measured KL {best:.4g} -> "
        f"{measured:.4g}" + ("" if measured < best else " (not kept)"))
    if not measured < best:
      break
    current, best = proposal, measured
  return current, best, history


def choose(errors, bits, budget, quantum=1 / 256):
  """Per layer `(key format, value format)` minimizing the summed errors
  (`errors[side][format][layer]`, e.g. predicted KL) with average bits per
  value (over layers and sides) at most `budget`: exact, by dynamic
  programming over the layer-sides with bit costs rounded up to `quantum`
  (a multiple-choice knapsack)."""
  sides = ("keys", "values")
  layers = len(next(iter(errors["keys"].values())))
  names = list(bits)
  items = [(s, l) for l in range(layers) for s in sides]
  cost = {f: int(math.ceil(bits[f] / quantum - 1e-9)) for f in names}
  capacity = int(math.floor(budget * len(items) / quantum + 1e-9))
  if min(cost.values()) * len(items) > capacity:
    raise ValueError(f"--bits: no assignment of {names} reaches {budget} bits per value "
                     f"(the cheapest is {min(bits.values()):.2f})")
  best = np.full(capacity + 1, np.inf)  # least error of the items so far at each total cost
  best[0] = 0.0
  picks = []
  for side, layer in items:
    new = np.full(capacity + 1, np.inf)
    pick = np.full(capacity + 1, -1)
    for k, f in enumerate(names):
      c = cost[f]
      if c > capacity:
        continue
      trial = best[:capacity + 1 - c] + errors[side][f][layer]
      better = trial < new[c:]
      new[c:] = np.where(better, trial, new[c:])
      pick[c:] = np.where(better, k, pick[c:])
    best = new
    picks.append(pick)
  total = int(np.argmin(best))
  chosen = {}
  for (side, layer), pick in zip(reversed(items), reversed(picks)):
    f = names[pick[total]]
    chosen[side, layer] = f
    total -= cost[f]
  return [tuple(chosen[s, l] for s in sides) for l in range(layers)]


def cache_kl(work_params, config, tokens, specs_by_name, chunk=128, start=0):
  """Next-token KL of each cache (name -> per-layer specs) against a float32
  cache, over the positions of `tokens` from `start` on (prefill in chunks)."""
  n = tokens.shape[0]
  padded = np.zeros(-(-n // chunk) * chunk, np.int32)
  padded[:n] = tokens

  def logits_of(specs):
    caches = llama.init_caches(config, specs)
    step = jax.jit(lambda p, c, t, m: llama.forward(p, config, c, t, m), donate_argnums=1)
    out = []
    for at in range(0, len(padded), chunk):
      logits, caches = step(work_params, caches, padded[at:at + chunk],
                            np.int32(min(chunk, n - at)))
      out.append(np.asarray(jax.nn.log_softmax(logits)))
    return np.concatenate(out)[:n]

  results = {}
  reference = None
  for name, specs in specs_by_name.items():
    logp = logits_of(specs)
    if reference is None:
      reference = logp
    results[name] = float(_divergence(reference[start:], logp[start:]))
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m kvjax calibrate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bits", type=float, required=True,
                 help="average store bits per value the policy may use (measured)")
  p.add_argument("--text", default=DEFAULT_TEXT, help="calibration text (default: "
                 "kvjax/data/calibration.txt, held out from the demo's text)")
  p.add_argument("--out", default="policy.json", help="policy file (default: %(default)s)")
  p.add_argument("--model", default="smollm2", choices=["smollm2", "random"])
  p.add_argument("--tokens", type=int, default=1024, help="calibration tokens")
  p.add_argument("--min-context", type=int, default=None,
                 help="measure errors and KL only at positions with at least this many "
                 "tokens before them, as a long-context decode reads (default: half of "
                 "--tokens)")
  p.add_argument("--sinks", type=int, default=4, help="tokens kept exact (the demo's sinks)")
  p.add_argument("--tail", type=int, default=32, help="the hot tail (the demo's)")
  p.add_argument("--migrate-batch", type=int, default=32, help="as the demo's")
  p.add_argument("--candidates", default=",".join(CANDIDATES))
  p.add_argument("--probe", default="turbo3",
                 help="format whose effect on KL, layer by layer, calibrates the "
                 "attention errors (default: %(default)s)")
  p.add_argument("--refine", type=int, default=2,
                 help="rounds of measured-KL refinement around the chosen policy "
                 "(each 4 forward passes per layer; default: %(default)s)")
  p.add_argument("--kl-chunk", type=int, default=1,
                 help="tokens per step of the final check through kvjax caches (default: "
                 "%(default)s, decoding token by token as the search's model does)")
  p.add_argument("--compare", default="q4,turbo4,turbo3.5",
                 help="uniform formats whose KL is measured beside the policy's")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
  unknown = [c for c in candidates if c not in _formats.FORMATS]
  if unknown:
    p.error(f"--candidates: unknown {unknown}")
  started = time.perf_counter()
  if args.model == "random":
    from kvjax import demo
    work = demo.random_workload(argparse.Namespace(prompt_len=args.tokens, batch=1,
                                                   new_tokens=1))
    config, params = work.config, work.params
    tokens = work.prompts[0][:args.tokens]
    model_name = work.name
  else:
    from kvjax.models import smollm2
    config, params, tokenizer = smollm2.load()
    with open(args.text, encoding="utf-8", errors="replace") as f:
      tokens = np.asarray(tokenizer.encode(f.read()), np.int32)[:args.tokens]
    model_name = "SmolLM2-135M-Instruct"
  params = jax.device_put(params)
  print(f"kvjax calibrate: {model_name}, {len(tokens)} tokens of {args.text}", flush=True)
  q, k, v = jax.jit(lambda p, t: llama.attention_inputs_per_layer(p, config, t))(params, tokens)
  bits = {f: bits_per_value(f, config.head_dim) for f in candidates}
  exact = exact_keys(len(tokens), args.sinks, args.tail, args.migrate_batch)
  start = len(tokens) // 2 if args.min_context is None else args.min_context
  if not 0 <= start < len(tokens):
    p.error(f"--min-context: expected 0 <= N < {len(tokens)} (the calibration tokens), "
            f"got {start}")
  errors = attention_errors(q, k, v, candidates, args.sinks, exact, start)
  probe = args.probe
  if probe not in candidates:
    p.error(f"--probe: {probe!r} is not one of --candidates")
  compare = [c.strip() for c in args.compare.split(",") if c.strip()]
  unknown = [c for c in compare if c not in _formats.FORMATS]
  if unknown:
    p.error(f"--compare: unknown {unknown}")
  modelled = candidates + [c for c in compare if c not in candidates]
  measured_kl = policy_kl(params, config, tokens, modelled, args.sinks, exact, start)
  weight = kl_sensitivity(measured_kl, config.n_layers, candidates.index(probe), probe, errors)
  predicted = {side: {f: [w * e for w, e in zip(weight[side], errors[side][f])]
                      for f in candidates} for side in errors}
  choice = choose(predicted, bits, args.bits)
  choice, policy_model_kl, refine_history = refine(measured_kl, choice, candidates, errors,
                                                   bits, args.bits, args.refine)
  model_kl = {"policy": policy_model_kl}
  for name in compare:
    uniform = [modelled.index(name)] * config.n_layers
    model_kl[name] = measured_kl(uniform, uniform)
  achieved = float(np.mean([bits[f] for pair in choice for f in pair]))
  print("\nattention-output error per layer (keys | values), chosen formats marked *:")
  print("(KL per unit error, keys | values: " + ", ".join(
      f"{a:.2g}|{b:.2g}" for a, b in zip(weight["keys"], weight["values"])) + ")")
  head = "layer | " + " | ".join(f"{c} ({bits[c]:.1f}b)" for c in candidates)
  print(head)
  for l, (fk, fv) in enumerate(choice):
    cells = [f"{errors['keys'][c][l]:.1e}{'*' if c == fk else ' '}|"
             f"{errors['values'][c][l]:.1e}{'*' if c == fv else ' '}" for c in candidates]
    print(f"{l:5d} | " + " | ".join(cells))
  spec_kwargs = dict(capacity=-(-len(tokens) // 128) * 128 + 128, tail=args.tail,
                     migrate_batch=args.migrate_batch,
                     sinks=args.sinks, hot_dtype="bfloat16")
  policy = {"version": POLICY_VERSION, "model": model_name, "text": args.text,
            "tokens": int(len(tokens)), "budget_bits_per_value": args.bits,
            "bits_per_value": achieved,
            "layers": [{"keys": fk, "values": fv} for fk, fv in choice],
            "candidate_bits_per_value": bits,
            "attention_error": errors, "kl_per_attention_error": weight,
            "probe": probe, "tail": args.tail, "migrate_batch": args.migrate_batch,
            "sinks": args.sinks, "min_context": start, "refine_kl": refine_history}
  caches = {"f32": [llama.cache_spec(config, store="f32", **{**spec_kwargs,
                                                             "hot_dtype": "float32"})]
            * config.n_layers,
            "policy": policy_specs(policy, config, **spec_kwargs)}
  for name in compare:
    caches[name] = [llama.cache_spec(config, store=name, **spec_kwargs)] * config.n_layers
  kl = cache_kl(params, config, tokens, caches, chunk=args.kl_chunk, start=start)
  policy["calibration_kl"] = {name: kl[name] for name in caches if name != "f32"}
  policy["calibration_model_kl"] = model_kl
  policy["calibration_kl_chunk"] = args.kl_chunk
  with open(args.out, "w") as f:
    json.dump(policy, f, indent=1)
  print(f"\npolicy: {achieved:.3f} bits per value (budget {args.bits}); next-token KL "
        "against float32 on the calibration text, through kvjax caches (prefill in "
        f"chunks of {args.kl_chunk}) | the decoding model the search used:")
  for name, value in policy["calibration_kl"].items():
    measured = achieved if name == "policy" else bits_per_value(name, config.head_dim)
    print(f"  {name:>9}: {value:.3e} | {model_kl[name]:.3e}  ({measured:.2f} bits)")
  print(f"wrote {args.out} ({time.perf_counter() - started:.0f}s)")
  return 0
