"""Property-based: requests generated from the API's own /openapi.json (schemathesis), valid
and not, as an authenticated caller. Whatever they hold, the answer is never a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.test_api import Api, api  # noqa: F401  (the running API fixture)

pytestmark = pytest.mark.docker


def test_no_request_makes_a_server_error(api: Api) -> None:  # noqa: F811
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {api.token('alice')}"}
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def no_server_error(case: Any) -> None:
            response = case.call(headers=headers, timeout=30)
            assert response.status_code < 500, (
                case.method,
                case.formatted_path,
                response.text[:400],
            )

        no_server_error()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert "POST /v1/tasks" in checked and len(checked) >= 10, checked
