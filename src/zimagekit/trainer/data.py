"""Where batches come from, with a position that resumes exactly."""

from __future__ import annotations

import zlib
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import ZImageKitError


class DataSource(Protocol):
    """Batches plus a resumable position: after ``load_state_dict(s)`` the source yields
    exactly the batches it yielded after ``s = state_dict()`` was taken."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class IndexDataSource:
    """Batches of a finite, indexable dataset, ``make_batch(indices)``, in a shuffled order.

    Epoch e visits the ``size`` indices in a permutation drawn from ``(seed, e)`` alone and
    yields ``size // batch_size`` batches (the short remainder is skipped), so the position
    is two integers and batch i is the same whenever and wherever it is drawn. Keep
    ``make_batch`` a deterministic function of the indices (a scene from
    ``shapes.world.sample_scene(index)``, say) and the whole data stream is reproducible.

    With ``buckets`` (a bucket id per index, e.g. an aspect-ratio bucket) every batch comes
    from one bucket: each bucket is shuffled and cut into full batches, and the batches of
    all buckets are shuffled together (a bucket smaller than a batch is never drawn).

    Data-parallel: with ``world_size`` processes the order is cut into global batches of
    ``batch_size * world_size`` items and process ``rank`` gets slice ``rank`` of each, so
    the processes together draw exactly what one process with the global batch would.
    """

    def __init__(self, make_batch: Callable[[list[int]], Any], size: int, batch_size: int, seed: int = 0,
                 buckets=None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.global_batch = batch_size * world_size
        if batch_size < 1 or size < self.global_batch:
            raise ZImageKitError(f"a dataset of {size} items cannot give batches of {self.global_batch}; "
                                 f"lower train.batch_size or use more data")
        if seed < 0:
            raise ZImageKitError(f"data seed must be >= 0, got {seed}")
        self.make_batch, self.size, self.batch_size, self.seed = make_batch, size, batch_size, seed
        self.rank = rank
        self.buckets = None if buckets is None else np.asarray(buckets)
        if self.buckets is not None:
            if len(self.buckets) != size:
                raise ZImageKitError(f"{len(self.buckets)} bucket ids for {size} items; give one per item")
            if np.bincount(np.unique(self.buckets, return_inverse=True)[1]).max() < self.global_batch:
                raise ZImageKitError(f"no bucket holds a full batch of {self.global_batch}; lower train.batch_size")
        self.epoch, self.offset = 0, 0  # offset counts items drawn in this epoch (whole global batches)
        self._batches_epoch, self._batches = -1, None  # the batch list of epoch _batches_epoch

    def _epoch_batches(self) -> list[np.ndarray]:
        if self._batches_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            bs = self.global_batch
            if self.buckets is None:
                order = rng.permutation(self.size)
                self._batches = [order[i:i + bs] for i in range(0, self.size - bs + 1, bs)]
            else:
                batches = []
                for bucket in np.unique(self.buckets):
                    members = np.flatnonzero(self.buckets == bucket)
                    members = members[rng.permutation(len(members))]
                    batches += [members[i:i + bs] for i in range(0, len(members) - bs + 1, bs)]
                self._batches = [batches[i] for i in rng.permutation(len(batches))]
            self._batches_epoch = self.epoch
        return self._batches

    def next_batch(self) -> Any:
        if self.offset // self.global_batch >= len(self._epoch_batches()):
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._epoch_batches()[self.offset // self.global_batch]
        self.offset += self.global_batch
        return self.make_batch(batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist())

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _bucket_key(self) -> int:
        return 0 if self.buckets is None else zlib.crc32(np.ascontiguousarray(self.buckets, dtype=np.int64).tobytes())

    def state_dict(self) -> dict:
        # The global batch, not this process's share: a position means the same on any
        # number of processes.
        return {"epoch": self.epoch, "offset": self.offset, "size": self.size, "batch_size": self.global_batch,
                "seed": self.seed, "buckets": self._bucket_key()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("size", self.size), ("batch_size", self.global_batch), ("seed", self.seed),
                          ("buckets", self._bucket_key())):
            if state.get(key, 0) != mine:
                raise ZImageKitError(f"the checkpoint's data source had {key}={state.get(key)}, this one has {mine}; "
                                     "resume with the same data or start a new run")
        self.epoch, self.offset = state["epoch"], state["offset"]
