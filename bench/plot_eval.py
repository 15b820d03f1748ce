"""Plots the held-out bits per token of an evaluation (nuwa_jax.eval's metrics.jsonl).

  python bench/plot_eval.py demo/nuwa/eval/metrics.jsonl --out=bench/results/eval_nll.png

Left: bits per token by the patch's place in the order (the first order), with the mean over
all patches with the pool emptied; right: bits per token by order and dataset.
"""

import argparse
import collections
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("metrics")
  p.add_argument("--out", required=True)
  p.add_argument("--eval", default="nll", help="evaluator name")
  a = p.parse_args()
  rows = [json.loads(line) for line in open(a.metrics) if line.strip()]
  rows = [r for r in rows if r["eval"] == a.eval]
  if not rows:
    raise SystemExit(f"{a.metrics}: no rows of evaluator {a.eval!r}")
  row = rows[-1]
  v = {k.split("/", 1)[1]: x for k, x in row["values"].items()}
  patches = sorted((int(k.split("_")[1]), x) for k, x in v.items() if k.startswith("bits/patch_"))
  orders = collections.defaultdict(dict)
  for k, x in v.items():
    parts = k.split("/")
    if len(parts) == 3 and parts[0] == "bits" and not parts[1].startswith(("grid", "patch")):
      orders[parts[1]][parts[2]] = x
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
  ax1.plot([i for i, _ in patches], [x for _, x in patches], "o-", label="with the pool")
  if "bits_empty_pool" in v:
    ax1.axhline(v["bits_empty_pool"], color="grey", ls="--",
                label=f"pool emptied (mean) {v['bits_empty_pool']:.2f}")
  ax1.set_xlabel("patch index in the order")
  ax1.set_ylabel("held-out bits per token")
  ax1.legend()
  ax1.set_title(f"step {row['step']}: bits by patch")
  names = sorted({d for o in orders.values() for d in o})
  width = 0.8 / max(len(names), 1)
  for j, name in enumerate(names):
    xs = [i + j * width for i in range(len(orders))]
    ax2.bar(xs, [orders[o].get(name, 0) for o in orders], width, label=name)
  ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(orders))], list(orders))
  lo = min(x for o in orders.values() for x in o.values())
  ax2.set_ylim(lo - 0.5, None)
  ax2.set_title("bits by order and dataset")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(a.out, dpi=100)
  print(a.out)


if __name__ == "__main__":
  main()
