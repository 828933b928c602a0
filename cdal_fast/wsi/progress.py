"""Progress of a run: done/total tiles of the current input (with an ETA) and which input of how many.

Jobs learn their tile count only after planning (tissue detection, volume size), so they report it
through :meth:`TileProgress.set_total` before sampling, then :meth:`TileProgress.update` per batch.
"""

from __future__ import annotations

from typing import Protocol

from tqdm import tqdm

__all__ = ["TileProgress", "NullProgress", "TqdmProgress"]


class TileProgress(Protocol):
    """What a job reports while it runs."""

    def set_total(self, tiles: int) -> None: ...

    def update(self, tiles: int) -> None: ...


class NullProgress:
    """Reports nothing (library calls, quiet runs)."""

    def set_total(self, tiles: int) -> None:
        pass

    def update(self, tiles: int) -> None:
        pass


class TqdmProgress:
    """A tqdm bar per input: ``[2/5] a.svs: 3/12 tile [00:21<01:03, 7.04s/tile]``."""

    def __init__(self, name: str, index: int, count: int, enabled: bool = True) -> None:
        self.bar = tqdm(desc=f"[{index}/{count}] {name}", unit="tile", total=None, disable=not enabled,
                        leave=False, dynamic_ncols=True)

    def set_total(self, tiles: int) -> None:
        self.bar.total = tiles
        self.bar.refresh()

    def update(self, tiles: int) -> None:
        self.bar.update(tiles)

    def close(self) -> None:
        self.bar.close()
