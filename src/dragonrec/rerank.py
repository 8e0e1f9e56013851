"""The re-rank stage: shop rules (bought, out-of-stock, hidden items and per-request filters), then diversity
(maximal marginal relevance over item text embeddings), category caps and calibration to the user's interests.

    cfg = PipelineConfig.union(rerank=RerankConfig(diversity=0.3, category_cap=3, calibration=0.5))
    pipe = Pipeline(cfg).fit(train, catalog)       # the pipeline uses a DiversityReranker
    pipe.recommend_for(history, actions, n=10, context={"diversity": 0.5,
                                                        "filters": {"categories": ["hair care"], "max_price": 30}})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dragonrec.data.catalog import Catalog
from dragonrec.schema import Action, positive_mask


class Filters(BaseModel):
    """Per-request business filters: only these categories or brands, a price range."""

    model_config = ConfigDict(extra="forbid")

    categories: list[str] = Field(default_factory=list)
    """Keep items whose category path contains one of these (case-insensitive)."""
    exclude_categories: list[str] = Field(default_factory=list)
    """Leave out items whose category path contains one of these (case-insensitive)."""
    brands: list[str] = Field(default_factory=list)
    """Keep items of these brands (case-insensitive)."""
    min_price: float | None = Field(None, ge=0)
    max_price: float | None = Field(None, ge=0)
    """With a price bound, items without a price are left out."""

    @model_validator(mode="after")
    def _check(self) -> Filters:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError(f"min_price {self.min_price} is above max_price {self.max_price}")
        return self


class RerankConfig(BaseModel):
    """How a scored list is finished: shop rules, then diversity, category caps and calibration."""

    diversity: float = Field(0.0, ge=0.0, le=1.0)
    """MMR lambda: 0 = pure relevance (the input order), 1 = only dissimilarity; a request may override it."""
    mode: Literal["mmr", "dpp"] = "mmr"
    """'mmr': maximal marginal relevance; 'dpp': greedy MAP of a determinantal point process (Chen et al. 2018)
    with quality exp(alpha * rel), alpha = (1 - diversity) / (2 * diversity). Calibration applies to MMR only."""
    relevance: Literal["minmax", "probability"] = "minmax"
    """How the list's scores become the relevance term. "minmax": min-max normalised within the list, the same
    scale for every request. "probability": the softmax of the scores over the list times its length (1 = a
    uniform guess), for scorers whose scores are logits or log-probabilities (the sequence models): a confident
    list (one item far above the rest) keeps its head, a flat one spreads, as the expected NDCG lost by a swap is
    a difference of probabilities. In "dpp" mode its log is the quality's exponent (quality = p ** alpha)."""
    novelty: float = Field(0.0, ge=0.0)
    """Weight (beside the similarity term, so scaled by the knob) of a penalty on the item's log popularity:
    demotes items every user gets, so more of the catalog is shown; 0 = off."""
    category_cap: int | None = Field(None, ge=1)
    """At most this many items per category in the re-ranked head (while the candidates allow it)."""
    calibration: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty pulling the list's category mix toward the history's (Steck 2018); 0 = off."""
    calibration_alpha: float = Field(0.01, gt=0.0, lt=1.0)
    """Smoothing of the list's category distribution, q~ = (1 - alpha) q + alpha p (Steck 2018, eq. 5)."""
    category_depth: int | None = Field(None, ge=1)
    """Levels of the category path that name a category ('A > B > C' at 2 is 'A > B'); None = the full path."""
    head: int = Field(20, ge=1)
    """List positions chosen greedily (at least the request's n); the candidates below keep their order."""
    exclude_bought: bool = True
    """Never recommend an item the user bought, unless its category is re-buyable."""
    rebuy_categories: list[str] = Field(default_factory=list)
    """Category substrings (case-insensitive) whose items may be bought again: consumables ('shampoo')."""
    hidden_items: list[str] = Field(default_factory=list)
    """Item ids never recommended (hidden, discontinued, out of stock); more via `DiversityReranker.hide`."""
    stock_attributes: bool = True
    """Read the catalog's `in_stock` (False), `stock` (<= 0) and `hidden` (True) columns where present."""
    cold_item_slots: int = Field(0, ge=0)
    """Slots of the list for cold items (no user has interacted with them: the fitted popularity is 0) among the
    candidates: the ones whose text is closest to the history's (positive events) take the last slots up to
    `cold_item_position` when the list has fewer cold items above that; 0 = off. What a behaviour-trained
    scorer cannot do for a product it never saw (docs/benchmarks.md, cold items)."""
    cold_item_position: int = Field(10, ge=1)
    """The last position (1-based) the cold-item slots end on (a request asking for fewer items: its last)."""
    cold_item_min_similarity: float = Field(0.0, ge=-1.0, le=1.0)
    """A cold item takes a slot only if its text's cosine with the history's mean text vector is at least this."""
    cold_item_rank: Literal["text", "score"] = "text"
    """Which cold candidates take the slots: "text", the closest in text to the history; "score", the best
    placed by the scorer (for the generative model: its text-trained cold head, which learned from behaviour
    which texts follow which; for a scorer that gives cold items no score, the retrieval order)."""
    cross_category_slots: int = Field(0, ge=0)
    """"Goes with" places: at least this many of the list's first `cross_category_position` items lie in another
    top-level category than the user's latest positive item (the monitor's keyboard, not a fifth monitor). The
    best-placed such candidates below that point (the scorer's order; with a `complements` source in the pipeline,
    its links are among them) move up to end on that position; 0 = off. Without a positive item of known category
    the list is unchanged."""
    cross_category_source: str | None = None
    """Fill the cross-category places first with what this candidate source proposed, in its own order ("complements":
    the mined "goes with" links of the user's recent items, the strongest link first), then in the list's order;
    None: the list's order only. Needs the pipeline's per-candidate sources (`RerankRequest.sources`)."""
    cross_category_position: int = Field(10, ge=1)
    """The last position (1-based) the cross-category places end on (a request asking for fewer items: its last)."""
    cross_category_level: int = Field(1, ge=1)
    """Category path levels compared, after the levels every categorised item shares (as the complements source
    cuts them: `candidates.complements.category_keys`)."""
    new_item_slots: int = Field(0, ge=0)
    """Places for products the scorer cannot rank at all: those at or after `DiversityReranker.n_scored` in the
    catalog (added after a model that scores only its own items was fitted; they sink below every scored
    candidate). Up to this many of them among the candidates, in the list's order (retrieval order, for them),
    move to positions `new_item_first`, `new_item_first + new_item_every`, ... (0-based). 0 = off; the service
    uses 2. The other kind of new product, one nobody has interacted with yet but the scorer can rank (the
    generative model's cold head), has `cold_item_slots`."""
    new_item_first: int = Field(2, ge=0)
    """0-based position of the first new-product place."""
    new_item_every: int = Field(4, ge=1)
    """Positions between two new-product places."""


@dataclass
class RerankRequest:
    """What the re-ranker knows of one request."""

    history: np.ndarray  # [h] catalog indices, oldest first (the cart and the page's item included)
    actions: np.ndarray | None = None  # [h] action values, or None (unknown)
    diversity: float | None = None  # None: the config's
    filters: Filters | None = None
    n: int | None = None  # the list length asked for (the greedy head is at least this long)
    # (source names, [m, S] 1-based rank of each candidate in each source's list, 0 = not proposed), aligned with the
    # candidates being re-ranked: set by the pipeline when the re-ranker reads sources (`Reranker.reads_sources`)
    sources: tuple[list[str], np.ndarray] | None = None


class Reranker:
    """The last stage: re-orders one request's scored list. This one only drops banned items (history, cart,
    the request's exclusions); `DiversityReranker` adds shop rules, diversity, caps and calibration."""

    def rerank(self, items: np.ndarray, scores: np.ndarray, banned: np.ndarray) -> np.ndarray:
        """Positions into `items` in the new order (dropped items left out). `items` [m] catalog indices, best
        first; `scores` [m] their scores; `banned` catalog indices that must not appear."""
        return np.flatnonzero(~np.isin(items, banned))

    def rerank_for(self, items: np.ndarray, scores: np.ndarray, banned: np.ndarray,
                   request: RerankRequest) -> np.ndarray:
        """`rerank` with what the request knows (this one ignores it)."""
        return self.rerank(items, scores, banned)

    reads_sources: bool = False
    """Whether `rerank_for` reads `RerankRequest.sources` (the pipeline fills them in only then)."""

    def excluded(self, request: RerankRequest) -> np.ndarray:
        """Catalog indices the request's shop rules leave out (banned everywhere: candidates, fill, cold list)."""
        if request.filters is not None or (request.diversity or 0.0) > 0:
            raise ValueError("per-request diversity and filters need a DiversityReranker: set PipelineConfig.rerank")
        return np.zeros(0, np.int64)


class DiversityReranker(Reranker):
    """Shop rules, then a greedy list: at each position the candidate j maximising

        (1 - lambda) * rel_j - lambda * max_{i chosen} cos(e_j, e_i) - calibration * KL(p || q~(chosen + j))

    (MMR, Carbonell & Goldstein 1998; calibrated recommendations, Steck 2018), among candidates whose category
    is under its cap. rel = the scores min-max normalised within the list (made non-increasing along the input
    order, so lambda 0 keeps it exactly); p = the category mix of the user's positive history events."""

    def __init__(self, cfg: RerankConfig | None = None, n_scored: int | None = None):
        self.cfg = cfg or RerankConfig()
        # catalog indices from here on are products the scorer cannot rank (None: it ranks every product): given
        # by whoever serves a model over a catalog grown since its fit (`serve.serving.build_pipeline`)
        self.n_scored = n_scored
        self.vectors: np.ndarray | None = None
        self.catalog: Catalog | None = None
        self.popularity: np.ndarray | None = None
        self.reads_sources = bool(self.cfg.cross_category_slots and self.cfg.cross_category_source)

    def fit(self, catalog: Catalog, vectors: np.ndarray | None = None,
            popularity: np.ndarray | None = None) -> DiversityReranker:
        """Read the catalog (categories, brands, prices, stock), the item text vectors [n_catalog, dim] and the
        items' popularity [n_catalog] (training users per item; the novelty term needs it)."""
        cfg, n = self.cfg, len(catalog)
        self.catalog = catalog
        if popularity is not None:
            pop = np.log1p(np.maximum(np.asarray(popularity, dtype=np.float64), 0.0))
            if len(pop) != n:
                raise ValueError(f"popularity of {len(pop)} items for a catalog of {n} items")
            self.popularity = pop / max(float(pop.max()), 1e-12)  # [0, 1]: log popularity over the most popular
        elif cfg.novelty > 0:
            raise ValueError("novelty > 0 needs the items' popularity: fit(catalog, vectors, popularity=...)")
        if vectors is not None:
            v = np.asarray(vectors, dtype=np.float32)
            if v.shape[0] != n:
                raise ValueError(f"{v.shape[0]} item vectors for a catalog of {n} items")
            self.vectors = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        paths = catalog.categories
        self.paths_lower = np.asarray([p.lower() for p in paths], dtype=object)
        keys = [category_key(p, cfg.category_depth) or f"#{i}" for i, p in enumerate(paths)]  # unknown: its own
        _, self.category_codes = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
        self.known_category = np.asarray([bool(p) for p in paths], dtype=bool)
        if cfg.cross_category_slots:
            from dragonrec.candidates.complements import category_keys

            self.top_category = category_keys(catalog, level=cfg.cross_category_level)
        items = catalog.items
        self.brands = (items["brand"].fillna("").astype(str).str.lower().to_numpy(dtype=object)
                       if "brand" in items else np.full(n, "", dtype=object))
        self.prices = (np.asarray(pd_numeric(items["price"]), dtype=np.float64) if "price" in items
                       else np.full(n, np.nan))
        rebuy = [c.lower() for c in cfg.rebuy_categories]
        self.rebuyable = np.fromiter((any(c in p for c in rebuy) for p in self.paths_lower), bool, n)
        hidden = np.zeros(n, dtype=bool)
        if cfg.stock_attributes:
            if "in_stock" in items:
                hidden |= items["in_stock"].map(lambda x: x is False or x == 0).to_numpy(dtype=bool)
            if "stock" in items:
                hidden |= np.nan_to_num(np.asarray(pd_numeric(items["stock"]), dtype=np.float64), nan=1.0) <= 0
            if "hidden" in items:
                hidden |= items["hidden"].map(lambda x: x is True or x == 1).to_numpy(dtype=bool)
        self.hidden = hidden
        self.hide(cfg.hidden_items)
        return self

    def hide(self, item_ids, hidden: bool = True) -> None:
        """Hide (out of stock, withdrawn) or show again items by id; unknown ids are ignored."""
        idx = [self.catalog.index_of(i) for i in item_ids if i in self.catalog]
        self.hidden[idx] = hidden

    # -- shop rules -----------------------------------------------------------------------------------------
    def excluded(self, request: RerankRequest) -> np.ndarray:
        """Hidden or out-of-stock items, items bought before (unless re-buyable) and the filters' leftovers."""
        out = self.hidden.copy()
        if self.cfg.exclude_bought and request.actions is not None and len(request.history):
            acts = np.asarray(request.actions, dtype=object)
            bought = np.asarray(request.history, dtype=np.int64)[acts == Action.PURCHASE.value]
            out[bought[~self.rebuyable[bought]]] = True
        f = request.filters
        if f is not None:
            n = len(out)
            if f.categories:
                wanted = [c.lower() for c in f.categories]
                out |= ~np.fromiter((any(w in p for w in wanted) for p in self.paths_lower), bool, n)
            if f.exclude_categories:
                unwanted = [c.lower() for c in f.exclude_categories]
                out |= np.fromiter((any(w in p for w in unwanted) for p in self.paths_lower), bool, n)
            if f.brands:
                out |= ~np.isin(self.brands, [b.lower() for b in f.brands])
            if f.min_price is not None:
                out |= ~(np.nan_to_num(self.prices, nan=-np.inf) >= f.min_price)
            if f.max_price is not None:
                out |= ~(np.nan_to_num(self.prices, nan=np.inf) <= f.max_price)
        return np.flatnonzero(out)

    # -- the greedy list ------------------------------------------------------------------------------------
    def rerank_for(self, items: np.ndarray, scores: np.ndarray, banned: np.ndarray,
                   request: RerankRequest) -> np.ndarray:
        keep = self.rerank(items, scores, banned)
        cfg = self.cfg
        lam = cfg.diversity if request.diversity is None else float(request.diversity)
        if len(keep) and (lam > 0 or cfg.category_cap is not None or cfg.calibration > 0):
            target = self.interest_mix(request.history, request.actions) if cfg.calibration > 0 else {}
            keep = keep[self.select(items[keep], scores[keep], lam, max(cfg.head, request.n or 0), target)]
        if cfg.cross_category_slots and len(keep):
            keep = keep[self.cross_category_order(items[keep], request, self._source_ranks(request, keep))]
        if cfg.cold_item_slots and len(keep):
            keep = keep[self.cold_item_order(items[keep], request)]
        if cfg.new_item_slots and self.n_scored is not None and len(keep):
            keep = keep[self.new_item_order(items[keep])]
        return keep

    def new_item_order(self, items: np.ndarray) -> np.ndarray:
        """Positions into `items` [m] (a finished list, best first) with up to `new_item_slots` products the scorer
        cannot rank (index >= `n_scored`), the first of them in the list, moved to positions `new_item_first`,
        `new_item_first + new_item_every`, ...; the others keep their order."""
        cfg = self.cfg
        identity = np.arange(len(items))
        new = np.flatnonzero(items >= self.n_scored)[:cfg.new_item_slots]
        if not len(new):
            return identity
        out = identity[~np.isin(identity, new)].tolist()
        for s, k in enumerate(new):
            out.insert(min(cfg.new_item_first + s * cfg.new_item_every, len(out)), int(k))
        return np.asarray(out, dtype=np.int64)

    def _source_ranks(self, request: RerankRequest, keep: np.ndarray) -> np.ndarray | None:
        """[len(keep)] rank of each kept candidate in `cross_category_source`'s list (0 = not proposed); None when
        no source is preferred. A request without sources (or from a pipeline without that source): all 0."""
        name = self.cfg.cross_category_source
        if not name:
            return None
        if request.sources is None or name not in request.sources[0]:
            return np.zeros(len(keep), dtype=np.int64)
        names, ranks = request.sources
        return np.asarray(ranks)[keep, names.index(name)]

    def cross_category_order(self, items: np.ndarray, request: RerankRequest,
                             source_ranks: np.ndarray | None = None) -> np.ndarray:
        """Positions into `items` [m] (a finished list, best first) with up to `cross_category_slots` items of
        another top-level category than the latest positive history item's moved up to end on
        `cross_category_position`: the first such items below that point, those the preferred source proposed
        first in its order (`source_ranks` [m], 0 = not proposed), then in list order; the others keep their
        order. Such items already above that point count against the places. Unchanged without a positive history
        item of known category."""
        cfg, m = self.cfg, len(items)
        identity = np.arange(m)
        h = np.asarray(request.history, dtype=np.int64)
        if request.actions is not None and len(h):
            h = h[positive_mask(np.asarray(request.actions, dtype=object))]
        h = h[self.top_category[h] != ""] if len(h) else h
        if not len(h):
            return identity
        anchor = self.top_category[h[-1]]
        end = min(cfg.cross_category_position, request.n or cfg.cross_category_position, m)
        cats = self.top_category[items]
        is_cross = (cats != anchor) & (cats != "")
        need = min(cfg.cross_category_slots, end) - int(is_cross[:end].sum())
        if need <= 0:
            return identity
        pool = np.flatnonzero(is_cross[end:]) + end
        if source_ranks is not None and len(pool):  # the source's proposals first, in its order; then the list's
            r = np.asarray(source_ranks, dtype=np.int64)[pool]
            pool = pool[np.lexsort((pool, np.where(r > 0, r, np.iinfo(np.int64).max)))]
        chosen = np.sort(pool[:need])
        if not len(chosen):
            return identity
        rest = identity[~np.isin(identity, chosen)]
        cut = end - len(chosen)
        return np.concatenate([rest[:cut], chosen, rest[cut:]])

    def cold_item_order(self, items: np.ndarray, request: RerankRequest) -> np.ndarray:
        """Positions into `items` [m] (a finished list, best first) with up to `cold_item_slots` cold items moved
        up to end on `cold_item_position`: the cold items below that point whose text is closest to the
        history's (`cold_item_rank="text"`) or the first of them in the list (`"score"`), in that order; the
        other items keep their order. Unchanged without a history or vectors."""
        cfg, m = self.cfg, len(items)
        identity = np.arange(m)
        if self.popularity is None or self.vectors is None or not len(request.history):
            return identity
        end = min(cfg.cold_item_position, request.n or cfg.cold_item_position, m)
        is_cold = self.popularity[items] <= 0
        need = min(cfg.cold_item_slots, end) - int(is_cold[:end].sum())
        h = np.asarray(request.history, dtype=np.int64)
        if request.actions is not None:
            h = h[positive_mask(np.asarray(request.actions, dtype=object))]
        if need <= 0 or not len(h):
            return identity
        pool = np.flatnonzero(is_cold)
        pool = pool[pool >= end]  # cold items already in the list count against the slots and keep their place
        if not len(pool):
            return identity
        query = self.vectors[h].mean(axis=0)
        query /= max(float(np.linalg.norm(query)), 1e-12)
        sim = self.vectors[items[pool]] @ query
        best = np.argsort(-sim, kind="stable")[:need] if cfg.cold_item_rank == "text" else np.arange(len(pool))[:need]
        chosen = pool[best[sim[best] >= cfg.cold_item_min_similarity]]
        if not len(chosen):
            return identity
        rest = identity[~np.isin(identity, chosen)]
        cut = end - len(chosen)
        return np.concatenate([rest[:cut], chosen, rest[cut:]])

    def interest_mix(self, history: np.ndarray, actions: np.ndarray | None) -> dict[int, float]:
        """p(c | u): category code -> share of the user's positive history events (known categories only)."""
        h = np.asarray(history, dtype=np.int64)
        if actions is not None and len(h):
            h = h[positive_mask(np.asarray(actions, dtype=object))]
        h = h[self.known_category[h]]
        if not len(h):
            return {}
        codes, counts = np.unique(self.category_codes[h], return_counts=True)
        return {int(c): float(k) / len(h) for c, k in zip(codes, counts)}

    def select(self, items: np.ndarray, scores: np.ndarray, lam: float, head: int,
               target: dict[int, float]) -> np.ndarray:
        """Positions into `items` [m] (best first): a greedy head of up to `head` picks, then the rest in order."""
        cfg, m = self.cfg, len(items)
        if cfg.relevance == "minmax":
            rel = _relevance(scores)
        else:  # DPP: the log, so that its quality exp(alpha * rel) is p ** alpha (and novelty divides it)
            rel = _probability_ratio(scores, log=lam > 0 and cfg.mode == "dpp")
        if lam > 0 and cfg.novelty > 0:
            # folded into relevance in its MMR weight: (1 - lam) rel' = (1 - lam) rel - lam * novelty * pop
            rel = rel - lam / max(1.0 - lam, 1e-6) * cfg.novelty * self.popularity[items]
        if lam > 0 and cfg.mode == "dpp":
            return self._dpp(items, rel, lam, head)
        cats = self.category_codes[items]
        capped = self.known_category[items]  # unknown categories are their own: never capped
        use_sim = lam > 0 and self.vectors is not None
        if lam > 0 and self.vectors is None:
            raise ValueError("diversity needs item vectors: fit the DiversityReranker with vectors")
        emb = self.vectors[items] if use_sim else None
        max_sim = np.zeros(m)
        # calibration: the history's categories as slots; candidates outside them share one KL value
        p_codes = np.asarray(list(target), dtype=np.int64)
        p = np.asarray([target[c] for c in p_codes], dtype=np.float64)
        slot = {int(c): s for s, c in enumerate(p_codes)}
        cand_slot = np.asarray([slot.get(int(c), -1) for c in cats], dtype=np.int64)
        in_p = np.zeros(len(p))  # chosen items per history category
        counts: dict[int, int] = {}
        left = np.ones(m, dtype=bool)
        chosen: list[int] = []
        for k in range(min(head, m)):
            gain = (1.0 - lam) * rel
            if use_sim and chosen:
                gain = gain - lam * max_sim
            if cfg.calibration > 0 and len(p):
                gain = gain - cfg.calibration * _kl_if_added(p, in_p, k, cfg.calibration_alpha)[cand_slot]
            ok = left.copy()
            if cfg.category_cap is not None:
                full = np.asarray([counts.get(int(c), 0) >= cfg.category_cap for c in cats], dtype=bool)
                ok &= ~(full & capped)
            if not ok.any():
                break
            j = int(np.flatnonzero(ok)[np.argmax(gain[ok])])  # ties: the earlier (more relevant) item
            chosen.append(j)
            left[j] = False
            counts[int(cats[j])] = counts.get(int(cats[j]), 0) + 1
            if cand_slot[j] >= 0:
                in_p[cand_slot[j]] += 1
            if use_sim:
                max_sim = np.maximum(max_sim, emb @ emb[j])
        return np.concatenate([np.asarray(chosen, dtype=np.int64), np.flatnonzero(left)])

    def _dpp(self, items: np.ndarray, rel: np.ndarray, lam: float, head: int) -> np.ndarray:
        """Greedy MAP inference of a DPP with kernel L = diag(q) S diag(q), S the cosine similarities of the item
        vectors, q = exp(alpha * (rel - max rel)) (Chen, Zhang & Zhou 2018, Algorithm 1 and eq. 20's trade-off),
        with category caps. Positions into `items`, the greedy head first."""
        if self.vectors is None:
            raise ValueError("diversity needs item vectors: fit the DiversityReranker with vectors")
        cfg, m = self.cfg, len(items)
        alpha = (1.0 - lam) / (2.0 * lam)
        q = np.exp(alpha * (rel - rel.max()))
        emb = self.vectors[items].astype(np.float64)
        k = min(head, m)
        cis = np.zeros((k, m))
        d2 = q * q * np.einsum("ij,ij->i", emb, emb) + 1e-12
        cats, capped = self.category_codes[items], self.known_category[items]
        counts: dict[int, int] = {}
        left = np.ones(m, dtype=bool)
        chosen: list[int] = []
        for t in range(k):
            ok = left.copy()
            if cfg.category_cap is not None:
                ok &= ~(np.asarray([counts.get(int(c), 0) >= cfg.category_cap for c in cats]) & capped)
            if not ok.any():
                break
            j = int(np.flatnonzero(ok)[np.argmax(d2[ok])])  # ties: the earlier (more relevant) item
            if d2[j] <= 1e-10 and chosen:
                break  # the remaining items add no volume: relevance order below
            chosen.append(j)
            left[j] = False
            counts[int(cats[j])] = counts.get(int(cats[j]), 0) + 1
            if t == k - 1:
                break
            row = q[j] * q * (emb @ emb[j])  # L[j, :]
            e = (row - cis[:t, j] @ cis[:t]) / np.sqrt(d2[j])
            cis[t] = e
            d2 = np.maximum(d2 - e * e, 0.0)
        return np.concatenate([np.asarray(chosen, dtype=np.int64), np.flatnonzero(left)])


def category_key(path: str, depth: int | None) -> str:
    """The category an item counts under: its path cut to `depth` levels ('' stays unknown)."""
    if not path or depth is None:
        return path
    return " > ".join(p.strip() for p in path.split(">")[:depth])


def pd_numeric(col) -> np.ndarray:
    """A column as float64, NaN where it is not a number."""
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)


def _relevance(scores: np.ndarray) -> np.ndarray:
    """[m] in [0, 1]: scores made non-increasing along the list (a lower position is never more relevant),
    non-finite ones set to the lowest finite, then min-max normalised; a flat list is all ones."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        return np.ones(len(s))
    s = np.where(finite, s, s[finite].min())
    s = np.minimum.accumulate(s)
    lo, hi = s.min(), s.max()
    return np.ones(len(s)) if hi <= lo else (s - lo) / (hi - lo)


def _probability_ratio(scores: np.ndarray, log: bool = False) -> np.ndarray:
    """[m] > 0: the softmax of the scores times m, each item's probability relative to a uniform guess over the
    list (its log with `log`); as in `_relevance`, non-finite scores count as the lowest finite one and the
    scores are made non-increasing along the list first (so knob 0 keeps the order)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        return np.zeros(len(s)) if log else np.ones(len(s))
    s = np.minimum.accumulate(np.where(finite, s, s[finite].min()))
    z = s - s[0]
    log_ratio = np.log(len(s)) + z - np.log(np.exp(z).sum())
    return log_ratio if log else np.exp(log_ratio)


def _kl_if_added(p: np.ndarray, in_p: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """[len(p) + 1] KL(p || q~) of the list after adding one item of history category s (entry s), or of a
    category outside the history (the last entry). q = counts / (k + 1), q~ = (1 - alpha) q + alpha p."""
    q = in_p / (k + 1)
    base = (1 - alpha) * q + alpha * p
    outside = float(np.sum(p * np.log(p / base)))
    bump = (1 - alpha) / (k + 1)
    # adding to slot s changes only that term
    terms = p * np.log(p / base)
    added = p * np.log(p / (base + bump))
    return np.append(outside - terms + added, outside)


__all__ = ["DiversityReranker", "Filters", "RerankConfig", "RerankRequest", "Reranker", "category_key"]
