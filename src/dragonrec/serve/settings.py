"""The service's one settings object: defaults < a settings file (TOML or JSON) < DRAGONREC_* environment < code.

    settings = Settings(data_dir="../shared/data/amazon-beauty")         # code (and flags) win
    DRAGONREC_API_KEY=key1,key2 DRAGONREC_PORT=9000 dragonrec serve ...   # environment
    DRAGONREC_SETTINGS_FILE=serve.toml dragonrec serve                    # a file: data_dir = "...", port = 9000

The object is built once (by `dragonrec serve` or `app_from_env`) and passed down; nothing reads it globally.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dragonrec.pipeline import DEFAULT_QUOTAS

SETTINGS_FILE_ENV = "DRAGONREC_SETTINGS_FILE"


class Settings(BaseSettings):
    """Everything the service needs to know; defaults run a laptop shop on 127.0.0.1 with SQLite."""

    # hide_input_in_errors: a bad setting must not print the API keys next to it
    model_config = SettingsConfigDict(env_prefix="DRAGONREC_", extra="forbid", validate_default=True,
                                      hide_input_in_errors=True)

    settings_file: Path | None = None
    """A TOML or JSON file with any of these fields (also named by DRAGONREC_SETTINGS_FILE)."""
    data_dir: Path | None = None
    """Dataset directory: the catalog (items.*) and past events (interactions.*) the shop starts from."""
    state_dir: Path = Path(".dragonrec")
    """Where the service keeps its own state: the default SQLite store, registry and catalog changes."""
    store_url: str | None = None
    """Feedback store URL (sqlite:///PATH or postgresql+psycopg://...); default: SQLite under state_dir."""
    store_pool_size: int = Field(10, ge=1)
    """PostgreSQL: connections each API process keeps, and the most it uses at once (a burst beyond them waits
    for one; `StoreConfig.max_overflow`). Processes x this must stay under the server's max_connections."""
    registry_dir: Path | None = None
    """Model registry root; default: state_dir/registry. Without an active version the popularity
    fallback (dense + co-occurrence + popularity, no model) serves."""
    host: str = "127.0.0.1"
    """Address `dragonrec serve` binds."""
    port: int = Field(8000, ge=0, le=65535)
    """Port `dragonrec serve` binds."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("api_keys", "DRAGONREC_API_KEY", "DRAGONREC_API_KEYS"))
    """Keys for write and admin routes (DRAGONREC_API_KEY=new,old: several so keys can rotate). None: those
    routes refuse every request."""
    recommend_requires_key: bool = False
    """Whether POST /v1/recommend needs a key too (the storefront's own /shop/recommend never does)."""
    storefront_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins (scheme://host:port) allowed to post to /shop/*; empty: only the server's own origin."""
    default_n: int = Field(10, ge=1)
    """List length when a request names none."""
    max_n: int = Field(100, ge=1)
    """Longest list a request may ask for."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted (413 above)."""
    max_events_per_batch: int = Field(1000, ge=1)
    """Most events one POST /v1/events may carry (413 above)."""
    diversity: float = Field(0.0, ge=0.0, le=1.0)
    """Default diversity knob of a list (MMR lambda over item text vectors, dragonrec.rerank): 0 = relevance order."""
    demotion_window_s: float = Field(1800.0, ge=0.0)
    """Seconds an item a user scrolled past (or removed from the cart) stays out of their lists."""
    new_item_slots: int = Field(2, ge=0)
    """Places in a list (positions 3 and 7, ...) for products added after the model was fitted when it cannot
    rank them (the generative model's cold head can: then none are needed), when retrieval proposes them for the
    request: exploration for new items (`RerankConfig.new_item_slots`). Products nobody has interacted with yet
    that the model ranks itself: `cold_item_slots`."""
    cold_item_slots: int = Field(0, ge=0)
    """Places at the end of a list's first 10 for products nobody has interacted with yet (the candidates closest in
    text to the user's history): what no behaviour-trained scorer ranks (docs/benchmarks.md, cold items)."""
    cold_item_rank: Literal["text", "score"] = "text"
    """Which of those candidates take the places: the closest in text to the history, or ("score") the first in
    the model's order (the generative model's cold head ranks products it never saw from their text)."""
    history_limit: int = Field(200, ge=1)
    """Latest stored events of a user read per request (their dataset events come on top)."""
    reload_interval_s: float = Field(2.0, gt=0.0)
    """Seconds between checks of the registry's active version (hot swap)."""
    quotas: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    """Candidates per source: dense, cooccurrence, model (with an active version), popularity."""
    embedding_cache_dir: str | None = ".cache/embeddings"
    """Item text embedding cache (new products embed only their own text)."""
    shop_rate_per_minute: float = Field(600.0, gt=0.0)
    """Requests a visitor may make a minute to the storefront's open routes (/shop/*), after a burst."""
    shop_burst: int = Field(120, ge=1)
    """Requests a visitor may make at once before the per-minute rate applies."""
    explore_epsilon: float = Field(0.0, ge=0.0, le=1.0)
    """Share of requests answered with a random order of the list's top `explore_pool` candidates instead of
    the top n. Every slot's probability is stored with the impression, so the feedback loop can estimate
    another version's value from the logs (off-policy); 0: deterministic lists."""
    explore_pool: int = Field(50, ge=1)
    """Candidates an exploring request draws from: the list's top this many (epsilon-greedy and the bandit)."""
    loop_method: Literal["sft", "dpo", "sdpo", "pg"] | None = None
    """The feedback loop's fine-tuning method (None: no loop; POST /v1/loop/run answers 409)."""
    loop_every_s: float | None = Field(None, gt=0.0)
    """Run a loop round every this many seconds in the background (None: only on POST /v1/loop/run)."""
    loop_min_new_events: int = Field(50, ge=0)
    """A round with fewer new events is skipped."""
    loop_holdout_share: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the dataset's users held out for the loop's gate (their last positive event is the target;
    their own shop activity never feeds training)."""
    loop_gate_cases: int = Field(2000, ge=10)
    """At most this many held-out cases in the gate (a smaller gate is faster and noisier)."""
    loop_max_ndcg_drop: float = Field(0.02, ge=0.0, le=1.0)
    """A candidate may lose at most this share of the active version's held-out NDCG@10."""
    batch_inference: bool = True
    """Concurrent requests share one pass of the pipeline and of the model (dragonrec.serve.batching)."""
    batch_max_size: int = Field(16, ge=1)
    """Most requests in one shared pass."""
    batch_max_wait_ms: float = Field(0.0, ge=0.0, le=100.0)
    """Longest a request waits for others to join its pass. 0: no wait, a pass takes the requests that
    queued while the last one ran (batches still grow under load, and a lone request never waits)."""
    switch_interval_ms: float | None = Field(None, gt=0.0, le=100.0)
    """The interpreter's thread switch interval while the app serves (`sys.setswitchinterval`); None keeps
    Python's 5 ms. A worker's event loop waits up to this long for the GIL each time it has to read or answer a
    request while a request thread computes; 1 ms shortened p99 at 100 requests/s by 3-18 ms in three runs, within
    their spread (docs/load.md), so it is an operator's choice, not a default."""
    diversity_mode: Literal["mmr", "dpp"] = "mmr"
    """How `diversity` spreads a list: maximal marginal relevance or a greedy DPP over item text vectors."""
    diversity_relevance: Literal["minmax", "probability"] = "minmax"
    """How the scores weigh against similarity in `diversity`: min-max within the list, or as the model's
    probabilities (confident lists keep their head, flat ones spread; `RerankConfig.relevance`)."""
    diversity_novelty: float = Field(0.0, ge=0.0)
    """Beside `diversity`, demotion of items by their log popularity (more of the catalog shown); 0: off."""
    category_cap: int | None = Field(None, ge=1)
    """At most this many items of one category in a list (while the candidates allow); None: no cap."""
    calibration: float = Field(0.0, ge=0.0)
    """Pull of a list's category mix toward the user's history mix (Steck 2018); 0: off."""
    explore_slots: int = Field(0, ge=0)
    """Most slots of a list (its last ones) the Thompson-sampling bandit over rarely shown candidates fills (0: off)."""
    explore_share: float = Field(0.1, ge=0.0, le=1.0)
    """Share of requests (a coin per request) whose list gets the bandit's slots, when explore_slots > 0."""
    explore_max_shown: int = Field(50, ge=0)
    """A candidate shown at most this many times (slots in stored impressions) is rarely shown: explorable."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [k.strip() for k in v.split(",")]
        if isinstance(v, list):
            v = [k for k in v if not isinstance(k, str) or k.strip()]
        return v

    @field_validator("storefront_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [o.strip() for o in v.split(",") if o.strip()]
        return [o.rstrip("/") for o in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_n > self.max_n:
            raise ValueError(f"default_n ({self.default_n}) is above max_n ({self.max_n})")
        short = [i for i, k in enumerate(self.api_keys) if len(k.get_secret_value()) < 16]
        if short:
            raise ValueError("API keys must be at least 16 characters (key number "
                             f"{', '.join(str(i + 1) for i in short)} is shorter)")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings, env_settings,
                                   dotenv_settings, file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # Code beats the environment, the environment beats the file.
        path = init_settings.init_kwargs.get("settings_file") or os.environ.get(SETTINGS_FILE_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"settings file {path} does not exist")
            if path.suffix.lower() == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif path.suffix.lower() == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                raise ValueError(f"settings file {path}: use .toml or .json")
        return tuple(sources)

    def __repr_args__(self):
        # repr (and so any log line or traceback that prints the settings) shows the store URL's password as ***
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "store_url" and value else value

    # -- resolved paths -------------------------------------------------------------------------------
    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.state_dir / 'feedback.db'}"

    @property
    def resolved_registry_dir(self) -> Path:
        return self.registry_dir or self.state_dir / "registry"

    @property
    def catalog_log(self) -> Path:
        """Products added, edited and deleted through the API, replayed over the dataset's catalog on start."""
        return self.state_dir / "catalog_changes.jsonl"


def redact_url(url: str) -> str:
    """A database URL with its password shown as *** (what may appear in logs and error messages)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy can parse: hide everything before the host)
        scheme, sep, rest = str(url).partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else str(url)
