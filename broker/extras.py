"""The optional libraries a cloud profile kind needs, and the error that names the extra to install.

Checked with `find_spec`, without importing: the broker checks at config load (a `ConfigError` at
start), and a worker again when it builds its client, so a missing library is never a bare
ImportError from deep inside an SDK (whose own message names `anthropic[bedrock]`, not isopool's).
"""

from __future__ import annotations

import importlib.util

# kind -> (modules it imports, what they are, the extra that installs them)
_NEEDS = {
    "bedrock": (("botocore", "boto3"), "the AWS libraries (botocore, boto3)", "bedrock"),
    "vertex": (("google.auth", "requests"), "google-auth (with requests)", "vertex"),
    "azure-entra": (("azure.identity",), 'azure-identity, for auth = "entra"', "azure"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module entry set to None
        return False


def missing(kind: str, auth: str | None = None) -> str:
    """What a profile of `kind` (and `auth`) lacks, with the command that installs it; "" if nothing."""
    need = _NEEDS.get("azure-entra" if kind in ("azure", "foundry") and auth == "entra" else kind)
    if need is None or all(map(_importable, need[0])):
        return ""
    return f"kind \"{kind}\" needs {need[1]}: pip install 'isopool[{need[2]}]'"


def require(kind: str, auth: str | None = None) -> None:
    """ImportError naming the extra, when a profile of `kind` cannot run here."""
    if message := missing(kind, auth):
        raise ImportError(message)
