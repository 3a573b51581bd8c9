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

    Several machines: --database postgresql://USER@HOST/DB (one database for all; SQLite in
    --data-dir is the default, for one machine) with --data-dir on storage every node mounts at
    the same path; API servers with --role api, workers with --role worker (--role all, the
    default, is both in one process).
    """
    from ..service.app import run_service, run_worker
    from ..service.config import load_service_config
    from ..service.store_pg import open_store

    cfg = load_service_config(args.config)
    if args.executor == "ray":
        from ..ray_cluster import connect

        connect(args.ray_address)  # Ray installed and the cluster there, before serving
    if args.database is not None:
        open_store(args.database).close()  # reachable and migrated, or a one-line error
    if args.role == "worker":
        run_worker(
            args.data_dir,
            cfg,
            database=args.database,
            config_path=args.config,
            executor=args.executor,
        )
        return 0
    run_service(
        args.data_dir,
        cfg,
        args.host,
        args.port,
        config_path=args.config,
        keys_path=args.keys,
        executor=args.executor,
        database=args.database,
        role=args.role,
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
        "--database",
        help="postgresql://USER@HOST:PORT/DB shared by several servers and workers "
        "(default: SQLite in --data-dir, one machine)",
    )
    sp.add_argument(
        "--role",
        choices=("all", "api", "worker"),
        default="all",
        help="all: the API and a worker; api: the API only; worker: run jobs, no API",
    )
    sp.add_argument(
        "--ray-address",
        help="the Ray cluster (default: $RAY_ADDRESS; 'local': start one on this machine)",
    )
