"""The bearer-token check, on raw header bytes so the admission middleware can run it before any body byte."""

from __future__ import annotations

import ipaddress
import secrets

from pydantic import SecretStr

AUTH_HINT = "send 'Authorization: Bearer <token>' with the server's AEPO_REWARD_TOKEN"


def bearer_problem(authorization: bytes | None, token: SecretStr | None) -> str | None:
    """Why this Authorization header does not carry the server's token, or None if it does (or no token is set)."""
    if token is None:
        return None
    scheme, _, given = (authorization or b"").partition(b" ")
    if authorization is None or scheme.lower() != b"bearer" or not given.strip():
        return f"missing bearer token: {AUTH_HINT}"
    # compare_digest: the time taken must not tell how much of a guessed token was right.
    if not secrets.compare_digest(given.strip(), token.get_secret_value().encode()):
        return f"wrong bearer token: {AUTH_HINT}"
    return None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, `localhost`)."""
    if host.strip("[]").lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as reachable from outside


def token_required_problem(host: str, token: SecretStr | None) -> str | None:
    """Why a server bound to `host` must not start without a token, or None if it may."""
    if token is not None or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host} without a bearer token: anyone who can reach that address could "
        "submit verifications. Set AEPO_REWARD_TOKEN (e.g. `export AEPO_REWARD_TOKEN=$(openssl rand -hex 32)`; "
        "clients send the same value), or bind 127.0.0.1."
    )
