"""Training jobs: one file per method (`sft.py`; DPO and PPO follow). The optimisation loop of the sequence
model lives below, in `dragonrec.model.trainer`, so that recommenders can fit without importing this package."""

from dragonrec.train.sft import run_sft

__all__ = ["run_sft"]
