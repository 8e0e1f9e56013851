"""The typed configuration of the sequence model (SASRec-style baseline and generative recommender)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SeqRecConfig(BaseModel):
    """Shape and regularisation of `SeqRecLM`. Defaults are the ID-only SASRec-style baseline on a laptop."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["llama", "qwen2"] = "llama"  # transformers backbone class (LlamaForCausalLM / Qwen2ForCausalLM)
    hidden_size: int = Field(64, ge=8)  # width of every token vector
    num_layers: int = Field(2, ge=1)  # decoder blocks
    num_heads: int = Field(1, ge=1)  # attention heads (hidden_size must divide by it)
    intermediate_size: int | None = None  # MLP width; None = hidden_size (SASRec uses a d x d FFN)
    max_len: int = Field(50, ge=2)  # tokens per sequence, [BOS] included; older history is cut
    emb_dropout: float = Field(0.3, ge=0.0, lt=1.0)  # dropout on input embeddings (Llama has none of its own)
    hidden_dropout: float = Field(0.3, ge=0.0, lt=1.0)  # dropout on each attention / MLP output (residual branch)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on attention probabilities
    rope_theta: float = 10000.0  # rotary position base
    narrative: bool = False  # interleave action tokens (<view> <item_a> <purchase> <item_b> ...)
    use_text: bool = False  # item vector = own vector + linear projection of the item's text embedding
    id_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # text mode: share of items whose own vector is dropped
    # at each training step (inputs and outputs), so the text path alone learns to rank: what cold items rely on
    # text mode: an output head from item text alone (its own projection, trained on detached hidden states so the
    # main path is unchanged) scores items without a trained vector (cold items: never interacted with, or added
    # after training) on the scale of the trained items' scores, through an offset calibrated on validation
    cold_head: bool = False
    cold_holdout: float = Field(0.05, ge=0.0, lt=0.5)  # share of trained items the cold head never trains on:
    # the stand-ins for cold items when its offset is calibrated on validation
    cold_positions: int = Field(128, ge=1)  # targets per batch the cold head trains on (a random subset: its
    # logits over every item are 7x wider than the main path's, and its few weights need few examples)
    text_dim: int = Field(384, ge=1)  # width of the item text embeddings (all-MiniLM-L6-v2: 384)
    init_std: float = Field(0.02, gt=0.0)  # normal init of token vectors
