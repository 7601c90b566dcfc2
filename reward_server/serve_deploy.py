"""The reward server as a Ray Serve deployment: the same FastAPI app, `replicas` copies.

    ray.init(...)
    base_url = deploy(replicas=1)          # http://127.0.0.1:<port>
    RewardClient(base_url).verify_sync(items)

Each replica runs its own verifier worker processes (not Ray tasks: they must be killable at a
deadline), so a replica reserves `num_cpus` (default 0) but uses up to `settings.workers` cores.
"""

from __future__ import annotations

import ipaddress
import time

import httpx
from ray import serve

from reward_server.auth import token_required_problem
from reward_server.main import create_app
from reward_server.settings import RewardSettings
from services.backends.network import free_port

DEFAULT_APP_NAME = "aepo-reward"


@serve.deployment(name="RewardServer")
@serve.ingress()
class RewardDeployment:
    """One replica: builds the app from the settings it was bound with (late-bound ingress)."""

    def __init__(self, settings: RewardSettings | dict | None = None) -> None:
        _keep_replica_grpc_on_loopback()
        if isinstance(settings, RewardSettings):
            self._settings = settings
        else:
            self._settings = RewardSettings(**(settings or {}))

    def __serve_build_asgi_app__(self):
        """Called by Serve after __init__: this replica's FastAPI app."""
        return create_app(self._settings)


def _keep_replica_grpc_on_loopback() -> None:
    """On a loopback node, bind this replica's inter-deployment gRPC server to the node's address.

    Serve 2.60 starts that server on `[::]:0` in every replica, hard-coded (replica.py,
    `_on_initialized`, which runs after this constructor), so on a laptop or CI machine it would
    listen on every interface. A node Ray runs on 127.0.0.1 is a local cluster: there the server
    gets the node's address; on any other node Serve's choice is left alone.
    """
    import ray
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_aepo_loopback", False):
        return
    if not ipaddress.ip_address(node_ip).is_loopback:
        return

    def bind(server, address: str):
        if address.startswith("[::]:"):
            address = f"{node_ip}:{address[len('[::]:'):]}"
        return original(server, address)

    bind._aepo_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind


def _serve_http_address(http_port: int | None) -> tuple[str, int, str]:
    """Start Serve on 127.0.0.1 if it is not running; the proxy's (host to call, port, bound host) either way."""
    # Private, but Serve has no public accessor for the running proxy's address.
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        # one proxy, on the driver's node (the head): the driver is its only client, and a proxy per
        # node would contend for one port where several nodes share an address (127.0.0.1)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port or free_port()})
    config = _get_global_client().http_config
    bound = config.host or "0.0.0.0"
    host = "127.0.0.1" if bound in ("0.0.0.0", "::") else bound
    return host, config.port, bound


def deploy(
    replicas: int = 1,
    route_prefix: str = "/",
    settings: RewardSettings | dict | None = None,
    *,
    name: str = DEFAULT_APP_NAME,
    http_port: int | None = None,
    num_cpus: float = 0.0,
    ready_timeout_s: float = 180.0,
    resources: dict[str, float] | None = None,
) -> str:
    """Deploy (or update) the reward server in the current Ray cluster; return its base URL.

    Call inside an initialised Ray (`ray.init`). Starts Serve on 127.0.0.1 (on `http_port`, else
    a free port) unless it already runs, and returns once GET /readyz answers 200. Refuses (RuntimeError)
    when Serve's proxy listens beyond loopback and the settings carry no token.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("deploy() needs an initialised Ray: call ray.init(...) first")
    settings = settings if settings is not None else RewardSettings()
    if isinstance(settings, dict):
        settings = RewardSettings(**settings)
    host, port, bound = _serve_http_address(http_port)
    problem = token_required_problem(bound, settings.token)
    if problem:  # Serve's proxy listens beyond this machine: same rule as `aepo serve-reward`
        raise RuntimeError(f"Ray Serve's HTTP proxy is bound to {bound}: {problem}")
    options = {"num_cpus": num_cpus, **({"resources": dict(resources)} if resources else {})}
    app = RewardDeployment.options(num_replicas=replicas, ray_actor_options=options).bind(settings)
    serve.run(app, name=name, route_prefix=route_prefix)
    base_url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    _wait_ready(base_url, ready_timeout_s)
    return base_url


def _wait_ready(base_url: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < end:
        try:
            r = httpx.get(base_url + "/readyz", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"reward server at {base_url} not ready after {timeout_s}s: {last}")


def undeploy(name: str = DEFAULT_APP_NAME) -> None:
    """Remove the reward-server application (Serve itself keeps running)."""
    serve.delete(name)
