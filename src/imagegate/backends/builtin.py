"""The backends that ship with imagegate, registered through the public hook like any plugin."""

from __future__ import annotations

from imagegate.backends import Register, hookimpl
from imagegate.backends.base import Backend
from imagegate.config import Settings


def _diffusers(settings: Settings) -> Backend:
    # Imported on first use: diffusers + torch take seconds to import.
    from imagegate.backends.diffusers import DiffusersBackend

    return DiffusersBackend(settings)


# Hosted providers (imagegate.backends.provider): imported on first use like diffusers.
def _runware(settings: Settings) -> Backend:
    from imagegate.backends.runware import RunwareBackend

    return RunwareBackend(settings)


def _fal(settings: Settings) -> Backend:
    from imagegate.backends.fal import FalBackend

    return FalBackend(settings)


def _replicate(settings: Settings) -> Backend:
    from imagegate.backends.replicate import ReplicateBackend

    return ReplicateBackend(settings)


def _together(settings: Settings) -> Backend:
    from imagegate.backends.together import TogetherBackend

    return TogetherBackend(settings)


def _openai(settings: Settings) -> Backend:
    from imagegate.backends.openai import OpenAIBackend

    return OpenAIBackend(settings)


def _simulated(settings: Settings) -> Backend:
    from imagegate.backends.simulated import SimulatedBackend

    return SimulatedBackend(settings)


@hookimpl
def register_backends(register: Register) -> None:
    register("diffusers", _diffusers)
    register("simulated", _simulated)
    register("runware", _runware)
    register("fal", _fal)
    register("replicate", _replicate)
    register("together", _together)
    register("openai", _openai)
