"""A self-hosted, OpenAI-compatible fine-tuning service with the defense built in.

``create_service`` serves ``/v1/files``, ``/v1/fine_tuning/jobs`` (with events and cancel),
``/v1/models`` and ``/v1/chat/completions``, so any OpenAI SDK can upload data, fine-tune and
chat unchanged. ``/v1/models`` lists what chat answers for: the tenant's fine-tuned models (the
base model is what jobs fine-tune, named in ``service.yaml``; chat never serves it). Every
error, on every route, is an OpenAI error object.

Every job runs the provider's pipeline (:mod:`backdooralign.service.job`): the tenant's
secret-prefixed safety examples are mixed into the customer's data where the customer cannot
see them, and each fine-tuned model is served with its tenant's secret through the serving
layer (:mod:`backdooralign.serving.model_state`: a scheduler per model batches
concurrent requests; :func:`completions.respond` answers them, streamed or not, as
``backdooralign serve`` does). State lives in SQLite (:class:`store.Store`) or PostgreSQL
(:class:`store_pg.PostgresStore`, for several API servers and workers on one database); a
worker thread (:class:`worker.Worker`) runs one job at a time in a process of its own.
:func:`run_service` serves the API with a worker (``role="all"``) or without (``"api"``);
:func:`run_worker` is a worker alone (``backdooralign service --role worker``).

The secret never leaves the service: not in responses, events, errors or logs; answers that
echo it are redacted as in ``backdooralign serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from .. import files as F
from ..data.chat_files import provider_field_problems
from ..serving.chat_route import respond
from ..serving.http import (
    LOOPBACK,
    APIError,
    AuthThrottle,
    answer_errors_as_json,
    client_address,
    json_body,
    read_body,
    run,
)
from ..serving.model_state import ModelState, ServedModel, check_model_secret, model_state
from .config import ServiceConfig
from .job import claim_data_dir, db_path, model_dir, secret_path
from .protocol import (
    RateLimiter,
    Tenancy,
    event_object,
    file_object,
    job_object,
    page,
    parse_job_request,
    parse_multipart,
)
from .store import Store, new_id, shown_database
from .store_pg import open_store
from .worker import Worker, describe_errors

log = logging.getLogger(__name__)

MAX_JSON_BODY = 1 << 20
MULTIPART_OVERHEAD = 64 << 10


def _not_found(what: str, ident: str, param: str | None = None) -> APIError:
    return APIError(f"no {what} with id {ident!r}", param, status=404, code=f"{what}_not_found")


def _load_state(
    data_dir: Path, job: dict, cfg: ServiceConfig, on_prompt: Callable[[str], None] | None
) -> ModelState:
    """A job's fine-tuned model, ready to serve with its tenant's secret (slow: loads it).

    The model directory records the fingerprint of the secret it was trained with; another
    secret (the tenant's file was replaced) is refused: logged with both fingerprints, and
    answered with a 500 that names neither.
    """
    from ..core.chat import render_prompt
    from ..core.model import load_model_and_tokenizer
    from ..core.secret import load_secret

    name = job["fine_tuned_model"]
    secret = load_secret(secret_path(data_dir, job["tenant"]))
    try:
        check_model_secret(model_dir(data_dir, job["id"]), name, secret)
    except ValueError as e:
        log.error("%s", e)
        msg = f"the model {name!r} cannot be served at the moment; contact the provider"
        code = "model_unavailable"
        raise APIError(msg, "model", status=500, type="server_error", code=code) from None
    model, tok = load_model_and_tokenizer(job["model_dir"])
    hook = None
    if on_prompt is not None:

        def hook(_name: str, conversation: list[dict]) -> None:
            on_prompt(tok.decode(render_prompt(tok, conversation), skip_special_tokens=False))

    served = ServedModel(name, model, tok, secret, cfg.system)
    return model_state(served, cfg.max_new_tokens, None, on_prompt=hook)


class ModelCache:
    """The most recently used fine-tuned models (``cfg.loaded_models``), each with a scheduler.

    Lookups, loads' results and evictions happen in the event loop's thread (only loading
    runs in a worker thread), and :func:`completions.respond` queues a request before it
    first yields: so an evicted model gets no new request, and its scheduler stops once it has
    answered those it holds.
    """

    def __init__(self, data_dir: Path, cfg: ServiceConfig, on_prompt: Callable[[str], None] | None):
        self.data_dir, self.cfg, self.on_prompt = data_dir, cfg, on_prompt
        self._states: OrderedDict[str, ModelState] = OrderedDict()
        self._loading = asyncio.Lock()

    async def get(self, job: dict) -> ModelState:
        """The loaded model of a succeeded job (loaded now, evicting the oldest, if need be)."""
        jid = job["id"]
        if jid not in self._states:
            async with self._loading:  # one load at a time: each holds a model in memory
                if jid not in self._states:
                    load = (self.data_dir, job, self.cfg, self.on_prompt)
                    self._states[jid] = await run_in_threadpool(_load_state, *load)
                    while len(self._states) > self.cfg.loaded_models:
                        self._states.popitem(last=False)[1].scheduler.close(drain=True)
        self._states.move_to_end(jid)
        return self._states[jid]

    def loaded(self) -> dict[str, ModelState]:
        """The loaded models by job id, least recently used first."""
        return dict(self._states)

    def close(self) -> None:
        """Stop every model's scheduler (when the service stops)."""
        for state in self._states.values():
            state.scheduler.close()


def create_service(
    data_dir: str | Path,
    cfg: ServiceConfig,
    *,
    keys: dict[bytes, str] | None = None,
    config_path: str | Path | None = None,
    on_prompt: Callable[[str], None] | None = None,
    executor: str = "local",
    database: str | None = None,
    role: str = "all",
) -> FastAPI:
    """The fine-tuning service's app; its worker starts and stops with the app.

    Args:
        data_dir: where the database, uploads, secrets, job files and models live: a new or
            empty folder, or one the service made (:func:`job.claim_data_dir`; a folder of
            other files is a ``ValueError``).
        cfg: the provider's settings (its connection limits: :meth:`~ServiceConfig.http_limits`;
            an address that sent ``auth_failures`` wrong keys in ``auth_window`` seconds gets
            429s).
        keys: API key digests to tenants (:func:`service_api.load_keys`); ``None``: one
            tenant, any key.
        config_path: the YAML ``cfg`` came from, handed to job processes.
        on_prompt: test hook, off by default: called with the text of every chat prompt
            the model is given (its rendered token ids decoded; secret included).
        executor: where jobs run: ``local`` (a process here) or ``ray`` (a Ray task on the
            cluster Ray is connected to, :mod:`.ray_exec`).
        database: the store: a ``postgresql://`` URL, or ``None`` for the data dir's SQLite
            (then this is the only service on it).
        role: ``all`` (the API and a worker) or ``api`` (the API only: jobs are run by
            workers elsewhere, :func:`run_worker`; a cancel reaches them through the store).
    """
    if role not in ("all", "api"):
        raise ValueError(f"role {role!r}: 'all' or 'api' (a worker alone is run_worker)")
    data_dir = claim_data_dir(data_dir)
    store = open_store(database or db_path(data_dir))
    worker = Worker(store, data_dir, cfg, config_path, executor=executor, database=database)
    tenancy, limiter = Tenancy(keys), RateLimiter(cfg.rate_limit)
    cache = ModelCache(data_dir, cfg, on_prompt)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if role == "all":
            worker.start()
        yield
        cache.close()
        await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="backdooralign service",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.store, app.state.worker, app.state.models = store, worker, cache
    app.state.http_limits = cfg.http_limits()
    answer_errors_as_json(app, lambda text: text)
    throttle = AuthThrottle(cfg.auth_failures, cfg.auth_window)

    def who(request: Request) -> str:
        address = client_address(request)
        throttle.check(address)  # 429 for an address that sent too many wrong keys
        try:
            tenant, key = tenancy.tenant(request)
        except APIError:
            throttle.failed(address)
            raise
        limiter.check(key)
        return tenant

    _file_routes(app, store, cfg, data_dir, who)
    _job_routes(app, store, cfg, worker, who)
    _model_routes(app, store, cfg, cache, who)
    return app


def _file_routes(app: FastAPI, store: Store, cfg: ServiceConfig, data_dir: Path, who) -> None:
    @app.post("/v1/files")
    async def upload(request: Request) -> dict:
        tenant = who(request)
        if not request.headers.get("content-length", "").isdigit():
            raise APIError("send Content-Length with the upload", status=411)
        body = await read_body(request, cfg.max_upload_bytes + MULTIPART_OVERHEAD)
        fields, (filename, content) = parse_multipart(request.headers.get("content-type", ""), body)
        if fields.get("purpose") != "fine-tune":
            raise APIError("purpose must be 'fine-tune' on this service", "purpose")
        if len(content) > cfg.max_upload_bytes:
            msg = f"the file is larger than {cfg.max_upload_bytes} bytes"
            raise APIError(msg, "file", status=413, code="file_too_large")
        if sum(1 for line in content.splitlines() if line.strip()) > cfg.max_rows:
            raise APIError(f"the file has more than {cfg.max_rows} rows", "file")
        text = content.decode("utf-8", "replace")
        if found := await run_in_threadpool(provider_field_problems, filename, text):
            msg = f"the file is invalid: {describe_errors(found)}"
            raise APIError(msg, "file", code="invalid_training_file")
        path = data_dir / "files" / f"{new_id('upload')}.jsonl"
        await run_in_threadpool(F.write_bytes_atomic, path, content, True)
        sha = await run_in_threadpool(F.sha256_file, path)
        row = store.add_file(tenant, filename[:255], "fine-tune", len(content), sha, str(path))
        return file_object(row)

    @app.get("/v1/files")
    async def list_files(request: Request) -> dict:
        tenant = who(request)
        rows = store.list_files(tenant, request.query_params.get("purpose"))
        if request.query_params.get("order") == "asc":
            rows.reverse()
        return page([file_object(r) for r in rows], request, 10_000)

    def owned(request: Request, file_id: str) -> dict:
        row = store.get_file(file_id, who(request))
        if row is None:
            raise _not_found("file", file_id)
        return row

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> dict:
        return file_object(owned(request, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        row = owned(request, file_id)
        content = await run_in_threadpool(F.read_bytes, row["path"])
        return Response(content, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> dict:
        row = owned(request, file_id)
        store.delete_file(file_id)
        Path(row["path"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def _job_routes(app: FastAPI, store: Store, cfg: ServiceConfig, worker: Worker, who) -> None:
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> dict:
        tenant = who(request)
        fields = parse_job_request(json_body(await read_body(request, MAX_JSON_BODY)), cfg)
        if store.get_file(fields["training_file"], tenant) is None:
            raise _not_found("file", fields["training_file"], "training_file")
        return job_object(store.add_job(tenant, **fields))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request) -> dict:
        rows = store.list_jobs(who(request))
        return page([job_object(r) for r in rows], request)

    def owned(request: Request, job_id: str) -> dict:
        row = store.get_job(job_id, who(request))
        if row is None:
            raise _not_found("job", job_id)
        return row

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(request: Request, job_id: str) -> dict:
        return job_object(owned(request, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(request: Request, job_id: str) -> dict:
        owned(request, job_id)
        return page([event_object(r) for r in store.list_events(job_id)], request)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str) -> dict:
        job = owned(request, job_id)
        if not await run_in_threadpool(worker.cancel, job_id):
            raise APIError(f"the job is already {job['status']}; it cannot be cancelled")
        return job_object(store.get_job(job_id))


def _model_routes(app: FastAPI, store: Store, cfg: ServiceConfig, cache: ModelCache, who) -> None:
    def entry(model_id: str, created: int, owner: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": owner}

    def visible(tenant: str) -> list[dict]:
        """The models the tenant can chat with: its fine-tuned ones (not the base model)."""
        jobs = store.list_jobs(tenant, "succeeded")
        return [entry(j["fine_tuned_model"], j["finished_at"], f"org-{tenant}") for j in jobs]

    def unknown(name: object) -> APIError:
        msg = f"the model {name!r} does not exist or you do not have access to it"
        if name == cfg.base_model_name:
            msg = (
                f"{name!r} is the base model that jobs fine-tune; this service answers chat "
                "with fine-tuned models only (GET /v1/models lists yours)"
            )
        return APIError(msg, "model", status=404, code="model_not_found")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": visible(who(request))}

    @app.get("/v1/models/{model_id}")
    async def model(request: Request, model_id: str) -> dict:
        found = [m for m in visible(who(request)) if m["id"] == model_id]
        if not found:
            raise unknown(model_id)
        return found[0]

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        tenant = who(request)
        body = json_body(await read_body(request, MAX_JSON_BODY))
        name = body.get("model") if isinstance(body, dict) else None
        job = store.find_model(name, tenant) if isinstance(name, str) else None
        if job is None:
            raise unknown(name)
        state = await cache.get(job)
        return await respond(request, state, body, cfg.max_new_tokens, None, state.redact)


def run_service(
    data_dir: str | Path,
    cfg: ServiceConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    config_path: str | Path | None = None,
    keys_path: str | Path | None = None,
    executor: str = "local",
    database: str | None = None,
    role: str = "all",
) -> None:
    """Serve the fine-tuning API with uvicorn until interrupted (``role``, ``database``:
    :func:`create_service`'s).

    Raises:
        ValueError: when asked to listen beyond loopback without ``keys_path``.
    """
    from .protocol import load_keys

    if keys_path is None and host not in LOOPBACK:
        raise ValueError(
            f"--host {host}: without --keys the service accepts any key, so it only listens "
            "on loopback (127.0.0.1); give --keys FILE to serve other hosts"
        )
    keys = load_keys(keys_path) if keys_path else None
    app = create_service(
        data_dir,
        cfg,
        keys=keys,
        config_path=config_path,
        executor=executor,
        database=database,
        role=role,
    )
    tenants = f"{len(set(keys.values()))} tenants" if keys else "one tenant, any key"
    where = f"database {shown_database(database)}" if database else "SQLite"
    jobs = "jobs run by this process" if role == "all" else "API only: workers run the jobs"
    print(
        f"fine-tuning service on http://{host}:{port}/v1 ({tenants}; base model "
        f"{cfg.base_model_name}; data in {data_dir}; {where}; {jobs})",
        flush=True,
    )
    run(app, host, port)


def run_worker(
    data_dir: str | Path,
    cfg: ServiceConfig,
    *,
    database: str | None = None,
    config_path: str | Path | None = None,
    executor: str = "local",
) -> None:
    """Run jobs (no API) until SIGTERM or SIGINT: one of several workers on one database,
    each on a node that mounts ``data_dir`` at the same path. On the signal the running job's
    process is ended and the job given back (queued again while it has attempts left)."""
    import signal
    import threading

    data_dir = claim_data_dir(data_dir)
    store = open_store(database or db_path(data_dir))
    worker = Worker(store, data_dir, cfg, config_path, executor=executor, database=database)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    where = f"database {shown_database(database)}" if database else "SQLite"
    print(f"fine-tuning worker {worker.id} ({where}; data in {data_dir})", flush=True)
    stop.wait()
    worker.stop()
    store.close()
