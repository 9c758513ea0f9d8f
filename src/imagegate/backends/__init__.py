"""Backend registry: built-in and third-party backends register through the same pluggy hook.

A plugin package declares an entry point in the ``imagegate`` group whose module has::

    @imagegate.backends.hookimpl
    def register_backends(register):
        register("mybackend", MyBackend)     # MyBackend(settings) -> Backend
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from imagegate.backends.base import Backend
from imagegate.config import Settings

BackendFactory = Callable[[Settings], Backend]
Register = Callable[[str, BackendFactory], None]

hookspec = pluggy.HookspecMarker("imagegate")
hookimpl = pluggy.HookimplMarker("imagegate")


class BackendHooks:
    @hookspec
    def register_backends(self, register: Register) -> None:
        """Register backend factories by name."""


def load_backend_factories() -> dict[str, BackendFactory]:
    from imagegate.backends import builtin

    manager = pluggy.PluginManager("imagegate")
    manager.add_hookspecs(BackendHooks)
    manager.register(builtin, name="builtin_backends")
    manager.load_setuptools_entrypoints("imagegate")
    factories: dict[str, BackendFactory] = {}

    def register(name: str, factory: BackendFactory) -> None:
        if name in factories:
            raise ValueError(f"backend {name!r} is registered twice")
        factories[name] = factory

    manager.hook.register_backends(register=register)
    return factories


class Backends:
    """The backends one server uses, created on first use and closed together."""

    def __init__(self, settings: Settings, factories: dict[str, BackendFactory] | None = None):
        self._settings = settings
        self._factories = factories if factories is not None else load_backend_factories()
        self._instances: dict[str, Backend] = {}

    def known(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Backend:
        if name not in self._instances:
            self._instances[name] = self._factories[name](self._settings)
        return self._instances[name]

    def loaded_model_bytes(self) -> dict[str, int]:
        """Every model the created backends hold in memory, with its bytes."""
        return {model: size for backend in self._instances.values()
                for model, size in backend.loaded_model_bytes().items()}

    async def aclose(self) -> None:
        for backend in self._instances.values():
            await backend.aclose()
        self._instances.clear()
