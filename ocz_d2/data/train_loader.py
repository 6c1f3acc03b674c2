"""A training data loader whose data can be restored at any iteration: exact resume.

Detectron2's loader draws an endless shuffled stream from one generator and its augmentations
from each process's global random state, so a run resumed from a checkpoint sees other batches
than a run that never stopped. Here every random choice is a function of the seed and of a
position, never of what ran before:

- the stream: position ``p`` (0, 1, 2, ... over all processes) is image
  ``permutation(seed, epoch)[p % N]`` with ``epoch = p // N``; process ``r`` of ``W`` takes the
  positions ``r, r + W, r + 2W, ...``;
- the batches: each process groups its positions into batches of ``IMS_PER_BATCH / W`` in
  stream order, by aspect ratio (wide / tall) when ``DATALOADER.ASPECT_RATIO_GROUPING`` is on,
  as Detectron2's ``AspectRatioGroupedDataset`` does; batch ``t`` is therefore fixed, and a
  loader started at iteration ``t`` replays the grouping from the start without reading images;
- the augmentations of position ``p``: ``random``, ``numpy`` and ``torch`` are seeded from
  ``(seed, p)`` around the mapper call (and restored after it in the main process).

Batch ``t`` is mapped by worker ``(t - start) % NUM_WORKERS``, and the DataLoader returns the
workers' outputs in turn, so the batches come in order whatever the number of workers. Together
with :class:`~ocz_d2.engine.trainer.ZeroShotTrainerBase`, which seeds the random state of each
iteration from ``(seed, iteration, rank)``, a run resumed after a kill gives the losses and the
final model of a run that never stopped (bit for bit on CPU, where the operations are
deterministic).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = [
    "ResumableTrainLoader",
    "batch_plan",
    "build_resumable_train_loader",
    "derive_seed",
    "seeded_rngs",
    "seed_all_rngs",
]

logger = logging.getLogger(__name__)


def derive_seed(*values: int) -> int:
    """A 32-bit seed that mixes ``values`` (e.g. a run's seed and a position), well spread."""
    entropy = [int(v) % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_all_rngs(seed: int) -> None:
    """Seed ``random``, ``numpy``'s global state and ``torch`` (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global state is what augmentations draw from)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed ``random``, ``numpy`` and ``torch`` (CPU) inside the block; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    # The CPU generator only: torch.manual_seed would also seed (and leave seeded) every
    # accelerator's generator, and where CUDA is absent it queues the seed with a captured
    # stack, a fifth of the miniature's loader time (RESULTS.md).
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.set_rng_state(torch_state)


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The image order of one pass over a dataset of ``size`` images."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(size)


def batch_plan(
    size: int,
    *,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    buckets: Sequence[int] | None = None,
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """The endless sequence of one process's batches, from iteration 0.

    Args:
        size: number of images.
        seed: the run's data seed.
        batch_size: images per batch of this process.
        rank, world_size: this process and the number of processes.
        buckets: per image, the group it is batched with (aspect ratio); None: one group.

    Yields:
        ``(iteration, [(position, image index), ...])``.
    """
    if size < 1:
        raise ValueError("the training set is empty")
    pending: dict[int, list[tuple[int, int]]] = {}
    iteration, position, epoch, order = 0, rank, -1, None
    while True:
        if position // size != epoch:
            epoch = position // size
            order = epoch_permutation(seed, epoch, size)
        index = int(order[position % size])
        group = pending.setdefault(buckets[index] if buckets is not None else 0, [])
        group.append((position, index))
        if len(group) == batch_size:
            yield iteration, list(group)
            group.clear()
            iteration += 1
        position += world_size


def _identity(x):
    return x


class _BatchStream(IterableDataset):
    """Mapped batches from iteration ``start`` on; a DataLoader worker maps every
    ``num_workers``-th of them."""

    def __init__(self, dataset, mapper, *, seed, start, batch_size, rank, world_size, buckets):
        self.dataset, self.mapper = dataset, mapper
        self.seed, self.start = int(seed), int(start)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.buckets = buckets

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = batch_plan(
            len(self.dataset),
            seed=self.seed,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            buckets=self.buckets,
        )
        for iteration, group in plan:
            if iteration < self.start or (iteration - self.start) % workers != worker:
                continue
            yield [self._map(position, index) for position, index in group]

    def _map(self, position: int, index: int) -> dict:
        with seeded_rngs(derive_seed(self.seed, position)):
            sample = self.mapper(self.dataset[index])
        if sample is None:
            raise RuntimeError(
                f"the mapper returned None for training image {index}: the resumable loader "
                "needs a sample for every image"
            )
        return sample


class ResumableTrainLoader:
    """Iterable of per-process training batches (lists of mapped dicts) that can start at any
    iteration with the batches an uninterrupted run would see there (module docstring).

    Call :meth:`set_start` before iterating; each ``iter()`` starts afresh at that iteration.
    """

    def __init__(
        self,
        dataset_dicts: list[dict],
        mapper,
        *,
        total_batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            dataset_dicts: the training records (with ``width`` and ``height`` when grouping).
            mapper: record -> model input (e.g. ``ZeroShotSemSegDatasetMapper(cfg, True)``).
            total_batch_size: images per iteration over all processes.
            aspect_ratio_grouping: batch wide and tall images apart (Detectron2's rule).
            num_workers: DataLoader worker processes (0: map in this process).
            seed: the data seed (see :meth:`set_start`).
        """
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        if total_batch_size < 1 or total_batch_size % self.world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple of the "
                f"number of processes ({self.world_size})"
            )
        self.batch_size = total_batch_size // self.world_size
        self.buckets = (
            [0 if d["width"] > d["height"] else 1 for d in dataset_dicts]
            if aspect_ratio_grouping
            else None
        )
        self.dataset = DatasetFromList(dataset_dicts, copy=False)
        self.mapper = mapper
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.start_iter = 0

    def set_start(self, iteration: int, seed: int | None = None) -> None:
        """Start the next ``iter()`` at ``iteration`` (with the data seed ``seed``, if given)."""
        self.start_iter = int(iteration)
        if seed is not None:
            self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        stream = _BatchStream(
            self.dataset,
            self.mapper,
            seed=self.seed,
            start=self.start_iter,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            buckets=self.buckets,
        )
        if self.num_workers == 0:
            yield from stream
            return
        yield from DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity
        )


def build_resumable_train_loader(cfg, mapper, seed: int = 0) -> ResumableTrainLoader:
    """:class:`ResumableTrainLoader` over ``cfg.DATASETS.TRAIN`` with Detectron2's settings
    (``SOLVER.IMS_PER_BATCH``, ``DATALOADER.ASPECT_RATIO_GROUPING``, ``NUM_WORKERS``,
    ``FILTER_EMPTY_ANNOTATIONS``); ``DATALOADER.SAMPLER_TRAIN`` must be ``TrainingSampler``."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: the resumable loader "
            "implements TrainingSampler only"
        )
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    logger.info(
        "Resumable training loader: %d images, %d worker(s)", len(dicts), cfg.DATALOADER.NUM_WORKERS
    )
    return ResumableTrainLoader(
        dicts,
        mapper,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
    )
