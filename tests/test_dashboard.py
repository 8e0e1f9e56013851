"""The dashboard's numbers and charts on a hand-made store and registry with obvious answers (the pages
themselves, in a browser, are in test_storefront.py)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from dragonrec.registry import Registry
from dragonrec.schema import Event, Impression
from dragonrec.serve import dashboard
from dragonrec.serve.settings import Settings
from dragonrec.store import Store

NOW = 1_800_000_000.0


def _weights(d):
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))


def _shop(tmp_path):
    """Six impressions: v0001 showed four an hour ago (one clicked and bought), v0002 two just now (both clicked,
    one of them twice; none bought); a registry of an sft base and two loop rounds fine-tuned from it."""
    store = Store.open(f"sqlite:///{tmp_path / 'fb.db'}")
    shown = [("r1", "v0001", NOW - 3600), ("r2", "v0001", NOW - 3600), ("r3", "v0001", NOW - 3500),
             ("r4", "v0001", NOW - 3500), ("r5", "v0002", NOW - 60), ("r6", "v0002", NOW - 30)]
    for rid, version, t in shown:
        store.add_impression(Impression(request_id=rid, user_id="u", item_ids=["a", "b"], model_version=version,
                                        timestamp=t))
    answers = [("r1", "a", "hover"), ("r1", "a", "click"), ("r1", "a", "purchase"), ("r2", "b", "scroll_past"),
               ("r5", "a", "click"), ("r5", "a", "click"), ("r6", "b", "click")]
    store.add_events([Event(user_id="u", item_id=i, action=a, request_id=r, timestamp=NOW - 10 + k)
                      for k, (r, i, a) in enumerate(answers)])
    reg = Registry(tmp_path / "registry")
    reg.register(_weights, method="sft", metrics={"valid_ndcg@10": 0.05})
    reg.register(_weights, method="dpo", parent="v0001",
                 metrics={"reward": 0.4, "heldout_ndcg@10": 0.061, "diversity": 0.7})
    reg.register(_weights, method="dpo", parent="v0002",
                 metrics={"reward": 0.55, "heldout_ndcg@10": 0.066, "diversity": 0.65}, activate=True)
    settings = Settings(registry_dir=tmp_path / "registry", state_dir=tmp_path / "state")
    catalog = {"a": {"item_id": "a", "title": "Rose <b>oil</b>"}, "b": {"item_id": "b", "title": "Clay mask"}}
    return SimpleNamespace(settings=settings, store=store, registry=reg, model_version="v0003", item=catalog.get)


def test_rates_by_version_and_over_time_count_impressions_answered(tmp_path):
    service = _shop(tmp_path)
    s = dashboard.stats(service, days=1, now=NOW)
    assert s["totals"] == {"impressions": 6, "clicked": 3, "purchased": 1, "ctr": 0.5, "purchase_rate": 1 / 6}
    assert [(v["model_version"], v["impressions"], v["ctr"], v["purchase_rate"]) for v in s["by_version"]] == \
        [("v0001", 4, 0.25, 0.25), ("v0002", 2, 1.0, 0.0)]
    points = s["over_time"]["points"]
    assert s["over_time"]["bucket_s"] == 300  # an hour of data: 5-minute points
    assert sum(p["impressions"] for p in points) == 6 and points[0]["model_version"] == "v0001"
    assert points[-1]["ctr"] == 1.0 and points[-1]["model_version"] == "v0002"
    assert [e["action"] for e in s["recent_events"]][:2] == ["click", "click"]  # latest first
    # the window leaves out what was shown before it
    assert dashboard.stats(service, days=0.01, now=NOW)["totals"]["impressions"] == 2
    service.store.close()


def test_rounds_lineage_and_charts_come_from_the_registry(tmp_path):
    service = _shop(tmp_path)
    s = dashboard.stats(service, days=1, now=NOW)
    assert [(r["version"], r["reward"], r["ndcg"], r["diversity"]) for r in s["rounds"]] == \
        [("v0002", 0.4, 0.061, 0.7), ("v0003", 0.55, 0.066, 0.65)]  # the sft base is no loop round
    assert s["lineage"]["active"] == "v0003"
    assert [v["version"] for v in s["lineage"]["chain"]] == ["v0003", "v0002", "v0001"]

    charts = dashboard.charts(s)
    bars = re.findall(r'class="bar" data-series="(\w+)" data-label="(\w+)" data-value="([\d.]+)"',
                      charts["by_version"])
    assert [(n, label, float(v)) for n, label, v in bars] == [
        ("ctr", "v0001", 0.25), ("purchase_rate", "v0001", 0.25), ("ctr", "v0002", 1.0),
        ("purchase_rate", "v0002", 0.0)]
    rewards = re.findall(r'class="point" data-series="reward" data-value="([\d.]+)"', charts["reward"])
    assert [float(v) for v in rewards] == [0.4, 0.55]
    assert charts["quality"].count('data-series="ndcg"') >= 2 and "<polyline" in charts["quality"]

    html = dashboard.page_html(service, s)
    for chart in ("chart-by-version", "chart-over-time", "chart-reward", "chart-quality"):
        assert f'id="{chart}"' in html
    assert 'id="no-rounds"' not in html and html.count('<li class="active" data-version="v0003">') == 1
    assert "Rose &lt;b&gt;oil&lt;/b&gt;" in html and "<b>oil" not in html  # item titles in recent events
    service.store.close()


def test_an_empty_shop_says_so_and_labels_are_escaped(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'fb.db'}")
    service = SimpleNamespace(settings=Settings(registry_dir=tmp_path / "none", state_dir=tmp_path / "state"),
                              store=store, model_version="popularity")
    s = dashboard.stats(service, now=NOW)
    assert s["totals"]["impressions"] == 0 and s["rounds"] == [] and s["lineage"]["chain"] == []
    assert "no data yet" in dashboard.charts(s)["by_version"]
    service.item = lambda item_id: None
    html = dashboard.page_html(service, s)
    assert 'id="no-rounds"' in html and 'id="no-lineage"' in html and "No events yet" in html
    closed = dashboard.env.get_template("admin/login.html").render(error="", configured=False, static_url=str)
    assert "no API key" in closed and "<form" not in closed
    svg = dashboard.bar_chart("<t>", ["<script>"], {"ctr": [0.5]}, {"ctr": "a&b"})
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a&amp;b" in svg
    store.close()
