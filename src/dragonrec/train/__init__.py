"""Training jobs: one file per method (`sft.py`; preference fine-tuning: `dpo.py`, `sdpo.py`, `pg.py`, sharing
`preference_common.py`). The optimisation loop of the sequence model lives below, in `dragonrec.model.trainer`,
so that recommenders can fit without importing this package."""

from dragonrec.train.dpo import DPOConfig, dpo_loss, train_dpo
from dragonrec.train.pg import PGConfig, pg_loss, train_pg
from dragonrec.train.preference_common import (
           PreferenceTrainConfig,
           PreferenceTrainResult,
           contexts_from_records,
)
from dragonrec.train.sdpo import SDPOConfig, sdpo_loss, train_sdpo
from dragonrec.train.sft import run_sft

__all__ = ["DPOConfig", "PGConfig", "PreferenceTrainConfig", "PreferenceTrainResult", "SDPOConfig",
           "contexts_from_records", "dpo_loss", "pg_loss", "run_sft", "sdpo_loss", "train_dpo", "train_pg",
           "train_sdpo"]
