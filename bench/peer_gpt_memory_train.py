#!/usr/bin/env python
"""PyTorch peer for the NUWA train step *with* context: x-transformers with per-layer memories.

Runs in the peers' torch environment (shared/peers/setup_venvs.sh torch), not in ours:

  ~/.venvs/peers/bin/python bench/peer_gpt_memory_train.py --memory 1280 --batch 8

x_transformers.TransformerWrapper(Decoder) (d512, 8 layers, 8 heads, vocab 1024, 256 tokens,
AdamW) called with `mems`: for every attention layer a [B, memory, d] tensor of hidden states
(random, no gradient), which that layer normalises with its own pre-norm, projects with its own
key/value weights and places before the current tokens (x_transformers Attention packs `mem`
with the keys' and values' input) -- the work of our per-patch step's Nearby Context Pool
(`DecoderBlock(memory=...)`), Transformer-XL style. `--memory 0` is the plain GPT step of
shared/peers/bench_gpt_train.py --impl xtransformers.

Prints one JSON line in the fields of shared/peers/bench_gpt_train.py (tokens/s count the
batch x seq current tokens, not the memory; FLOPs from torch FlopCounterMode), which
bench/bench_nuwa_train.py --peers=xtmems parses.
"""
import argparse
import os
import sys


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--peers-dir", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
      "peers"), help="shared/peers (for benchutil.py)")
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--memory", type=int, default=1280, help="memory tokens per layer")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--no-flops", action="store_true")
  a = p.parse_args()
  sys.path.insert(0, a.peers_dir)
  import benchutil as bu  # pylint: disable=g-import-not-at-top
  torch = bu.setup_torch(a.threads)
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from x_transformers import Decoder, TransformerWrapper  # pylint: disable=g-import-not-at-top

  net = TransformerWrapper(num_tokens=a.vocab, max_seq_len=a.seq, attn_layers=Decoder(
      dim=a.dim, depth=a.depth, heads=a.heads, attn_dim_head=a.dim // a.heads))
  net.train()
  opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.01)
  idx = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
  mems = ([torch.randn(a.batch, a.memory, a.dim) for _ in range(a.depth)] if a.memory
          else None)

  def loss_fn():
    logits = net(idx[:, :-1], mems=mems)
    return F.cross_entropy(logits.transpose(1, 2), idx[:, 1:])

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss

  measured = None
  if not a.no_flops:
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    with FlopCounterMode(display=False) as fc:
      loss_fn().backward()
    opt.zero_grad(set_to_none=True)
    measured = fc.get_total_flops()
  st = bu.stats(bu.timeit(step, a.repeats, a.warmup))
  tokens = a.batch * a.seq
  bu.emit({"bench": "gpt_memory_train_step", "impl": "xtransformers_mems",
           "env": bu.env_info(a.threads),
           "config": {k: getattr(a, k) for k in ("dim", "depth", "heads", "vocab", "seq",
                                                 "memory", "batch")},
           "params": {"total": bu.count_params(net)},
           "flops_per_step": {"measured_fwd_bwd": measured, "analytic_total": None},
           "s_per_step": st,
           "tokens_per_s": {"median": tokens / st["median"], "min": tokens / st["max"],
                            "max": tokens / st["min"]},
           "final_loss": float(step().item())})


if __name__ == "__main__":
  main()
