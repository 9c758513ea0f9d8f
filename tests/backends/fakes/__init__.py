"""Local stand-ins for the hosted image providers, implementing their documented request and reply
shapes, error bodies, rate limiting and job flows; served over real HTTP by
``tests.support.server.live_server``."""

from .base import FakeProvider, Recorded, batch_seed, color_of, png_bytes, served
from .fal import FakeFal
from .openai import FakeOpenAI
from .replicate import FakeReplicate
from .runware import FakeRunware
from .together import FakeTogether

__all__ = [
    "FakeFal",
    "FakeOpenAI",
    "FakeProvider",
    "FakeReplicate",
    "FakeRunware",
    "FakeTogether",
    "Recorded",
    "batch_seed",
    "color_of",
    "png_bytes",
    "served",
]
