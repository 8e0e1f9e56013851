"""Complementary products: a monitor goes with a keyboard and a cable, not with the bestseller everyone buys."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset

from dragonrec.candidates import ComplementsConfig, ComplementsSource, category_keys
from dragonrec.data.catalog import Catalog

HOUR = 3600.0
ITEMS = {  # item -> category
    "monitor": "Shop > Computers > Monitors",
    "monitor2": "Shop > Computers > Monitors",
    "keyboard": "Shop > Accessories > Keyboards",
    "cable": "Shop > Cables > HDMI",
    "bestseller": "Shop > Snacks > Chocolate",
    "lamp": "Shop > Home > Lamps",
    "vase": "Shop > Home > Vases",
}
CATALOG = Catalog(pd.DataFrame({"item_id": list(ITEMS), "title": list(ITEMS), "category": list(ITEMS.values())}))
IDX = {i: k for k, i in enumerate(ITEMS)}


def log(baskets: list[tuple[list[str], list[float]]], action: str = "purchase") -> pd.DataFrame:
    """One user per basket: (items, hours since the user's first event)."""
    rows = []
    for u, (items, hours) in enumerate(baskets):
        for item, h in zip(items, hours):
            rows.append({"user_id": f"u{u:03d}", "item_id": item, "action": action, "timestamp": 1e9 + h * HOUR,
                         "session_id": None, "item_idx": IDX[item]})
    return pd.DataFrame(rows)


def shop() -> pd.DataFrame:
    """20 users buy a monitor with a keyboard and a cable (and the bestseller); 60 more buy only the
    bestseller, 10 of them with a lamp. Another monitor is bought with the first by 8 users."""
    baskets = [(["monitor", "keyboard", "cable", "bestseller"], [0, 1, 2, 3]) for _ in range(20)]
    baskets += [(["bestseller"], [0]) for _ in range(50)]
    baskets += [(["bestseller", "lamp"], [0, 1]) for _ in range(10)]
    baskets += [(["monitor", "monitor2"], [0, 1]) for _ in range(8)]
    return log(baskets)


def names(items) -> list[str]:
    return [list(ITEMS)[i] for i in items]


def test_monitor_goes_with_keyboard_and_cable_not_the_bestseller():
    src = ComplementsSource(ComplementsConfig(min_support=3)).fit(shop(), CATALOG)
    items, scores = src.goes_with(IDX["monitor"], n=5)
    assert set(names(items)) == {"keyboard", "cable"}
    assert np.all(np.diff(scores) <= 0)
    assert src.explain(IDX["monitor"], IDX["bestseller"])["lift"] < 1.5  # everyone buys it: no lift
    # ranking by confidence alone (a baseline) lets the bestseller in
    conf = ComplementsSource(ComplementsConfig(min_support=3, measure="confidence", min_lift=0.0)).fit(shop(), CATALOG)
    assert "bestseller" in names(conf.goes_with(IDX["monitor"], n=5)[0])


def test_same_category_pairs_are_excluded_when_cross_category_is_on():
    on = ComplementsSource(ComplementsConfig(min_support=3)).fit(shop(), CATALOG)
    assert "monitor2" not in names(on.goes_with(IDX["monitor"], n=10)[0])
    off = ComplementsSource(ComplementsConfig(min_support=3, cross_category=False)).fit(shop(), CATALOG)
    assert "monitor2" in names(off.goes_with(IDX["monitor"], n=10)[0])
    # lamp and vase are both Home (top level after the shared root "Shop"); the full path tells them apart
    assert list(category_keys(CATALOG, level=1))[-2:] == ["Home", "Home"]
    assert category_keys(CATALOG, level=None)[IDX["lamp"]] == "Home > Lamps"
    home = log([(["lamp", "vase"], [0, 1]) for _ in range(5)] + [(["bestseller"], [0]) for _ in range(20)])
    top = ComplementsSource(ComplementsConfig()).fit(home, CATALOG)
    full = ComplementsSource(ComplementsConfig(category_level=None)).fit(home, CATALOG)
    assert names(top.goes_with(IDX["lamp"])[0]) == [] and names(full.goes_with(IDX["lamp"])[0]) == ["vase"]


def test_min_support_filters_rare_pairs():
    events = log([(["monitor", "keyboard"], [0, 1]) for _ in range(3)]
                 + [(["monitor", "cable"], [0, 1])] + [(["bestseller"], [0]) for _ in range(30)])
    assert names(ComplementsSource(ComplementsConfig(min_support=1)).fit(events, CATALOG)
                 .goes_with(IDX["monitor"])[0]) == ["keyboard", "cable"]
    src = ComplementsSource(ComplementsConfig(min_support=2)).fit(events, CATALOG)
    assert names(src.goes_with(IDX["monitor"])[0]) == ["keyboard"]
    assert src.explain(IDX["monitor"], IDX["keyboard"])["support"] == 3
    assert names(ComplementsSource(ComplementsConfig(min_support=4)).fit(events, CATALOG)
                 .goes_with(IDX["monitor"])[0]) == []


def test_the_window_is_respected_and_sessions_link_far_events():
    # the keyboard 10 hours after the monitor; the cable 100 hours after
    events = log([(["monitor", "keyboard", "cable"], [0, 10, 110]) for _ in range(5)]
                 + [(["bestseller"], [0]) for _ in range(30)])
    cfg = ComplementsConfig(window_hours=24, min_support=2)
    src = ComplementsSource(cfg).fit(events, CATALOG)
    assert names(src.goes_with(IDX["monitor"])[0]) == ["keyboard"]
    assert names(src.goes_with(IDX["cable"])[0]) == []  # 100 h after the keyboard: outside the window
    wide = ComplementsSource(cfg.model_copy(update={"window_hours": 200})).fit(events, CATALOG)
    assert set(names(wide.goes_with(IDX["monitor"])[0])) == {"keyboard", "cable"}
    # one session id across the whole visit links them however far apart
    events["session_id"] = events["user_id"]
    assert set(names(ComplementsSource(cfg).fit(events, CATALOG).goes_with(IDX["monitor"])[0])) == {"keyboard",
                                                                                                     "cable"}
    assert names(ComplementsSource(cfg.model_copy(update={"use_sessions": False})).fit(events, CATALOG)
                 .goes_with(IDX["monitor"])[0]) == ["keyboard"]


def test_views_are_not_mined_by_default_and_scores_weigh_recency_and_action():
    events = shop()
    viewed = events.assign(action="view")
    assert ComplementsSource().fit(viewed, CATALOG).links.nnz == 0  # browsing is not buying together
    cfg = ComplementsConfig(min_support=3)
    with_views = ComplementsSource(cfg.model_copy(update={"action_weights": {"view": 0.2}})).fit(viewed, CATALOG)
    assert set(names(with_views.goes_with(IDX["monitor"])[0])) == {"keyboard", "cable"}
    src = ComplementsSource(cfg).fit(events, CATALOG)
    # a viewer of the monitor is offered its complements, and nothing is proposed for an unlinked history
    s = src.scores([np.array([IDX["monitor"]]), np.array([IDX["vase"]])], [np.array(["view"]), np.array(["view"])])
    assert set(names(np.flatnonzero(np.isfinite(s[0])))) == {"keyboard", "cable"}
    assert not np.isfinite(s[1]).any()
    c = src.candidates([np.array([IDX["monitor"]])], [np.array(["view"])], k=3, exclude=[np.array([IDX["cable"]])])
    assert names(c.items[0][c.items[0] >= 0]) == ["keyboard"]
    # the lamp (latest, purchased) outweighs the monitor (older, viewed): the lamp's complement comes first
    lamp = log([(["lamp", "cable"], [0, 1]) for _ in range(20)] + [(["bestseller"], [0]) for _ in range(60)])
    both = ComplementsSource(cfg).fit(pd.concat([events, lamp.assign(user_id="l" + lamp["user_id"])]), CATALOG)
    hist, acts = np.array([IDX["monitor"], IDX["lamp"]]), np.array(["view", "purchase"])
    assert names(both.candidates([hist], [acts], k=1).items[0]) == ["cable"]
    # negative actions never query the links
    assert not np.isfinite(src.scores([np.array([IDX["monitor"]])], [np.array(["scroll_past"])])).any()


def test_save_load_and_catalog_changes(tmp_path):
    src = ComplementsSource(ComplementsConfig(min_support=3)).fit(shop(), CATALOG)
    src.save(tmp_path / "c")
    back = ComplementsSource.load(tmp_path / "c", CATALOG)
    assert back.cfg == src.cfg
    assert names(back.goes_with(IDX["monitor"])[0]) == names(src.goes_with(IDX["monitor"])[0])
    # a new catalog order with one item gone and one added: links follow the ids
    new_ids = ["new", "cable", "keyboard", "monitor", "lamp", "vase", "monitor2"]
    new = Catalog(pd.DataFrame({"item_id": new_ids, "category": [ITEMS.get(i, "Shop > New") for i in new_ids]}))
    assert back.follows_catalog
    back.update_catalog(new)
    items, _ = back.goes_with(new.index_of("monitor"))
    assert {new_ids[i] for i in items} == {"keyboard", "cable"}
    assert len(back.goes_with(0)[0]) == 0
    with pytest.raises(ValueError, match="another catalog"):
        ComplementsSource.load(tmp_path / "c", new)
    with pytest.raises(ValueError, match="positive actions only"):
        ComplementsSource(ComplementsConfig(action_weights={"scroll_past": 1.0}))


def test_rees46_slice_links_carts_and_purchases_across_categories():
    from dragonrec.data import load_dataset

    ds = load_dataset(shared_dataset("rees46-multicat-head"))
    src = ComplementsSource(ComplementsConfig(min_support=1, uncategorised_links=False)).fit(ds.events, ds.catalog)
    assert src.links.nnz > 0
    coo = src.links.tocoo()
    cats = src.categories
    assert np.all(cats[coo.row] != cats[coo.col]) and np.all(cats[coo.row] != "") and np.all(cats[coo.col] != "")
    # every link rests on a user who carted or bought both items in one session or within the window
    strong = ds.events[ds.events["action"].isin(["add_to_cart", "purchase"])]
    had = strong.groupby("user_id")["item_idx"].apply(set)
    for a, b in zip(coo.row[:20], coo.col[:20]):
        assert any(a in s and b in s for s in had), (a, b)
        assert src.explain(a, b)["support"] >= 1
    # the carts and purchases of the users behind the links query them
    users = [g for _, g in strong.groupby("user_id") if g["item_idx"].isin(coo.row).any()]
    s = src.scores([g["item_idx"].to_numpy() for g in users], [g["action"].to_numpy() for g in users])
    assert s.shape == (len(users), len(ds.catalog)) and np.isfinite(s).any(axis=1).all()


def test_the_pipeline_takes_complements_as_a_source(chain_dir):
    """Named in the pipeline's quotas, the source is built from its overrides and proposes with its reason."""
    from dragonrec.data import leave_one_out, load_dataset
    from dragonrec.pipeline import Pipeline, PipelineConfig

    ds = load_dataset(chain_dir)
    split = leave_one_out(ds.events)
    cfg = PipelineConfig(sources={"cooccurrence": 5, "complements": 5, "popularity": 2}, scorer="none",
                         rest=None, overrides={"complements": {"min_support": 1, "cross_category": False,
                                                               "window_hours": 24 * 365}})
    pipe = Pipeline(cfg).fit(split.train, ds.catalog)
    assert isinstance(pipe.sources["complements"], ComplementsSource)
    assert pipe.sources["complements"].cfg.min_support == 1
    rec = pipe.recommend_for(split.test.histories[0], split.test.actions[0], n=5)
    assert len(rec) == 5


def test_the_pipeline_tells_the_reranker_which_source_proposed_each_candidate():
    """A re-ranker that reads sources (cross-category places filled from complements first) gets, aligned with
    the candidates it re-ranks, each one's rank in each source's list: the monitor's buyer is proposed the
    keyboard and the cable by the complements source, the bestseller by popularity alone."""
    from dragonrec.pipeline import Pipeline, PipelineConfig
    from dragonrec.rerank import DiversityReranker, RerankConfig

    seen = []

    class Spy(DiversityReranker):
        def rerank_for(self, items, scores, banned, request):
            seen.append((items.copy(), request.sources))
            return super().rerank_for(items, scores, banned, request)

    rc = RerankConfig(cross_category_slots=1, cross_category_source="complements", exclude_bought=False)
    cfg = PipelineConfig(sources={"popularity": 6, "complements": 3}, scorer="none", rest=None, rerank=rc,
                         overrides={"complements": {"min_support": 3}})
    pipe = Pipeline(cfg).fit(shop(), CATALOG)
    pipe.reranker = Spy(rc).fit(CATALOG)
    assert pipe.reranker.reads_sources
    rec = pipe.recommend_for(np.array([IDX["monitor"]]), ["purchase"], n=4)
    items, (source_names, ranks) = seen[-1]
    assert source_names == ["popularity", "complements"] and ranks.shape == (len(items), 2)
    by_item = {list(ITEMS)[i]: tuple(r) for i, r in zip(items, ranks)}
    assert by_item["keyboard"][1] > 0 and by_item["cable"][1] > 0 and by_item["bestseller"] == (1, 0)
    assert {"keyboard", "cable"} <= set(by_item) and rec.items[0] in {"keyboard", "cable"}
    # a plain re-ranker never asks: the pipeline leaves the request's sources unset
    seen.clear()
    pipe.reranker = Spy(RerankConfig(exclude_bought=False)).fit(CATALOG)
    pipe.recommend_for(np.array([IDX["monitor"]]), ["purchase"], n=4)
    assert seen[-1][1] is None
