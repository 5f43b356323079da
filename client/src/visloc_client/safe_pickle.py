"""A restricted unpickler: builtin containers and scalars only, never code.

Upstream ships ``cells_assignments.pkl`` (dict of sets of ints) and the evaluation metadata
(dict of dicts of strings) as pickles. A plain ``pickle.load`` would run whatever a crafted
file asks for; this one refuses every global except the container types those files need.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than builtin containers and scalars."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return getattr(__import__("builtins"), name)
        raise UnsafePickleError(f"refused to load {module}.{name}: only builtin containers and scalars are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a persistent id: only builtin containers and scalars are allowed")


def load(f: BinaryIO) -> Any:
    return RestrictedUnpickler(f).load()


def loads(data: bytes) -> Any:
    return load(io.BytesIO(data))


def load_path(path: str | os.PathLike[str]) -> Any:
    with open(path, "rb") as f:
        return load(f)
