"""Where a sweep's MLflow tracking store is and how the driver reaches it: the tracking URI's checks,
credentials and masking, the driver's HTTP client settings, and the up-front server probe.

Tracking URI precedence: ``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > spec ``tracking.uri`` >
``sqlite:///<abs cwd>/mlflow.db``. File stores (``file://``, bare paths) are refused (MLflow 3 raises on
them); ``check_uri_scheme`` is that one rule, for the spec, the command line and the resolved URI.

Credentials never leave the driver's environment: ``resolve_tracking_uri`` takes the user and password
out of a URI (``http://user:pw@host``, ``split_credentials``), hands them to MLflow through its
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables and returns the URI without them,
which is the only one used, stored (sweep.json, the pickled callback, the backlog) and shown; a spec's
``tracking.uri`` with credentials is refused (the spec is stored with the sweep). Every message quotes
URIs through ``mask_uri`` (userinfo and token-like query values as ``***``).

With an ``http(s)://`` URI the driver lowers MLflow's HTTP retries (defaults: 7 retries with backoff,
120 s timeout, i.e. minutes per call against a dead server) to 1 retry, no backoff and a 5 s timeout,
unless those ``MLFLOW_HTTP_REQUEST_*`` variables are set already (``DRIVER_HTTP_ENV``; it also stops the
client printing a "View run" URL for every closed run). ``check_tracking_server`` probes the server
before a sweep starts: unreachable is a ConfigError.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from fewshot.errors import ConfigError

#: MLflow client settings for the driver (only set where the variable is not set already)
DRIVER_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}  # no "View run" lines per closed run
#: the variables through which MLflow's client takes credentials
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
#: query parameters whose values are masked in messages
_SECRET_QUERY = re.compile(r"token|secret|password|passwd|pwd|key|auth|signature|credential|sig", re.I)
SUPPORTED = "use sqlite:///ABS/PATH/mlflow.db or http://host:port"


def split_credentials(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``(uri without user:password@, user, password)`` (percent-decoded; None where absent)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) if sep else None


def mask_uri(uri: str) -> str:
    """``uri`` fit for a message: userinfo as ``user:***@`` and token-like query values as ``***``."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if "@" in parts.netloc:  # (urlunsplit only where there is a host: it drops "//" of sqlite:////abs/path)
        userinfo, _, host = parts.netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        uri = urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if sep else f"***@{host}"))
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
        uri = uri.replace(f"?{parts.query}", f"?{query}", 1)
    return uri


def check_uri_scheme(uri: str, where: str) -> None:
    """ConfigError starting with ``where`` (``tracking.uri``, ``--tracking-uri``, ...) when ``uri`` names a file
    store (``file:`` or no scheme), which MLflow 3 refuses."""
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"{where}: '{mask_uri(uri)}' is not supported (MLflow 3 refuses file stores); {SUPPORTED}")


def use_credentials(user: Optional[str], password: Optional[str]) -> None:
    """Hand a URI's credentials to this process's MLflow client (its documented environment variables)."""
    for name, value in zip(CREDENTIAL_ENV, (user, password)):
        if value is not None:
            os.environ[name] = value


def resolve_tracking_uri(flag: Optional[str], spec_uri: Optional[str]) -> str:
    """The sweep's tracking URI (precedence in the module docstring) without credentials; credentials in
    ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` go to MLflow's variables, in a spec's ``tracking.uri``
    they are a ConfigError."""
    if spec_uri and any(split_credentials(spec_uri)[1:]):
        raise ConfigError(
            f"tracking.uri: '{mask_uri(spec_uri)}' holds credentials, which would be stored with the "
            "sweep's spec; remove them and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
            "or pass the URI with --tracking-uri"
        )
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = flag or env or spec_uri or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
    check_uri_scheme(uri, "--tracking-uri" if flag else "$MLFLOW_TRACKING_URI" if env else "tracking.uri")
    uri, user, password = split_credentials(uri)
    use_credentials(user, password)
    if not flag and env:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # processes started from here (Ray) do not inherit the password in it
    return uri


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_command(uri: str) -> str:
    """How to browse the runs of ``uri`` (printed at the end of a sweep)."""
    if is_http(uri):
        return f"open {mask_uri(uri)} (the MLflow server already serves these runs)"
    return f"mlflow ui --backend-store-uri {mask_uri(uri)}"


def artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: for a SQLite store, ``mlartifacts/`` beside the database
    file (as ``mlflow server`` does; MLflow's own default is ``./mlruns`` under whatever folder the driver
    runs in); for a server, None (the server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).expanduser().absolute().parent / "mlartifacts").as_uri()


def driver_http_env(uri: str) -> None:
    """Short MLflow HTTP retries/timeout for this process (``DRIVER_HTTP_ENV``), for http(s) URIs only."""
    if is_http(uri):
        for k, v in DRIVER_HTTP_ENV.items():
            os.environ.setdefault(k, v)


def make_client(uri: str):
    """An ``MlflowClient`` for ``uri`` whose logging stays off the progress view."""
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no DB-migration INFO on the progress view
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # no line per retried request
    return MlflowClient(tracking_uri=uri)


def error_reason(e: BaseException) -> str:
    """The short cause of an MLflow client error ("[Errno 111] Connection refused", "timed out", ...)."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if m:
        return m.group(0).strip()
    if "timed out" in text or "timeout" in text.lower():
        return "timed out"
    return " ".join(text.split())[:160]


def check_tracking_server(uri: str) -> None:
    """ConfigError naming ``uri`` and the fix when an http(s) tracking server does not answer (seconds at most)."""
    if not is_http(uri):
        return
    driver_http_env(uri)
    try:
        make_client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ConfigError(
            f"the MLflow tracking server {mask_uri(uri)} is not reachable ({error_reason(e)}); start the "
            "server (mlflow server --host HOST --port PORT --backend-store-uri sqlite:///ABS/PATH/mlflow.db) "
            "or pass --tracking-uri sqlite:///ABS/PATH/mlflow.db to track into a local file"
        ) from None
