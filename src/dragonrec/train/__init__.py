"""Training methods for the sequence model; one module per method (sft.py: supervised next-item)."""

from dragonrec.train.sft import SFTConfig, TrainResult, encode_sequences, train_sft

__all__ = ["SFTConfig", "TrainResult", "encode_sequences", "train_sft"]
