"""The `overdrive` command: list plugins, show the effective config, explain a route, demo.

overdrive plugins              discovered plugins: name, distribution, enabled, hooks
overdrive config               the effective merged configuration, or its errors (exit 1)
overdrive explain PATH [-m M]  the ordered chain a request would run, with settings
overdrive demo [--port N]      serve the demo app (needs the `demo` extra)
overdrive load URL [--compare URL2]  drive a mixed workload, print a summary (`demo` extra)
overdrive reference            the configuration reference (Markdown) from the settings classes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .config import resolve_config
from .discovery import discover
from .errors import OverdriveError
from .redact import redact
from .settings import settings_as_dict


def _hooks_of(obj: Any) -> list[str]:
    cls = obj if isinstance(obj, type) else type(obj)
    return sorted(
        attr for attr in dir(cls) if getattr(getattr(cls, attr, None), "overdrive_impl", None)
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    config = resolve_config(args.config, None)
    enabled = config.get("plugins", [])
    rows = []
    for name, found in sorted(discover().items()):
        try:
            hooks = ", ".join(_hooks_of(found.load()))
            status = "enabled" if name in enabled else "available"
        except OverdriveError as exc:
            hooks = f"FAILED TO LOAD: {exc.__cause__ or exc}"
            status = "broken"
        rows.append((name, f"{found.distribution} {found.version}", status, hooks))
    if args.json:
        keys = ("name", "distribution", "status", "hooks")
        print(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], indent=2))
        return 0
    width = max((len(r[0]) for r in rows), default=4)
    dwidth = max((len(r[1]) for r in rows), default=12)
    print(f"{'name':<{width}}  {'distribution':<{dwidth}}  {'status':<9}  hooks")
    for name, dist, status, hooks in rows:
        print(f"{name:<{width}}  {dist:<{dwidth}}  {status:<9}  {hooks}")
    return 0


def _host(args: argparse.Namespace) -> Any:
    from .host import Overdrive

    return Overdrive(args.config)


def cmd_config(args: argparse.Namespace) -> int:
    try:
        host = _host(args)
    except OverdriveError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    effective = {
        "plugins": list(host.plugins),
        **settings_as_dict(host.settings),
        **{name: settings_as_dict(s) for name, s in host.routes.base_settings.items()},
        "routes": [
            {"path": r.path, "methods": sorted(r.methods) if r.methods else None, **r.overrides}
            for r in host.routes.rules
        ],
    }
    print(json.dumps(redact(effective), indent=2, default=str))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        host = _host(args)
    except OverdriveError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    plan = redact(host.explain(args.method, args.path))
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
        return 0
    print(f"{plan['method']} {plan['path']}")
    print(f"route rules: {', '.join(plan['rules']) or '(none match)'}")
    for hook, names in plan["hooks"].items():
        print(f"  {hook:<18} {' -> '.join(names) or '-'}")
    for name, settings in plan["settings"].items():
        print(f"[{name}]")
        for key, value in settings.items():
            print(f"  {key} = {value!r}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("the demo needs the `demo` extra: pip install 'overdrive[demo]'", file=sys.stderr)
        return 1
    print(f"Overdrive demo on http://{args.host}:{args.port}/  (Ctrl+C to stop)")
    uvicorn.run("overdrive.contrib.demo:app", host=args.host, port=args.port, log_level="info")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from overdrive.contrib import load

    return load.main(args)


def cmd_reference(args: argparse.Namespace) -> int:
    from overdrive.contrib.reference import render_reference

    sys.stdout.write(render_reference())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from overdrive.contrib.load import add_arguments as load_arguments

    parser = argparse.ArgumentParser(prog="overdrive", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: overdrive.toml or pyproject.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list discovered plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("config", help="print the effective configuration")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("explain", help="the chain a request to PATH would run")
    p.add_argument("path")
    p.add_argument("-m", "--method", default="GET")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("demo", help="serve the demo app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("load", help="drive a mixed workload at a service and summarize it")
    load_arguments(p)
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("reference", help="print the configuration reference (Markdown)")
    p.set_defaults(func=cmd_reference)
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`overdrive config | head`): stop quietly, as a Unix tool does on
        # SIGPIPE. Later writes (the interpreter's own flush at exit) go to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
