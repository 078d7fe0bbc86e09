"""Write the configuration file of MLflow's basic-auth app (``mlflow server --app-name basic-auth``).

Runs in the init container of the MLflow Deployment (mounted from the ConfigMap ``mlflow-auth-config``)
and in ``tests/infra/test_mlflow_auth.py``. MLflow reads its auth settings from one INI file
(``MLFLOW_AUTH_CONFIG_PATH``) whose ``database_uri`` holds the database password, and configparser cannot
read environment variables; so the file is written at pod start from the environment, into a memory-backed
volume, readable by the server's user only. The admin user and its password are not written: MLflow takes
them from ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` (Secret ``mlflow-auth``).

Environment:
    MLFLOW_AUTH_DATABASE_URI: SQLAlchemy URI of the user/permission store (required).
    MLFLOW_AUTH_DEFAULT_PERMISSION: what a user may do with a resource nobody granted them
        (default ``NO_PERMISSIONS``: patient-derived artefacts are visible only to their creator, to
        admins and to users granted access).

Usage: ``python auth_config.py <path of the INI file to write>``; exit status 2 on a missing setting.
"""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path

DATABASE_URI_ENV = "MLFLOW_AUTH_DATABASE_URI"
DEFAULT_PERMISSION_ENV = "MLFLOW_AUTH_DEFAULT_PERMISSION"
DEFAULT_PERMISSION = "NO_PERMISSIONS"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
AUTHORIZATION_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"
#: The file holds the database password: owner read/write only.
FILE_MODE = 0o600
USAGE_ERROR = 2


def auth_config(database_uri: str, default_permission: str = DEFAULT_PERMISSION) -> configparser.ConfigParser:
    """The ``[mlflow]`` section MLflow's ``read_auth_config`` expects.

    Raises:
        ValueError: an empty URI or an unknown permission.
    """
    if not database_uri:
        raise ValueError(f"{DATABASE_URI_ENV} is empty: the auth app needs a database for users and permissions")
    if default_permission not in PERMISSIONS:
        raise ValueError(f"{DEFAULT_PERMISSION_ENV}={default_permission!r} is not one of {', '.join(PERMISSIONS)}")
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": default_permission,
        # MLflow reads the file with configparser's interpolation: a literal % (percent-encoded URI) is %%
        "database_uri": database_uri.replace("%", "%%"),
        "authorization_function": AUTHORIZATION_FUNCTION,
    }
    return config


def write_auth_config(path: Path, database_uri: str, default_permission: str = DEFAULT_PERMISSION) -> Path:
    """Write :func:`auth_config` to ``path`` with mode 0600 (created so, never world-readable)."""
    config = auth_config(database_uri, default_permission)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(descriptor, "w") as handle:
        config.write(handle)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(__file__).name} <basic_auth.ini to write>", file=sys.stderr)
        return USAGE_ERROR
    try:
        written = write_auth_config(
            Path(argv[0]),
            os.environ.get(DATABASE_URI_ENV, ""),
            os.environ.get(DEFAULT_PERMISSION_ENV) or DEFAULT_PERMISSION,
        )
    except ValueError as error:
        print(f"auth_config: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(f"auth_config: wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
