"""What a FastAPI endpoint's dependencies read from the request, so a cache hit cannot skip them.

A cache hit is answered before the app, so FastAPI's dependencies do not run
on it: an endpoint guarded by ``Depends(verify_key)`` (reading ``X-API-Key``)
would hand the owner's cached answer to anyone. At startup the middleware
walks each endpoint's dependant tree (duck-typed: no FastAPI import) and
collects the request inputs it reads: `Header` and `Cookie` parameters, the
security schemes (`APIKeyHeader`/`APIKeyCookie`, HTTP and OAuth2 schemes read
``Authorization``) and dependencies that take the whole `Request` (which may
read anything). `cache_rules` turns them into `cache.key_headers` for the
endpoint's route, so every distinct credential has its own entries and a
request without one never shares the owner's; an explicitly cached endpoint
with a Request-taking dependency is refused at startup (the cache cannot know
what it reads), an implicitly cached one gets caching off. The opt-outs:
``cache.trust_dependencies = true`` (route or plugin), or declaring what a
dependency reads with `overdrive.contrib.fastapi.reads`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from overdrive.errors import ConfigError

#: Set by `overdrive.contrib.fastapi.reads` (and on our own dependencies): the request
#: headers a dependency reads, lower-case; () for none.
READS_ATTR = "__overdrive_reads__"
_DEPTH = 64


class Inputs:
    """What one endpoint's dependency tree reads: headers (lower-case) and opaque readers."""

    __slots__ = ("headers", "opaque")

    def __init__(self) -> None:
        self.headers: set[str] = set()
        self.opaque: list[str] = []  # names of dependencies that take the whole Request


def _name(call: Any) -> str:
    return str(getattr(call, "__name__", None) or type(call).__name__)


def _security(call: Any, inputs: Inputs) -> bool:
    """A FastAPI security scheme instance: record what it reads; False if it is not one."""
    if not (hasattr(call, "scheme_name") and hasattr(call, "model")):
        return False
    model = call.model
    where = str(getattr(getattr(model, "in_", None), "value", getattr(model, "in_", "")) or "")
    if where == "header":
        inputs.headers.add(str(model.name).lower())
    elif where == "cookie":
        inputs.headers.add("cookie")
    elif where == "query":
        pass  # the query is in the key already
    else:  # HTTPBasic/Bearer/Digest, OAuth2, OpenID Connect: the Authorization header
        inputs.headers.add("authorization")
    return True


def _walk(dependant: Any, inputs: Inputs, root: bool, depth: int = 0) -> None:
    if depth > _DEPTH:
        return
    call = getattr(dependant, "call", None)
    declared = getattr(call, READS_ATTR, None)
    if declared is not None and not root:
        inputs.headers.update(str(h).lower() for h in declared)
        return  # what it reads is declared: its own parameters need no guess
    for field in getattr(dependant, "header_params", ()) or ():
        alias = str(getattr(field, "alias", "") or getattr(field, "name", ""))
        info = getattr(field, "field_info", None)
        if getattr(info, "convert_underscores", True):
            alias = alias.replace("_", "-")
        inputs.headers.add(alias.lower())
    if getattr(dependant, "cookie_params", None):
        inputs.headers.add("cookie")
    if not root and not _security(call, inputs):
        takes_request = getattr(dependant, "request_param_name", None) or getattr(
            dependant, "http_connection_param_name", None
        )
        if takes_request:
            inputs.opaque.append(_name(call))
    for sub in getattr(dependant, "dependencies", ()) or ():
        _walk(sub, inputs, False, depth + 1)


def dependency_inputs(route: Any) -> Inputs | None:
    """What `route`'s dependencies read; None for a route that is not a FastAPI endpoint."""
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return None
    inputs = Inputs()
    _walk(dependant, inputs, True)
    return inputs


def cache_rules(
    routes: list[Any], explicit: Mapping[str, Mapping[str, Any]], trusted: bool, prefix: str = ""
) -> list[dict[str, Any]]:
    """`[[routes]]` rules that key each FastAPI endpoint on what its dependencies read.

    `explicit`: the cache table of each endpoint policy, by path (the endpoint
    asked to be cached); `trusted`: the plugin-wide ``trust_dependencies``.
    Raises `ConfigError` naming the endpoint and the dependency when an
    explicitly cached endpoint depends on the whole Request.
    """
    rules: list[dict[str, Any]] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            sub_prefix = prefix + str(getattr(context, "prefix", "") or "")
            rules.extend(
                cache_rules(list(getattr(included, "routes", [])), explicit, trusted, sub_prefix)
            )
            continue
        path = prefix + str(getattr(route, "path", ""))
        sub = getattr(route, "routes", None)
        if sub and not hasattr(route, "endpoint"):
            rules.extend(cache_rules(list(sub), explicit, trusted, path.rstrip("/")))
            continue
        methods = getattr(route, "methods", None)
        if methods and not ({"GET", "HEAD"} & set(methods)):
            continue  # never looked up
        inputs = dependency_inputs(route)
        if inputs is None:
            continue
        table = explicit.get(path or "/")
        own = table.get("trust_dependencies") if table is not None else None
        if (own if own is not None else trusted) or (
            table is not None and table.get("enabled") is False
        ):
            continue
        rule: dict[str, Any] = {"path": path or "/"}
        if methods:
            rule["methods"] = sorted(methods)
        endpoint = str(getattr(route, "name", "") or _name(getattr(route, "endpoint", None)))
        if inputs.opaque:
            if table is not None:
                raise ConfigError(
                    f"cache on endpoint {endpoint} ({path}): dependency {inputs.opaque[0]} takes "
                    "the Request, so a cache hit would skip whatever it checks; declare what it "
                    "reads with overdrive.contrib.fastapi.reads(...), or set "
                    "cache.trust_dependencies = true on this endpoint"
                )
            rule["cache"] = {"enabled": False}  # implicitly cached: not cached at all
            rules.append(rule)
            continue
        if not inputs.headers:
            continue
        keyed = set(inputs.headers)
        if table is not None:
            keyed.update(str(h).lower() for h in table.get("key_headers", ()) or ())
        rule["cache"] = {"key_headers": sorted(keyed)}
        rules.append(rule)
    return rules
