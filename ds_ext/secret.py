"""The per-run secret that authenticates AsyncFlow's connections (:mod:`ds_ext.asyncflow.transport`).

``ds-ext`` (:mod:`ds_ext.launch`) makes one per single-node run with :func:`make_secret_file` -- 32 random bytes as
hex in a new 0600 file inside a new 0700 directory -- hands its path to every rank in ``DS_EXT_RUN_SECRET_FILE`` and
removes it when it exits. The secret itself is never put in an environment variable, a command line or a log.
Several nodes (or the plain ``deepspeed`` launcher): set ``DS_EXT_RUN_SECRET_FILE`` yourself, the same secret on
every node; :func:`run_secret` refuses a run without one, saying this.
"""
from __future__ import annotations

import os
import secrets
import stat
from typing import Optional

SECRET_FILE_ENV = "DS_EXT_RUN_SECRET_FILE"


class SecretError(RuntimeError):
    """The run secret is missing, unreadable, too short or readable by others."""


def make_secret_file(directory: Optional[str] = None) -> str:
    """A new per-run secret in a fresh 0700 directory, the file 0600; returns the file's path (``ds-ext``)."""
    import tempfile
    root = tempfile.mkdtemp(prefix="ds_ext_run_", dir=directory)
    path = os.path.join(root, "secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def remove_secret_file(path: str) -> None:
    for p in (path, os.path.dirname(path)):
        try:
            os.rmdir(p) if p != path else os.unlink(p)
        except OSError:
            pass


def run_secret() -> bytes:
    """The per-run secret (the file named by ``DS_EXT_RUN_SECRET_FILE``); refuses a missing, short, or
    group/other-readable file, naming the variable and what to do."""
    path = os.environ.get(SECRET_FILE_ENV)
    if not path:
        raise SecretError(
            f"AsyncFlow's rollout transport needs a per-run secret and {SECRET_FILE_ENV} is not set: start the run "
            f"with ds-ext (it makes one), or write a random secret (e.g. `python -c 'import secrets; "
            f"print(secrets.token_hex(32))'`) to a file only you can read (chmod 600), the same on every node, and "
            f"set {SECRET_FILE_ENV} to its path")
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise SecretError(f"{SECRET_FILE_ENV}={path}: cannot read the run secret ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{SECRET_FILE_ENV}={path}: the run secret is readable by others "
                             f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if len(key) < 32:
        raise SecretError(f"{SECRET_FILE_ENV}={path}: the run secret is {len(key)} bytes, at least 32 needed")
    return key
