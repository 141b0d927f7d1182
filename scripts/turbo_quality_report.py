"""Measures every store format's quality and writes docs/turbo_quality.md,
docs/turbo_quality.svg and benchmarks/results/turbo_quality.json.

    python scripts/turbo_quality_report.py            # everything (a few minutes)
    python scripts/turbo_quality_report.py --no-model # synthetic data only

For each format: measured store bits per value (from a cache's arrays), key
and value relative MSE, attention-output relative error and the KL divergence
of attention probabilities against exact attention, on Gaussian data, on keys
with strong outlier channels, and on SmolLM2-135M's real post-RoPE keys,
values and queries over a license text (with the whole history in the store,
and with 4 sinks + a 64-token hot tail as a cache serves it); then the
model's end-to-end next-token KL and perplexity with each store format.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORMATS = ("q8", "q4", "turbo4", "turbo3.5", "turbo3", "turbo2.5", "turbo2",
           "turbo1", "turbo4p", "turbo3p", "turbo2p", "turbo1p")
TEXT = "/usr/share/common-licenses/Apache-2.0"


def reconstruct(store, k, v):
  """k, v: [T, H, D] -> what a cache with `store` holds for them (all in the
  store; split formats choose their outlier channels as the cache does)."""
  t, h, d = k.shape
  spec = kvjax.CacheSpec(num_kv_heads=h, head_dim=d, capacity=t, tail=0,
                         migrate_batch=1, store=store, hot_dtype="float32")
  cache = jax.jit(kvjax.append)(kvjax.init(spec), k, v)
  km, vm, _, _ = kvjax.materialize(cache)
  return np.asarray(km), np.asarray(vm), kvjax.stats(cache)["store_bits_per_value"]


def attention_errors(q, k, v, k_hat, v_hat, hot=None):
  """Exact vs quantized attention, causal over T positions. q: [T, Hq, D],
  k, v: [T, H, D]. `hot[t, j]`: key j is read exactly by query t (sinks,
  tail). Returns (output relative error, mean KL of attention probabilities)."""
  t, hq, d = q.shape
  group = hq // k.shape[1]
  rep = lambda a: np.repeat(a, group, axis=1).astype(np.float64)
  q, k, v, k_hat, v_hat = (a.astype(np.float64) for a in (q, k, v, k_hat, v_hat))
  k, v, k_hat, v_hat = rep(k), rep(v), rep(k_hat), rep(v_hat)
  causal = np.tril(np.ones((t, t), bool))
  s = np.einsum("thd,jhd->htj", q, k) / math.sqrt(d)
  s_hat = np.einsum("thd,jhd->htj", q, k_hat) / math.sqrt(d)
  if hot is not None:
    s_hat = np.where(hot[None], s, s_hat)

  def softmax(x):
    x = np.where(causal[None], x, -np.inf)
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)

  p, p_hat = softmax(s), softmax(s_hat)
  out = np.einsum("htj,jhd->thd", p, v)
  if hot is None:
    out_hat = np.einsum("htj,jhd->thd", p_hat, v_hat)
  else:
    out_hat = (np.einsum("htj,jhd->thd", p_hat * hot[None], v)
               + np.einsum("htj,jhd->thd", p_hat * ~hot[None], v_hat))
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(p_hat, 1e-300))), 0).sum(-1)
  rel = np.linalg.norm(out_hat - out) / np.linalg.norm(out)
  return float(rel), float(kl.mean())


def rel_mse(a, b):
  return float(np.sum((a.astype(np.float64) - b) ** 2) / np.sum(b.astype(np.float64) ** 2))


def evaluate(name, q, k, v, hot=None):
  rows = []
  for store in FORMATS:
    k_hat, v_hat, bits = reconstruct(store, k, v)
    out_err, kl = attention_errors(q, k, v, k_hat, v_hat, hot)
    rows.append(dict(data=name, format=store, bits=bits, key_mse=rel_mse(k_hat, k),
                     value_mse=rel_mse(v_hat, v), out_err=out_err, attn_kl=kl))
    print(f"  {name:28s} {store:9s} bits {bits:5.3f} key {rows[-1]['key_mse']:.2e} "
          f"value {rows[-1]['value_mse']:.2e} out {out_err:.2e} kl {kl:.2e}", flush=True)
  return rows


def synthetic(t=512, h=2, hq=8, d=128):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(t, hq, d)).astype(np.float32)
  k = rng.normal(size=(t, h, d)).astype(np.float32)
  v = rng.normal(size=(t, h, d)).astype(np.float32)
  outlier = k.copy()
  channels = rng.choice(d, size=4, replace=False)
  outlier[..., channels] = outlier[..., channels] * 20 + 10
  rows = evaluate("gaussian d=128", q, k, v)
  rows += evaluate("outlier-channel keys d=128", q, outlier, v)
  # The outlier rule against the format's fixed split (first D/2 channels).
  fixed = np.asarray(kvjax.dequantize(kvjax.quantize(outlier, "turbo3.5"), "turbo3.5"))
  cache_hat = reconstruct("turbo3.5", outlier, v)[0]
  split = dict(fixed_split=rel_mse(fixed, outlier), first_token_split=rel_mse(cache_hat, outlier))
  return rows, split


def model_activations(tokens_n=512):
  """Post-RoPE q, k, v of every layer of SmolLM2 over a license text."""
  from kvjax.models import llama, smollm2
  config, params, tokenizer = smollm2.load()
  with open(TEXT) as f:
    ids = jnp.asarray(tokenizer.encode(f.read())[:tokens_n])
  pos = jnp.arange(len(ids), dtype=jnp.int32)

  @jax.jit
  def collect(params):
    def layer(x, p):
      q, k, v = llama._attention_inputs(config, p, x, pos)
      group = q.shape[1] // k.shape[1]
      kr, vr = jnp.repeat(k, group, 1), jnp.repeat(v, group, 1)
      s = jnp.einsum("qhd,khd->hqk", q, kr) / math.sqrt(q.shape[-1])
      causal = pos[None, :] <= pos[:, None]
      probs = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
      return llama._block_output(config, p, x, jnp.einsum("hqk,khd->qhd", probs, vr)), (q, k, v)
    x = params["embed"][ids].astype(jnp.float32)
    return jax.lax.scan(layer, x, params["layers"])[1]

  q, k, v = (np.asarray(a) for a in collect(params))
  return config, params, tokenizer, ids, q, k, v


def real(layers=(0, 5, 10, 15, 20, 25, 29)):
  config, params, tokenizer, ids, q, k, v = model_activations()
  t = q.shape[1]
  rows = []
  hot = np.zeros((t, t), bool)
  for i in range(t):
    hot[i, :4] = True  # sinks
    hot[i, max(0, i - 63):i + 1] = True  # the newest 64 tokens
  for name, mask in (("smollm2 all in store", None), ("smollm2 4 sinks + 64 tail", hot)):
    per_layer = [evaluate(f"{name} L{l}", q[l], k[l], v[l], mask) for l in layers]
    for j, store in enumerate(FORMATS):
      r = [pl[j] for pl in per_layer]
      rows.append(dict(data=name, format=store, bits=r[0]["bits"],
                       **{key: float(np.mean([x[key] for x in r]))
                          for key in ("key_mse", "value_mse", "out_err", "attn_kl")}))
  return rows, (config, params, ids)


def end_to_end(config, params, ids, chunk=64):
  """Next-token KL against a float32 cache, and perplexity, per format: the
  text is prefilled in chunks through caches with 4 sinks, a 32-token tail
  and migrate_batch 32, so most history is read from the store."""
  from kvjax.models import llama
  n = (len(ids) // chunk) * chunk
  ids = np.asarray(ids[:n])

  def run(store):
    spec = llama.cache_spec(config, capacity=n, tail=32, migrate_batch=32, sinks=4,
                            hot_dtype="float32" if store == "f32" else "bfloat16",
                            store=store)
    step = jax.jit(lambda p, c, t: llama.forward(p, config, c, t), donate_argnums=1)
    caches, out = llama.init_caches(config, spec), []
    for s in range(0, n, chunk):
      logits, caches = step(params, caches, jnp.asarray(ids[s:s + chunk]))
      out.append(np.asarray(jax.nn.log_softmax(logits, -1)))
    return np.concatenate(out)

  ref = run("f32")
  nll = lambda lp: float(-np.mean(lp[np.arange(n - 1), ids[1:]]))
  rows = [dict(format="f32", kl=0.0, ppl=math.exp(nll(ref)))]
  for store in FORMATS:
    lp = run(store)
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - lp), -1)))
    rows.append(dict(format=store, kl=kl, ppl=math.exp(nll(lp))))
    print(f"  end-to-end {store:9s} KL {kl:.2e} ppl {rows[-1]['ppl']:.3f}", flush=True)
  return rows


def svg_plot(rows, path):
  """Key relative MSE against measured bits per value, log scale. (The
  sinks + tail rows share the store's key error, so they are not drawn.)"""
  w, h, pad = 640, 400, 60
  rows = [r for r in rows if "tail" not in r["data"]]
  datasets = list(dict.fromkeys(r["data"] for r in rows))
  colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
  xs = [r["bits"] for r in rows]
  ys = [math.log10(max(r["key_mse"], 1e-9)) for r in rows]
  x0, x1 = 0, math.ceil(max(xs))
  y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
  px = lambda x: pad + (x - x0) / (x1 - x0) * (w - 2 * pad)
  py = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">measured bits per value</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" '
           'text-anchor="middle">key relative MSE (log10)</text>']
  for x in range(x0, x1 + 1):
    parts.append(f'<text x="{px(x)}" y="{h - pad + 15}" text-anchor="middle">{x}</text>')
  for y in range(y0, y1 + 1):
    parts.append(f'<text x="{pad - 8}" y="{py(y) + 4}" text-anchor="end">{y}</text>')
  for i, data in enumerate(datasets):
    color = colors[i % len(colors)]
    parts.append(f'<text x="{w - pad - 200}" y="{pad + 14 * i}" fill="{color}">{data}</text>')
    for r in rows:
      if r["data"] == data:
        x, y = px(r["bits"]), py(math.log10(max(r["key_mse"], 1e-9)))
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        if i == 0 or r["format"].startswith("q"):  # label once, and q4 / q8
          parts.append(f'<text x="{x + 4:.1f}" y="{y - 3:.1f}" fill="{color}" '
                       f'font-size="9">{r["format"]}</text>')
  parts.append("</svg>")
  path.write_text("\n".join(parts))


def markdown(rows, split, e2e, seconds):
  lines = ["# Store format quality", "",
           "Generated by `python scripts/turbo_quality_report.py` "
           f"({seconds:.0f} s on the project's 2-core x86-64 machine). Every number "
           "is measured from the arrays: bits per value from a cache's store "
           "leaves, errors against exact float64 attention.", "",
           "![key error against bits](turbo_quality.svg)", ""]
  for data in dict.fromkeys(r["data"] for r in rows):
    note = ([("Key and value errors are the store's, as above; attention reads "
              "the 4 first and the 64 newest keys of each query exactly, as a "
              "cache with sinks and a hot tail does."), ""]
            if "tail" in data else [])
    lines += [f"## {data}", "", *note,
              "| format | bits/value | key rel. MSE | value rel. MSE | attention out rel. err | attention KL |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
      if r["data"] == data:
        lines.append(f"| {r['format']} | {r['bits']:.3f} | {r['key_mse']:.2e} | "
                     f"{r['value_mse']:.2e} | {r['out_err']:.2e} | {r['attn_kl']:.2e} |")
    lines.append("")
  lines += ["## Choosing turbo3.5's outlier channels", "",
            "On the outlier-channel keys, relative key MSE of turbo3.5 with the "
            "format's fixed split (first D/2 channels at 4 bits) against the "
            "cache's rule (each head's D/2 largest-magnitude channels of its first "
            "non-sink token):", "",
            "| fixed split | first-token split |", "| --- | --- |",
            f"| {split['fixed_split']:.2e} | {split['first_token_split']:.2e} |", ""]
  if e2e:
    lines += ["## End to end: SmolLM2-135M on a license text", "",
              "Next-token KL divergence against a float32 cache and perplexity, the "
              "text prefilled in chunks of 64 through caches with 4 sinks, a "
              "32-token bfloat16 tail and migrate_batch 32.", "",
              "| format | next-token KL | perplexity |", "| --- | --- | --- |"]
    for r in e2e:
      lines.append(f"| {r['format']} | {r['kl']:.2e} | {r['ppl']:.3f} |")
    lines.append("")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--no-model", action="store_true", help="skip SmolLM2 (synthetic only)")
  p.add_argument("--replot", action="store_true",
                 help="rewrite the page and plot from the last run's JSON")
  args = p.parse_args()
  docs, results = ROOT / "docs", ROOT / "benchmarks" / "results"
  if args.replot:
    saved = json.loads((results / "turbo_quality.json").read_text())
    svg_plot(saved["rows"], docs / "turbo_quality.svg")
    (docs / "turbo_quality.md").write_text(markdown(
        saved["rows"], saved["split"], saved["end_to_end"], saved["seconds"]))
    return
  start = time.perf_counter()
  print("synthetic data ...", flush=True)
  rows, split = synthetic()
  e2e = []
  if not args.no_model:
    print("SmolLM2 activations ...", flush=True)
    real_rows, model = real()
    rows += real_rows
    print("end to end ...", flush=True)
    e2e = end_to_end(*model)
  seconds = time.perf_counter() - start
  svg_plot(rows, docs / "turbo_quality.svg")
  (docs / "turbo_quality.md").write_text(markdown(rows, split, e2e, seconds))
  results.mkdir(exist_ok=True)
  (results / "turbo_quality.json").write_text(json.dumps(
      dict(rows=rows, split=split, end_to_end=e2e, seconds=seconds), indent=1))
  print(f"wrote docs/turbo_quality.md, docs/turbo_quality.svg ({seconds:.0f} s)")


if __name__ == "__main__":
  main()
