"""The backends that ship with imagegate, registered through the public hook like any plugin."""

from __future__ import annotations

from imagegate.backends import Register, hookimpl
from imagegate.backends.base import Backend
from imagegate.config import Settings


def _diffusers(settings: Settings) -> Backend:
    # Imported on first use: diffusers + torch take seconds to import.
    from imagegate.backends.diffusers import DiffusersBackend

    return DiffusersBackend(settings)


@hookimpl
def register_backends(register: Register) -> None:
    register("diffusers", _diffusers)
