"""`tricklm serve --replicas N`: engine replicas on Ray Serve behind one gateway (`gateway.py`), requests routed by
their prompt's prefix (`routing.py`, `router.py`), metrics merged from every replica (`metrics_merge.py`).

`tricklm.server.replicas:from_args` is the application builder Ray's `serve run` and KubeRay's `serveConfigV2` name;
the gateway (and Ray with it) is imported only when one of its names is asked for.
"""

from typing import Any

_GATEWAY_NAMES = ("build_application", "from_args", "serve_replicas")


def __getattr__(name: str) -> Any:
    if name in _GATEWAY_NAMES:
        from tricklm.server.replicas import gateway

        return getattr(gateway, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
