"""The service: HTTP API (FastAPI), online adaptation, hot swap of model versions, and the storefront.

    from dragonrec.serve import Settings, Service, create_app
    app = create_app(Settings(data_dir="../shared/data/amazon-beauty", api_keys=["a-long-secret-key-1234"]))

    dragonrec serve --data ../shared/data/amazon-beauty --port 8000     # the same from the command line

Modules: settings (the one Settings object), schemas (request/response bodies), serving (catalog + pipeline
+ version, immutable), service (the Service the routes and pages call), api (routes), metrics (Prometheus),
app (create_app), storefront and dashboard (pages).
"""

from dragonrec.serve.app import app_from_env, create_app
from dragonrec.serve.service import Conflict, Invalid, NotFound, Service, ServiceError, TooLarge
from dragonrec.serve.settings import Settings

__all__ = ["Conflict", "Invalid", "NotFound", "Service", "ServiceError", "Settings", "TooLarge", "app_from_env",
           "create_app"]
