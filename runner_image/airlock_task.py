"""For agent code inside an Airlock task: read the task's token and secrets.

import airlock_task
jwt = airlock_task.token()                 # the task JWT, for the gateway and tools
db = airlock_task.secret("reporting-db")   # {"username", "password", "host", ...}
"""

import json
import os


def token():
    """The task's JWT (short-lived, names this task and its agent)."""
    with open(os.environ.get("AIRLOCK_TOKEN_FILE", "/run/airlock/token")) as fh:
        return fh.read().strip()


def secret(name):
    """One secret the task was granted, as a dict; KeyError if it was not granted."""
    directory = os.environ.get("AIRLOCK_SECRETS_DIR", "/run/airlock/secrets")
    try:
        with open(os.path.join(directory, os.path.basename(name))) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise KeyError(f"no secret named {name!r} was granted to this task") from None


def secrets():
    """Names of every secret the task was granted."""
    directory = os.environ.get("AIRLOCK_SECRETS_DIR", "/run/airlock/secrets")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []
