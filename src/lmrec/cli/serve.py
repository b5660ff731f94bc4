"""``lmrec serve`` (the HTTP service) and ``lmrec report`` (the HTML run report)."""

from __future__ import annotations

from pathlib import Path

import typer

from lmrec.cli.common import (
    DEVICE_HELP,
    _k,
    _log,
    _str,
    app,
)
from lmrec.errors import LmrecError


@app.command()
def serve(
    model: Path = typer.Option(..., help="A finetuned RecFormer recommender directory, or a trained generative "
                                         "model directory (then --data and --sids too)."),
    data: Path = typer.Option(None, help="Generative: the prepared dataset (item ids and text)."),
    sids: Path = typer.Option(None, help="Generative: the semantic-ID directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Server processes, each with its own copy of the model."),
    max_batch: int = typer.Option(32, help="Requests answered by one forward pass at most (1: no batching)."),
    max_wait_ms: float = typer.Option(2.0, help="How long the first request of a batch waits for others."),
    index: str = typer.Option("auto", help="RecFormer retrieval: auto (exact up to --exact-max items, IVF above) | "
                                           "exact | ivf | hnsw."),
    exact_max: int = typer.Option(200_000, help="Largest catalog searched exactly under --index auto."),
    beams: int = typer.Option(None, help="Generative: beam width at least this (default: k)."),
    max_body_kb: int = typer.Option(1024, help="Largest request body (KiB); larger ones get 413."),
    max_k: int = typer.Option(100, help="Largest k a request may ask (the model's bound applies too: RecFormer "
                                        "1000, generative 100); larger gets 422."),
    max_history: int = typer.Option(None, help="Longest history a request may send (default: what the model "
                                               "takes); longer gets 422."),
    max_batch_requests: int = typer.Option(256, help="Requests in one POST /recommend/batch at most; more gets 422."),
    deadline_ms: float = typer.Option(10_000, help="A request not answered within this (queue + model) gets 504."),
    max_queue: int = typer.Option(1024, help="Requests waiting for the model at most; more get 503 + Retry-After."),
    shutdown_timeout: float = typer.Option(30, help="SIGTERM: seconds to answer in-flight and queued requests "
                                                    "before exiting."),
    drain_seconds: float = typer.Option(0, help="SIGTERM: keep answering this long first, with /health/ready at "
                                                "503 (time for a load balancer to notice)."),
    item_store: Path = typer.Option(None, help="Where items added by POST /items are kept (default: "
                                               "<model>.items/ beside the model; see docs/serving.md)."),
    api_key_file: Path = typer.Option(None, help="File whose first line is the API key (default: $LMREC_API_KEY). "
                                                 "With a key, POST /items needs 'Authorization: Bearer <key>'."),
    auth: str = typer.Option("mutate", help="With a key: mutate (POST /items needs it) | all (every endpoint but "
                                            "/health/*)."),
    allow_open_mutation: bool = typer.Option(False, help="Listen on a non-loopback --host without an API key "
                                                         "(anyone who reaches it can add items)."),
    log_level: str = typer.Option("info", help="uvicorn log level: critical | error | warning | info | debug."),
    device: str = typer.Option("auto", help=DEVICE_HELP + " On an accelerator: one server process (--workers 1)."),
):
    """Serve recommendations over HTTP (FastAPI + uvicorn): POST /recommend, /recommend/batch, /items;
    GET /items/{id}, /metadata, /health/live, /health/ready; OpenAPI docs at /docs. Production: docs/serving.md."""
    from lmrec.serve import app as service  # first: without the serve extra, one message naming it
    from lmrec.serve.families import detect_family, worker_count
    from lmrec.training.distributed import inference_device

    _check_serve_options(model=model, sids=sids, port=port, index=index, max_wait_ms=max_wait_ms,
                         log_level=log_level, auth=auth, deadline_ms=deadline_ms, shutdown_timeout=shutdown_timeout,
                         drain_seconds=drain_seconds)
    family = detect_family(model, data, sids)
    device = str(inference_device(device))
    _open_mutation(host, service.read_api_key(_str(api_key_file)), allow_open_mutation, auth)
    limits = {"max_k": _k(max_k, "--max-k"), "max_batch_requests": _k(max_batch_requests, "--max-batch-requests"),
              "max_history": None if max_history is None else _k(max_history, "--max-history"),
              "max_body_bytes": _k(max_body_kb, "--max-body-kb") * 1024, "deadline_ms": deadline_ms,
              "max_queue": _k(max_queue, "--max-queue"), "drain_s": drain_seconds,
              "shutdown_timeout_s": shutdown_timeout}
    _log(f"serving the {family} model {model} on http://{host}:{port} (docs: /docs; ready: /health/ready)")
    service.serve(host=host, port=port, workers=worker_count(workers, device), log_level=log_level,
                  model=str(model), device=device, data=_str(data), sids=_str(sids), index=index,
                  exact_max=_k(exact_max, "--exact-max"), beams=None if beams is None else _k(beams, "--beams"),
                  max_batch=_k(max_batch, "--max-batch"), max_wait_ms=max_wait_ms, limits=limits,
                  item_store=_str(item_store), api_key_file=_str(api_key_file), auth=auth)


def _check_serve_options(*, model, sids, port, index, max_wait_ms, log_level, auth, deadline_ms, shutdown_timeout,
                         drain_seconds) -> None:
    """What serve is given, checked before the server starts: a broken model is one message and exit 2 now,
    not a readiness probe that never passes later (the server loads the model in the background)."""
    from lmrec.eval.index import KINDS
    from lmrec.fusion import check_fused, is_fused_model
    from lmrec.modelfiles import check_served

    if is_fused_model(model):
        check_fused(model, "lmrec serve")
    else:
        check_served(model, sids)

    if not 0 < port < 65536:
        raise LmrecError(f"--port must be 1..65535, got {port}")
    if index not in KINDS:
        raise LmrecError(f"--index must be one of {', '.join(KINDS)}, got {index!r}")
    if max_wait_ms < 0:
        raise LmrecError(f"--max-wait-ms must be ≥ 0, got {max_wait_ms}")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise LmrecError(f"--log-level: unknown level {log_level!r}")
    if auth not in ("mutate", "all"):
        raise LmrecError(f"--auth must be mutate or all, got {auth!r}")
    for name, v in (("--deadline-ms", deadline_ms), ("--shutdown-timeout", shutdown_timeout)):
        if v <= 0:
            raise LmrecError(f"{name} must be > 0, got {v}")
    if drain_seconds < 0:
        raise LmrecError(f"--drain-seconds must be ≥ 0, got {drain_seconds}")


def _open_mutation(host: str, key: str | None, allowed: bool, auth: str) -> None:
    """Without an API key the service listens on loopback only, unless --allow-open-mutation says otherwise."""
    import ipaddress

    if key is not None:
        _log(f"API key set: {'every endpoint but /health/*' if auth == 'all' else 'POST /items'} needs it")
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allowed:
        raise LmrecError(f"--host {host} without an API key would let anyone who reaches it add items: set "
                         "LMREC_API_KEY or --api-key-file, or pass --allow-open-mutation")
    _log(f"no API key: POST /items (adding items) is open to anyone who can reach {host}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (what a training command wrote); runs nested "
                                                    "in them (the quickstart's sasrec/, generative/) come along."),
    out: Path = typer.Option(Path("report.html"), help="Output HTML file (self-contained, images embedded)."),
    title: str = typer.Option(None, help="Page title."),
):
    """One HTML report: training curves (loss, learning rate, validation metrics), the test metrics against
    every baseline, and for several runs a comparison."""
    from lmrec.training.report import write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise LmrecError(f"--out {out}: expected an .html file name")
    typer.echo(f"wrote {write_report(run_dirs, out, title=title)}")
