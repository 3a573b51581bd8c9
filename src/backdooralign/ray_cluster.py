"""The Ray cluster that ``--executor ray`` runs on (service jobs, sweep cells): Ray itself is
an optional extra, and the cluster is named by ``--ray-address`` or ``$RAY_ADDRESS``."""

from __future__ import annotations

import os

from .config import ConfigError

RAY_EXTRA = "pip install 'backdooralign[ray]'"


def require_ray():
    """The ``ray`` module, or a :class:`ConfigError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def connect(address: str | None = None):
    """Ray, connected to the cluster at ``address`` (default ``$RAY_ADDRESS``; ``local``: a
    cluster of this machine, started for this process); an existing connection is kept.

    Raises:
        ConfigError: Ray is not installed, or no cluster was named.
        ConnectionError: no Ray cluster answers at the address.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(
            "--executor ray: which Ray cluster? Set RAY_ADDRESS or --ray-address HOST:PORT "
            "(the head node's, from `ray start --head`), or --ray-address local to start "
            "one on this machine"
        )
    ray.init(address=address, **({"include_dashboard": False} if address == "local" else {}))
    return ray
