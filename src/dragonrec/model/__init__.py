"""The sequence model: token layout (`ItemTokenizer`) and the causal LM over product tokens (`SeqRecLM`).

See `dragonrec.model.lm` for the token layout (ids of specials, markers, actions and `<item_k>` tokens).
"""

from dragonrec.model.config import SeqRecConfig
from dragonrec.model.lm import (
    ACTION_OFFSET,
    ACTION_TOKENS,
    BOS_ID,
    EOS_ID,
    IGNORE,
    ITEM_OFFSET,
    MARKER_TOKENS,
    PAD_ID,
    RECOMMEND_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    USER_ID,
    ItemTokenizer,
    SeqRecLM,
    pad_batch,
)

__all__ = [
    "ACTION_OFFSET", "ACTION_TOKENS", "BOS_ID", "EOS_ID", "IGNORE", "ITEM_OFFSET", "MARKER_TOKENS", "PAD_ID",
    "RECOMMEND_ID", "SPECIAL_TOKENS", "UNK_ID", "USER_ID", "ItemTokenizer", "SeqRecConfig", "SeqRecLM", "pad_batch",
]
