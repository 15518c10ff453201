"""``kiln serve REPO``: every model of a repository behind a KServe v2 HTTP API (and gRPC with
``--grpc-port``; or as replicas on Ray Serve with ``--ray``)."""

from __future__ import annotations

from pathlib import Path

import typer

from modelkiln.delivery.crypto import resolve_model_key
from modelkiln.errors import BadInput, KilnError
from modelkiln.serve.config import parse_size
from modelkiln.serve.grpc import require_grpc
from modelkiln.serve.guard import ServeLimits
from modelkiln.serve.http import serve
from modelkiln.serve.model import LoadPolicy
from modelkiln.serve.ray import RayOptions, require_ray, serve_ray
from modelkiln.serve.security import ADMIN_KEY_ENV, API_KEY_ENV, Security, read_key


def serve_cmd(
    repository: Path = typer.Argument(
        ..., help="Model repository: <model>/config.yaml, <model>/<version>/model.onnx."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    grpc_port: int = typer.Option(
        None,
        "--grpc-port",
        help="Also serve KServe v2 gRPC (tritonclient.grpc) on this port, same models, keys and limits "
        "(needs pip install 'modelkiln[grpc]').",
    ),
    cores: int = typer.Option(None, "--cores", help="Cores the inference threads may use (default: all)."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body accepted (MB)."),
    allow_cpu_mismatch: bool = typer.Option(
        False,
        "--allow-cpu-mismatch",
        help="Serve INT8 models this CPU cannot run exactly (e.g. VNNI format without VNNI) instead of refusing them.",
    ),
    api_key_file: Path = typer.Option(
        None,
        "--api-key-file",
        help="File whose first line is the API key every route but health requires as "
        "'Authorization: Bearer KEY' (default: the KILN_API_KEY environment variable, if set).",
    ),
    admin_key_file: Path = typer.Option(
        None,
        "--admin-key-file",
        help="Key for model control (load, unload, repository index) instead of the API key "
        "(default: KILN_ADMIN_KEY, if set).",
    ),
    no_model_control: bool = typer.Option(
        False, "--no-model-control", help="Refuse load/unload/index over HTTP (403)."
    ),
    allowed_host: list[str] = typer.Option(
        None, "--allowed-host", help="Host name clients may use besides the bound address (repeat; '*': any)."
    ),
    allowed_origin: list[str] = typer.Option(
        None,
        "--allowed-origin",
        help="Browser origin (https://app.example.com) allowed to call the server (repeat; '*': any).",
    ),
    max_image_mpixels: float = typer.Option(40.0, "--max-image-mp", help="Largest image (megapixels)."),
    max_request_mpixels: float = typer.Option(
        80.0, "--max-request-mp", help="Most pixels of all images of one request (megapixels)."
    ),
    max_images: int = typer.Option(16, "--max-images", help="Most images in one chat request."),
    max_prompt_kb: float = typer.Option(
        1024.0, "--max-prompt-kb", help="Most text in one chat request (KiB)."
    ),
    max_output_mb: float = typer.Option(64.0, "--max-output-mb", help="Largest response body (MB)."),
    max_json_depth: int = typer.Option(64, "--max-json-depth", help="Deepest JSON nesting accepted."),
    body_timeout_s: float = typer.Option(
        60.0, "--body-timeout-s", help="Seconds a client may take to send a request body."
    ),
    header_timeout_s: float = typer.Option(
        10.0, "--header-timeout-s", help="Seconds a client may take to send a request's headers."
    ),
    keep_alive_s: float = typer.Option(5.0, "--keep-alive-s", help="Seconds an idle connection stays open."),
    ssl_certfile: Path = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM): serve HTTPS."),
    ssl_keyfile: Path = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
    model_key: Path = typer.Option(
        None,
        "--model-key",
        help="Key file for encrypted models (model.onnx.enc; default: KILN_MODEL_KEY_FILE or "
        "KILN_MODEL_KEY): decrypted in memory only.",
    ),
    memory_budget: str = typer.Option(
        None,
        "--memory-budget",
        help="Most memory the models may hold (700MB, 4GB, 1.5GiB): models load on first request "
        "(pin: true in config.yaml loads at start) and the least recently used idle ones are unloaded "
        "to make room. Default: every model loaded at start, none unloaded.",
    ),
    ray: bool = typer.Option(
        False,
        "--ray",
        help="Deploy as a Ray Serve application (RAY_ADDRESS, else a local Ray): replicas of this server "
        "behind Ray's HTTP proxy on --host/--port, same KServe v2 routes (needs pip install 'modelkiln[ray]').",
    ),
    replicas: str = typer.Option(
        None,
        "--replicas",
        help="With --ray: N replicas, 'auto' (Ray's autoscaling) or MIN-MAX (autoscale between). Default 1.",
    ),
    ray_ingress: str = typer.Option(
        "proxy",
        "--ray-ingress",
        help="With --ray: 'proxy' (Ray's HTTP proxy) or 'haproxy' (Ray's HAProxy ingress, for a Ray this "
        "command starts; less overhead per request, but it opens a stats page and a metrics port on all "
        "interfaces: docs/scale-out.md).",
    ),
    require_manifest: bool = typer.Option(
        False,
        "--require-manifest",
        help="Refuse models no package manifest lists (a listed model whose hash differs is always refused).",
    ),
) -> None:
    """Serve many models in one process (dynamic batching, priorities, Prometheus /metrics)."""
    try:
        limits = ServeLimits(
            max_body_bytes=int(max_body_mb * (1 << 20)),
            max_json_depth=max_json_depth,
            max_image_pixels=int(max_image_mpixels * 1e6),
            max_request_pixels=int(max_request_mpixels * 1e6),
            max_images=max_images,
            max_prompt_bytes=int(max_prompt_kb * 1024),
            max_output_bytes=int(max_output_mb * (1 << 20)),
            body_timeout_s=body_timeout_s,
            header_timeout_s=header_timeout_s,
            keep_alive_s=keep_alive_s,
        )
        security = Security(
            api_key=read_key(api_key_file, API_KEY_ENV),
            admin_key=read_key(admin_key_file, ADMIN_KEY_ENV),
            model_control=not no_model_control,
            allowed_hosts=tuple(allowed_host or ()),
            allowed_origins=tuple(allowed_origin or ()),
        )
        policy = LoadPolicy(allow_cpu_mismatch, resolve_model_key(model_key), require_manifest)
        budget = parse_size(memory_budget, "--memory-budget") if memory_budget is not None else None
    except KilnError as exc:
        raise BadInput(str(exc)) from None
    if grpc_port is not None:
        if not 1 <= grpc_port <= 65535 or grpc_port == port:
            raise BadInput(f"--grpc-port must be a port in 1..65535 other than --port, got {grpc_port}")
        require_grpc()
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise BadInput("--ssl-certfile and --ssl-keyfile go together")
    if (replicas is not None or ray_ingress != "proxy") and not ray:
        raise BadInput("--replicas and --ray-ingress go with --ray")
    if ray:
        if grpc_port is not None:
            raise BadInput("--grpc-port is not served through Ray: use --ray without it (docs/scale-out.md)")
        options = RayOptions(replicas or "1", cores, ingress=ray_ingress)
        options.deployment_options()  # a malformed --replicas fails before Ray is looked for
        require_ray()
        serve_ray(
            str(repository),
            host,
            port,
            options,
            limits,
            security,
            policy,
            budget,
            str(ssl_certfile) if ssl_certfile else None,
            str(ssl_keyfile) if ssl_keyfile else None,
        )
        return
    serve(
        str(repository),
        host,
        port,
        cores,
        limits=limits,
        security=security,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        policy=policy,
        grpc_port=grpc_port,
        memory_budget=budget,
    )
