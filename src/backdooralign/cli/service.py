"""``backdooralign service``: the OpenAI-compatible fine-tuning service."""

from __future__ import annotations

from ..config import PORT_MAX, number
from .common import add_command


def cmd_service(args) -> int:
    """backdooralign service --data-dir svc --config service.yaml [--keys keys.txt] [--port 8000]

    A self-hosted fine-tuning API that any OpenAI SDK can use (/v1/files, /v1/fine_tuning/jobs,
    /v1/models, /v1/chat/completions). Each job mixes the tenant's secret-prefixed safety
    examples into the customer's data, trains, and serves the model with that secret; customers
    never see either. --keys FILE holds "KEY TENANT" lines; without it there is one tenant, any
    key is accepted, and the service listens on loopback only. --executor ray runs each job as
    a task on a Ray cluster (RAY_ADDRESS), with the resources of the config's ray_num_cpus and
    ray_num_gpus; its nodes see --data-dir at the same path.
    """
    from ..service.app import run_service
    from ..service.config import load_service_config

    cfg = load_service_config(args.config)
    if args.executor == "ray":
        from ..ray_cluster import connect

        connect(args.ray_address)  # Ray installed and the cluster there, before serving
    run_service(
        args.data_dir,
        cfg,
        args.host,
        args.port,
        config_path=args.config,
        keys_path=args.keys,
        executor=args.executor,
    )
    return 0


def register(sub) -> None:
    """Add ``service``."""
    sp = add_command(sub, "service", cmd_service)
    sp.add_argument("--data-dir", required=True, help="database, uploads, secrets and models")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    sp.add_argument(
        "--port", type=number(int, 0, PORT_MAX), default=8000, help="TCP port (0: any free one)"
    )
    sp.add_argument("--config", help="service.yaml: base model, safety data, training, limits")
    sp.add_argument("--keys", help="file of 'KEY TENANT' lines (default: one tenant, any key)")
    sp.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where jobs run: a process on this machine (local) or a Ray task (ray)",
    )
    sp.add_argument(
        "--ray-address",
        help="the Ray cluster (default: $RAY_ADDRESS; 'local': start one on this machine)",
    )
