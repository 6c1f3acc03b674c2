"""Initialisation that does not depend on which other components a config builds.

Two configs that differ in one component (say, with and without ORA) should start every shared
component from the same weights and see the same data order, so that their difference on a seed
measures the component, not a reshuffled initialisation. Each component is therefore built from
its own random stream, derived from ``cfg.SEED`` and the component's name, and building it leaves
the global RNG as it was (the data loader's seeds are drawn from it later).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["component_seed"]


@contextmanager
def component_seed(seed: int, name: str) -> Iterator[None]:
    """Build a component from its own random stream.

    Args:
        seed: the run's seed (``cfg.SEED``); a negative seed (Detectron2's "random") leaves the
            global RNG in charge, as before.
        name: the component, e.g. "pixel_decoder"; different names give independent streams.
    """
    if seed < 0:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{int(seed)}:{name}".encode()))
        yield
