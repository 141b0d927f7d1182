"""docs/attention.svg and the table of docs/attention.md from a run of
benchmarks/bench_attend.py (benchmarks/results/attend.json).

    python benchmarks/bench_attend.py && python scripts/plot_attend.py

The plot: decode-attention time per call (log scale) against context length
(log scale) for the dense float32 baseline and each store format through the
kernel. The table (printed, for pasting into docs/attention.md): speedup over
dense float32 per format and context, and the kernel's bandwidth.
"""

import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLORS = ["#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SHOWN = ("dense_f32", "dense_bf16", "f32", "bf16", "q8", "q4", "turbo4", "turbo3.5", "turbo2.5")


def svg(results: dict, path: pathlib.Path) -> None:
  contexts = sorted(int(c) for c in results)
  series = [s for s in SHOWN if s in results[str(contexts[0])]["seconds"]]
  w, h, pad = 680, 420, 64
  xs = [math.log2(c) for c in contexts]
  times = [results[str(c)]["seconds"][s] * 1e3 for c in contexts for s in series]
  y0, y1 = math.floor(math.log10(min(times))), math.ceil(math.log10(max(times)))
  px = lambda x: pad + (x - xs[0]) / max(xs[-1] - xs[0], 1) * (w - 2 * pad - 90)
  py = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad - 90}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{(w - 90) / 2}" y="{h - 20}" text-anchor="middle">context (tokens)</text>',
           f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" '
           'text-anchor="middle">decode attend per call, ms (log scale)</text>']
  for c, x in zip(contexts, xs):
    parts.append(f'<text x="{px(x):.1f}" y="{h - pad + 15}" text-anchor="middle">'
                 f'{c // 1024}k</text>')
  for y in range(y0, y1 + 1):
    parts.append(f'<text x="{pad - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{10.0 ** y:g}</text>')
    parts.append(f'<line x1="{pad}" y1="{py(y):.1f}" x2="{w - pad - 90}" y2="{py(y):.1f}" '
                 'stroke="#dddddd"/>')
  for i, s in enumerate(series):
    color = COLORS[i % len(COLORS)]
    points = [(px(x), py(math.log10(results[str(c)]["seconds"][s] * 1e3)))
              for c, x in zip(contexts, xs)]
    dash = ' stroke-dasharray="5,3"' if s.startswith("dense") else ""
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="'
                 + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + '"/>')
    label = {"dense_f32": "dense f32 (jnp)", "dense_bf16": "dense bf16 (jnp)"}.get(s, s)
    parts.append(f'<text x="{points[-1][0] + 6:.1f}" y="{points[-1][1] + 4:.1f}" '
                 f'fill="{color}">{label}</text>')
  parts.append("</svg>")
  path.write_text("\n".join(parts) + "\n")


def table(payload: dict) -> str:
  results = payload["contexts"]
  contexts = sorted(int(c) for c in results)
  formats = list(results[str(contexts[0])]["kernel_gbps"])
  head = ["format"] + [f"{c // 1024}k" for c in contexts] + ["GB/s at 32k", "of numpy"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  jnp_rows = [s + "/jnp" for s in formats
              if all(s + "/jnp" in results[str(c)]["seconds"] for c in contexts)]
  for s in formats + jnp_rows + ["dense_bf16", "dot_product_attention"]:
    cells = [s.replace("/jnp", " (jnp path)")]
    for c in contexts:
      cells.append(f"{results[str(c)]['speedup_over_dense_f32'][s]:.2f}x")
    row32 = results.get("32768")
    if row32 and s in row32["kernel_gbps"]:
      cells += [f"{row32['kernel_gbps'][s]:.1f}", f"{100 * row32['kernel_bandwidth_over_numpy'][s]:.0f}%"]
    else:
      cells += ["", ""]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> int:
  path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "attend.json"
  payload = json.loads(path.read_text())
  svg(payload["contexts"], ROOT / "docs" / "attention.svg")
  print(table(payload))
  print("wrote docs/attention.svg")
  return 0


if __name__ == "__main__":
  sys.exit(main())
