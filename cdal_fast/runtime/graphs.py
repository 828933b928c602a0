"""CUDA-graph replay of a whole sampler (the ``graphs`` backend).

A graph replays fixed shapes, so batches are padded to a captured batch size (a slide's smaller
last batch reuses the graph of the full ones) and at most :data:`MAX_GRAPHS` graphs are kept, all
in one shared memory pool. Sharing is safe here because replays are serial on one stream and each
replay's outputs are cloned before any other graph runs.

Capture uses the thread-local capture-error mode, so the DataLoader's pin-memory thread may keep
allocating while the sampler is captured; the whole call runs under ``torch.inference_mode()`` so
the static buffers never depend on the caller's grad mode; everything happens on the input's device.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..sampling.sampler import SamplerLike, copy_sampler_attrs

__all__ = ["GraphedSampler", "MAX_GRAPHS", "capture_batch", "pad_batch", "INPUT_LAYOUT"]

WARMUP_CALLS = 2  # cuDNN autotuning and the caching allocator settle before capture
MAX_GRAPHS = 4  # distinct (batch, tile shape, dtype) graphs kept; the least recently used is freed
# sampler input -> (batch axis, vote-major): image (B, ...), x_init (V*B, ...), z / post (T, V*B, ...)
INPUT_LAYOUT = ((0, False), (0, True), (1, True), (1, True))


def capture_batch(batch: int, captured: list[int]) -> int:
    """The batch size to run ``batch`` tiles at: the smallest captured one that holds them (padding
    is cheaper than a new graph and its memory), else ``batch`` itself (a new capture)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    fits = [c for c in captured if c >= batch]
    return min(fits) if fits else batch


def pad_batch(t: torch.Tensor, axis: int, votes: int, capacity: int) -> torch.Tensor:
    """``t`` with its batch axis padded by zero tiles to ``capacity`` tiles.

    With ``votes > 1`` the axis is vote-major (row ``v * B + b``), so each vote's block of B rows is
    padded on its own and real row ``v * B + b`` lands on ``v * capacity + b``.
    """
    rows = t.shape[axis]
    if rows % votes:
        raise ValueError(f"batch axis {axis} of shape {tuple(t.shape)} is not a multiple of {votes} votes")
    batch = rows // votes
    if batch > capacity:
        raise ValueError(f"cannot pad a batch of {batch} down to {capacity}")
    if batch == capacity:
        return t
    split = (*t.shape[:axis], votes, batch, *t.shape[axis + 1:])
    out = t.new_zeros((*t.shape[:axis], votes, capacity, *t.shape[axis + 1:]))
    out.narrow(axis + 1, 0, batch).copy_(t.reshape(split))
    return out.reshape(*t.shape[:axis], votes * capacity, *t.shape[axis + 1:])


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class GraphedSampler(torch.nn.Module):
    """Replays the whole T-step sampler as a CUDA graph per captured batch size and tile shape.

    Inputs are padded and copied into static buffers, the graph is replayed and the real rows of
    the outputs are cloned, which removes the per-kernel launch overhead that dominates small batches.
    """

    def __init__(self, sampler: SamplerLike) -> None:
        super().__init__()
        self.sampler = sampler
        copy_sampler_attrs(self, sampler)
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool: tuple | None = None

    def _capture(self, inputs: list[torch.Tensor]) -> _Graph:
        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.sampler(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.sampler(*static)
        return _Graph(graph, static, tuple(outputs))

    @torch.inference_mode()
    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.cuda.device(image.device):
            batch = image.shape[0]
            shapes = {k[0]: k for k in self._graphs if k[1:] == (tuple(image.shape[1:]), image.dtype)}
            capacity = capture_batch(batch, sorted(shapes))
            inputs = [pad_batch(t.to(image.device, image.dtype), axis, self.votes if vote_major else 1, capacity)
                      for t, (axis, vote_major) in zip((image, x_init, z, post), INPUT_LAYOUT)]
            key = (capacity, tuple(image.shape[1:]), image.dtype)
            if key not in self._graphs:
                while len(self._graphs) >= MAX_GRAPHS:
                    self._graphs.popitem(last=False)  # its graph and buffers go back to the shared pool
                self._graphs[key] = self._capture(inputs)
            self._graphs.move_to_end(key)
            entry = self._graphs[key]
            for dst, src in zip(entry.static, inputs):
                dst.copy_(src)
            entry.graph.replay()
            return tuple(o[:batch].clone() for o in entry.outputs)
