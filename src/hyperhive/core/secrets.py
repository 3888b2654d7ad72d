"""The hive's secret store: credentials kept by hive-core outside every cage.

One file per secret in ``<state>/secrets/`` (the directory 0700, each file 0600,
owned by hive-core; no cage binds anything of the state directory but the agent's
own home). A value is written once, read only by the egress proxy when it swaps
a placeholder for it, and never returned by any verb, logged, put in an event, a
transcript or an error message: ``ls`` shows names and when they were set.

Why hive-core and not root: the proxy that injects a secret runs in hive-core, so
hive-core sees every value it injects whatever keeps them at rest; a root-held
store would add a root verb without taking anything from a compromised core.
"""

from __future__ import annotations

import os
import re
import secrets as _random
from dataclasses import dataclass
from pathlib import Path

SECRET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MAX_SECRET = 16 * 1024  # bytes: an API key or an OAuth token, never a file
PLACEHOLDER_PREFIX = "hive-placeholder-"


class SecretError(ValueError):
    """One line, never containing a secret's value."""


def check_secret_name(name: str) -> str:
    if not isinstance(name, str) or not SECRET_NAME.match(name):
        raise SecretError("a secret name is a letter then up to 63 letters, digits, '_' or '-'")
    return name


def check_value(value: str) -> str:
    """A value goes into an HTTP header: printable ASCII, no CR, LF or NUL."""
    if not value:
        raise SecretError("the secret's value is empty")
    if len(value.encode()) > MAX_SECRET:
        raise SecretError(f"the secret's value is over {MAX_SECRET} bytes")
    if any(not (0x20 <= ord(c) < 0x7F) for c in value):
        raise SecretError(
            "the secret's value must be printable ASCII (it goes in an HTTP header);"
            " a trailing newline is stripped by `hive secret set`"
        )
    if value != value.strip(" "):  # a header value can't start or end with one
        raise SecretError("the secret's value starts or ends with a space")
    return value


def new_placeholder() -> str:
    """What the cage sees instead of a secret: random, so it is worthless anywhere but
    at the proxy, and recognisable in a log."""
    return PLACEHOLDER_PREFIX + _random.token_hex(20)


@dataclass(frozen=True)
class SecretInfo:
    name: str
    set_at: float


class SecretStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    def _path(self, name: str) -> Path:
        return self.root / check_secret_name(name)

    def set(self, name: str, value: str) -> bool:
        """Store ``value`` (replacing any); True if the name is new."""
        path = self._path(name)
        check_value(value)
        new = not path.exists()
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, value.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return new

    def get(self, name: str) -> str | None:
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, SecretError):
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_SECRET + 1).decode("ascii", "replace")

    def remove(self, name: str) -> bool:
        try:
            self._path(name).unlink()
            return True
        except FileNotFoundError:
            return False

    def ls(self) -> list[SecretInfo]:
        out = []
        for p in sorted(self.root.iterdir()):
            if SECRET_NAME.match(p.name) and p.is_file():
                out.append(SecretInfo(p.name, p.stat().st_mtime))
        return out
