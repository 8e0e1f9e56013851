"""Co-occurrence scoring: the direct sum over the matrix's CSR rows is the sparse query-times-matrix product."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import beauty_first_users_events

from dragonrec.recommenders.cooccurrence import CooccurrenceConfig, CooccurrenceRecommender
from dragonrec.schema import positive_mask


def sparse_product_scores(model: CooccurrenceRecommender, histories, actions=None) -> np.ndarray:
    """The scores as a sparse [B, n] query (decay weights of the latest positive items) times the matrix."""
    cfg, n = model.cfg, len(model.catalog)
    q_rows, q_cols, q_vals = [], [], []
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)
        if actions is not None and actions[b] is not None:
            h = h[positive_mask(np.asarray(actions[b], dtype=object))]
        last = h[::-1][:cfg.last_n]
        q_rows.append(np.full(len(last), b))
        q_cols.append(last)
        q_vals.append(cfg.decay ** np.arange(len(last)))
    q = sp.csr_matrix((np.concatenate(q_vals), (np.concatenate(q_rows), np.concatenate(q_cols))),
                      shape=(len(histories), n), dtype=np.float32)
    return (q @ model.matrix_).toarray() + model.prior_[None, :]


@pytest.mark.parametrize("cfg", [CooccurrenceConfig(), CooccurrenceConfig(last_n=6, decay=0.7, alpha=0.3)])
def test_scores_are_the_sparse_product_on_real_histories(cfg):
    catalog, events = beauty_first_users_events(400)
    model = CooccurrenceRecommender(cfg).fit(events, catalog)
    by_user = events.groupby("user_id", sort=False)
    histories = [g["item_idx"].to_numpy() for _, g in by_user]
    # repeated items (counted once, weights summed), an empty history and a history of one item
    histories += [np.array([histories[0][0]] * 4 + [histories[1][0]]), np.zeros(0, np.int64), histories[2][:1]]
    got = model.score(histories)
    want = sparse_product_scores(model, histories)
    assert got.dtype == np.float32 and got.shape == (len(histories), len(catalog))
    if cfg.decay == 0.5:  # sums of powers of two: the same float32 numbers to the bit
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert np.array_equal(got[-2], model.prior_)  # nothing to query: the popularity prior alone


def test_scores_read_only_positive_actions():
    catalog, events = beauty_first_users_events(200)
    model = CooccurrenceRecommender().fit(events, catalog)
    h = events["item_idx"].to_numpy()[:5]
    acts = np.array(["view", "scroll_past", "purchase", "remove_from_cart", "add_to_cart"], dtype=object)
    got = model.score([h], [acts])
    np.testing.assert_array_equal(got, sparse_product_scores(model, [h], [acts]))
    np.testing.assert_array_equal(got, model.score([h[[0, 2, 4]]]))  # the negative events query nothing
