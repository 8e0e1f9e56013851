"""Trains a tiny SeqRecLM with `train_sft` on the chain data, on CPU, one JSON report per rank in OUT_DIR.

Launched by tests/test_distributed.py as
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_sft_script.py OUT_DIR
(`Accelerator(cpu=True)` inside: `accelerate launch --cpu` would silently run one process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from conftest import chain_events, chain_items  # the script's own directory (tests/) is on sys.path

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.model.config import SeqRecConfig
from dragonrec.model.lm import ItemTokenizer, SeqRecLM
from dragonrec.model.trainer import SFTConfig, train_sft
from dragonrec.recommenders.sequential import user_sequences


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)  # the same state train_sft's Accelerator(cpu=True) will share
    data = out / f"data-rank{acc.process_index}"
    data.mkdir(parents=True, exist_ok=True)
    chain_items().to_parquet(data / "items.parquet")
    chain_events().to_parquet(data / "interactions.parquet")
    ds = load_dataset(data)
    split = leave_one_out(ds.events)
    tok = ItemTokenizer.from_train(split.train["item_idx"].to_numpy(), len(ds.catalog))
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
    model = SeqRecLM(SeqRecConfig(hidden_size=32, num_layers=1, num_heads=1, emb_dropout=0.0, hidden_dropout=0.0,
                                  max_len=10), tok.n_items)
    cfg = SFTConfig(cpu=True, lr=5e-3, batch_size=16, max_epochs=20, eval_every=5, patience=100, warmup_steps=5,
                    progress=False, max_minutes=None)
    res = train_sft(model, tok, user_sequences(split.train), valid=split.valid, cfg=cfg)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    report = {"rank": acc.process_index, "num_processes": acc.num_processes,
              "backend": str(getattr(acc.state, "backend", "")), "device": str(acc.device),
              "best_ndcg": res.best_ndcg, "losses": [h["loss"] for h in res.history],
              "param_sum": float(params.sum()), "param_abs_sum": float(params.abs().sum())}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
