"""Schema-driven fuzzing (schemathesis) of a live server: every operation of its own /openapi.json, called over
real HTTP with a valid API key (so the calls reach the handlers), answers no 5xx, and every answer (refusals
included) conforms to what the document says: status codes, content type, headers and body schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from serve_helpers import API_KEY, Server, beauty_slice

KEY = {"X-API-Key": API_KEY}
NAMES_ITEMS = {"POST /v1/events", "POST /v1/recommend", "POST /shop/events", "POST /shop/recommend"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    data = beauty_slice(root / "data", n_items=150, max_users=200)
    env = {"DRAGONREC_DATA_DIR": str(data), "DRAGONREC_STATE_DIR": str(root / "state"), "DRAGONREC_API_KEY": API_KEY}
    with Server(env, root / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    # the document the running server publishes, not one built in the test process
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


# schemathesis' own pytest plugin does not run under pytest 9 (it sets Function._nodeid), so each operation
# gets its cases from schemathesis' hypothesis strategy here: 12 per operation and mode, about 400 calls.
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def conformance_check(operation, mode: GenerationMode):
    """A hypothesis test: `operation` called with schemathesis' cases of `mode`, every default check on."""
    # A body that names products the catalog lacks is well-formed yet refused (422, unknown item): no document
    # can say which ids exist, so there that one refusal of schema-valid data is accepted, and nothing else.
    names_items = operation.label in NAMES_ITEMS and mode is GenerationMode.POSITIVE
    excluded = [positive_data_acceptance] if names_items else []

    @EXAMPLES
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call_and_validate(headers=KEY, timeout=30, excluded_checks=excluded)
        assert response.status_code < 500, response.text
        if names_items and response.status_code == 422:
            assert "unknown item" in response.json()["detail"], response.text

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_and_never_fails(api_schema, server, mode):
    failures, operations = {}, 0
    for result in api_schema.get_all_operations():
        operation = result.ok()  # an operation schemathesis cannot read is an error in the document
        operations += 1
        try:
            conformance_check(operation, mode)()
        except Unsatisfiable:  # nothing of this operation can be made invalid (no parameters, any string)
            assert mode is GenerationMode.NEGATIVE
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 (one report names every failing operation)
            failures[operation.label] = str(e)[:1500]
    assert operations >= 14
    assert not failures, "\n\n".join(f"{op}:\n{msg}" for op, msg in failures.items())
    assert server.proc.poll() is None  # the server is still up


def test_the_document_names_every_refusal(api_schema, server):
    """The refusals the tests above accept are the documented ones, each with the {"detail": ...} body."""
    doc = api_schema.raw_schema
    events = doc["paths"]["/v1/events"]["post"]["responses"]
    assert {"200", "401", "403", "413", "422"} <= set(events)
    problem = events["422"]["content"]["application/json"]["schema"]
    assert problem == {"$ref": "#/components/schemas/Problem"}
    assert doc["components"]["schemas"]["Problem"]["required"] == ["detail"]
    assert "404" in doc["paths"]["/v1/items/{item_id}"]["get"]["responses"]
    assert "429" in doc["paths"]["/shop/events"]["post"]["responses"]
    # limits that are settings, not types, are in the document too (max_n, max_events_per_batch)
    schemas = doc["components"]["schemas"]
    assert {"type": "integer", "minimum": 1, "maximum": 100} in schemas["RecommendRequest"]["properties"]["n"]["anyOf"]
    assert schemas["EventsIn"]["properties"]["events"]["maxItems"] == 1000
