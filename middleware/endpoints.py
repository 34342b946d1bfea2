"""Route rules declared on endpoints (`overdrive.contrib.fastapi.policy`), read from the app.

The app's own route templates become `[[routes]]` rules once, at startup, so a
request is never matched twice: the middleware's per-path lookup serves both.
"""

from __future__ import annotations

from typing import Any

POLICY_ATTR = "__overdrive_policy__"


def find_routes(app: Any, depth: int = 16) -> list[Any]:
    """The routes of the first object with a `routes` list, following `.app` links
    (middleware stacks, FastAPI -> Router)."""
    for _ in range(depth):
        if app is None:
            return []
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None) or getattr(app, "middleware_stack", None)
    return []


def endpoint_rules(routes: list[Any], prefix: str = "") -> list[dict[str, Any]]:
    """`[[routes]]`-shaped rules for every endpoint that declared a policy."""
    rules: list[dict[str, Any]] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI >= 0.16x keeps included routers lazily
            context = getattr(route, "include_context", None)
            sub_prefix = prefix + str(getattr(context, "prefix", "") or "")
            rules.extend(endpoint_rules(list(getattr(included, "routes", [])), sub_prefix))
            continue
        path = prefix + str(getattr(route, "path", ""))
        sub = getattr(route, "routes", None)
        if sub and not hasattr(route, "endpoint"):  # a Mount: recurse with its prefix
            rules.extend(endpoint_rules(list(sub), path.rstrip("/")))
            continue
        policy = getattr(getattr(route, "endpoint", None), POLICY_ATTR, None)
        if not policy:
            continue
        rule: dict[str, Any] = {"path": path or "/", **policy}
        methods = getattr(route, "methods", None)
        if methods:
            rule["methods"] = sorted(methods)
        rules.append(rule)
    return rules
