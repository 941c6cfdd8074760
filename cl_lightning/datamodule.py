"""The shared base of every benchmark: a LightningDataModule that serves one task at a time.

Data of a task lives as tensors; batches are cut by index tensors (no per-sample collate, no worker
processes), which keeps MNIST-scale benchmarks close to a plain PyTorch loop. Data sets too large for memory
hold image files instead (:class:`~cl_lightning.image_files.ImageFiles`): the same index tensors, decoded in
DataLoader worker processes; :meth:`ContinualDataModule._loader` is where that is decided. Sharding across ranks is
done here rather than by Lightning's DistributedSampler so that a global batch is the same set of
samples whatever the number of processes: 2 ranks see exactly the halves of the 1-rank batch.
"""

from __future__ import annotations

import functools
import inspect
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cl_lightning.augment import BatchAugmentation
from cl_lightning.tasks import BenchmarkInfo, Description, Scenario, Task

BatchTransform = Callable[[Tensor], Tensor]


class DataError(RuntimeError):
    """A data set on disk that cannot be used as it is (corrupt or truncated files); the message names the
    file and what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data set is neither on disk nor downloadable; the message says where to put it."""


class TaskData(Dataset):
    """One split of one task. Indexed with a tensor of indices, it returns a whole batch ``(x, y, t)``."""

    #: Whether indexing reads files (then the loader decodes batches in worker processes).
    reads_files = False

    def __init__(self, x: Tensor, y: Tensor, task_id: int, transform: BatchTransform | None = None):
        if len(x) != len(y):
            raise ValueError(f"inputs ({len(x)}) and targets ({len(y)}) differ in length")
        self.x, self.y, self.task_id, self.transform = x, y, task_id, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.x[idx]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[idx], torch.full((len(idx),), self.task_id, dtype=torch.long)

    def subset(self, idx: Tensor) -> TaskData:
        """The samples at ``idx``, same task and transform."""
        return TaskData(self.x[idx], self.y[idx], self.task_id, self.transform)


class ConcatTaskData(Dataset):
    """Several tasks served as one (joint training); a batch may mix tasks, each row keeps its id."""

    def __init__(self, parts: Sequence[TaskData]):
        self.parts = list(parts)
        self.offsets = torch.tensor([0] + [len(p) for p in self.parts]).cumsum(0)
        self.reads_files = any(p.reads_files for p in self.parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        which = torch.searchsorted(self.offsets, idx, right=True) - 1
        pieces = [self.parts[p][idx[which == p] - self.offsets[p]] for p in which.unique().tolist()]
        return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))  # type: ignore[return-value]


class ShardedBatchSampler(Sampler[Tensor]):
    """Yields, for this rank, its contiguous share of each global batch.

    The order depends only on ``(seed, epoch)``, so it is the same on every rank and after a resume.
    For training, each global batch is trimmed to a multiple of the world size so that every rank gets
    the same number of samples (DDP averages per-rank means; equal shards make that the global mean).
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, equal_shards: bool = True):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.equal_shards = rank, world_size, equal_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> Iterator[Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        for batch in order.split(self.batch_size):
            if self.equal_shards:
                batch = batch[: len(batch) - len(batch) % self.world_size]
            if len(batch):
                yield batch

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self._global_batches():
            shard = batch.tensor_split(self.world_size)[self.rank]
            if len(shard):
                yield shard

    def __len__(self) -> int:
        return sum(1 for _ in self.__iter__()) if not self.equal_shards else self._equal_len()

    def _equal_len(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest - rest % self.world_size > 0 else 0)


class ContinualDataModule(L.LightningDataModule, ABC):
    """Base of every benchmark: ``num_tasks`` tasks, served one at a time through :meth:`set_task`.

    ``train_dataloader`` serves the current task (tasks ``0..t`` when cumulative, for joint training);
    ``val_dataloader`` the current task's held-out split; ``test_dataloader`` one loader per task, so the
    ``dataloader_idx`` of a test batch is its task id. Every batch is ``(x, y, task_ids)``.

    Subclasses give :meth:`describe` (static, for :attr:`info`), :meth:`_load` and :meth:`_task_split`.
    All randomness that defines tasks comes from ``seed`` (the benchmark's own), never from the global
    RNG or the rank, so every process and every run with the same seed builds the same tasks.
    """

    def __init__(self, num_tasks: int, batch_size: int = 128, scenario: str = "task", seed: int = 0,
                 train_samples_per_task: int | None = None, val_fraction: float = 0.0,
                 eval_batch_size: int = 1000, augment: bool = True, num_workers: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = False):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be at least 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={eval_batch_size} must be at least 1")
        if train_samples_per_task is not None and train_samples_per_task < 1:
            raise ValueError(f"train_samples_per_task={train_samples_per_task} must be at least 1 (or null)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must not be negative")
        self.num_tasks = num_tasks
        #: Worker processes that decode batches of file-backed data (0: in this process); in-memory data
        #: never uses workers. ``pin_memory`` (on a CUDA machine) and ``persistent_workers`` (for the current
        #: task's train and val loaders) are DataLoader's options.
        self.num_workers, self.pin_memory, self.persistent_workers = num_workers, pin_memory, persistent_workers
        self.batch_size = batch_size
        self.scenario = Scenario.parse(scenario)
        self.seed = seed
        self.train_samples_per_task = train_samples_per_task
        self.val_fraction = val_fraction
        self.eval_batch_size = eval_batch_size
        #: Whether training batches get the benchmark's :meth:`train_augmentation` (never evaluation batches).
        self.augment = augment
        self.current_task = 0
        self.cumulative = False
        self._splits: dict[tuple[int, str], TaskData] | None = None

    # ----------------------------------------------------------------- what subclasses provide
    @abstractmethod
    def describe(self) -> Description:
        """Name, tasks, input shape, outputs per task and problem, without loading data."""

    @abstractmethod
    def _load(self) -> None:
        """Read the underlying data set into memory (called once per process)."""

    @abstractmethod
    def _task_split(self, task_id: int, split: str) -> TaskData:
        """``split`` is ``train`` (all training data of the task) or ``test``."""

    def train_augmentation(self) -> BatchAugmentation | None:
        """The augmentation of training batches as the benchmark's references do it, applied by the method on the
        batch's device (``None``: none, or ``augment=False``). Subclasses with one override this."""
        return None

    # ----------------------------------------------------------------- task protocol
    @property
    def info(self) -> BenchmarkInfo:
        d = self.describe()
        return BenchmarkInfo(name=d.name, tasks=d.tasks, scenario=self.scenario, input_shape=d.input_shape,
                             outputs_per_task=d.outputs_per_task, problem=d.problem,
                             normalization=d.normalization)

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.info.tasks

    def set_task(self, task_id: int, cumulative: bool = False) -> None:
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task {task_id} does not exist (num_tasks={self.num_tasks})")
        self.current_task, self.cumulative = task_id, cumulative

    def state_dict(self) -> dict:
        return {"current_task": self.current_task, "cumulative": self.cumulative}

    def load_state_dict(self, state: dict) -> None:
        self.current_task = int(state["current_task"])
        self.cumulative = bool(state.get("cumulative", False))

    # ----------------------------------------------------------------- data
    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._load()
            self._splits = {}

    def split(self, task_id: int, split: str) -> TaskData:
        """Task data after subsampling and the train/val split (``train``, ``val`` or ``test``)."""
        self.setup()
        assert self._splits is not None
        key = (task_id, split)
        if key not in self._splits:
            if split == "test":
                self._splits[key] = self._task_split(task_id, "test")
            else:
                full = self._task_split(task_id, "train")
                g = torch.Generator().manual_seed((self.seed * 7919 + task_id) % (2**63 - 1))
                order = torch.randperm(len(full), generator=g)
                n_val = int(round(self.val_fraction * len(full)))
                val_idx, train_idx = order[:n_val], order[n_val:]
                if self.train_samples_per_task is not None:
                    train_idx = train_idx[: self.train_samples_per_task]
                for name, idx in (("train", train_idx.sort().values), ("val", val_idx.sort().values)):
                    # all samples in their order (no val split, no subsampling): the task's data as it is, instead
                    # of a copy of every tensor per task (Permuted-MNIST: 47 MB and about 0.1 s a task)
                    self._splits[(task_id, name)] = full if len(idx) == len(full) else full.subset(idx)
        return self._splits[key]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, data: TaskData | ConcatTaskData, batch_size: int, shuffle: bool,
                equal_shards: bool, persistent: bool = False) -> DataLoader:
        """This rank's batches of ``data``. The one place that decides how batches are made: in-memory data is
        cut in this process; file-backed data is decoded by ``num_workers`` worker processes, each handed a
        whole index tensor of the same sampler, so batches (and DDP shards, and resumes) are the same
        whatever the number of workers. ``persistent``: a loader iterated every epoch (train, val)."""
        rank, world = self._rank_and_world()
        if equal_shards and batch_size % world:
            raise ValueError(f"batch_size={batch_size} is the global batch and must divide by the "
                             f"{world} processes")
        sampler = ShardedBatchSampler(len(data), batch_size, shuffle=shuffle, seed=torch.initial_seed(),
                                      rank=rank, world_size=world, equal_shards=equal_shards)
        if not data.reads_files:
            return DataLoader(data, batch_size=None, sampler=sampler)
        workers = self.num_workers
        return DataLoader(data, batch_size=None, sampler=sampler, num_workers=workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=workers > 0 and persistent and self.persistent_workers)

    def task_dataloader(self, task_id: int, split: str = "train", shuffle: bool = False,
                        batch_size: int | None = None, limit: int | None = None,
                        persistent: bool = False) -> DataLoader:
        """This rank's share of one task's split (its first ``limit`` samples), for between-task work.

        Ranks share each batch, so the union over ranks is the same whatever their number."""
        data = self.split(task_id, split)
        if limit is not None and limit < len(data):
            data = data.subset(torch.arange(limit))
        return self._loader(data, batch_size or self.eval_batch_size, shuffle, False, persistent)

    def train_dataloader(self) -> DataLoader:
        tasks = range(self.current_task + 1) if self.cumulative else [self.current_task]
        parts = [self.split(t, "train") for t in tasks]
        data = parts[0] if len(parts) == 1 else ConcatTaskData(parts)
        return self._loader(data, self.batch_size, shuffle=True, equal_shards=True, persistent=True)

    def val_dataloader(self) -> list[DataLoader]:
        if self.val_fraction == 0:
            return []
        return [self.task_dataloader(self.current_task, "val", persistent=True)]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.task_dataloader(t, "test") for t in range(self.num_tasks)]


def benchmark_of(trainer: L.Trainer) -> ContinualDataModule:
    """The benchmark ``trainer`` runs: Lightning sets ``trainer.datamodule`` when a fit starts, which its type
    hints do not declare."""
    return trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector, not declared


#: The loader options of a benchmark held in memory (MNIST, CIFAR, ...), in their signature order; a file-backed
#: one adds ``FILE_OPTIONS``. Their types and meanings are ``ContinualDataModule.__init__``'s.
LOADER_OPTIONS = ("batch_size", "scenario", "seed", "train_samples_per_task", "val_fraction", "eval_batch_size")
FILE_OPTIONS = (*LOADER_OPTIONS, "augment", "num_workers", "pin_memory", "persistent_workers")


def loader_options(*names: str, **defaults: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A benchmark's ``__init__`` that passes the options ``names`` of :class:`ContinualDataModule` on through
    ``**options``, with ``ContinualDataModule.__init__``'s types and defaults (``defaults`` the benchmark's own
    where they differ), so that each benchmark does not type and forward them again.

    The decorated ``__init__`` gets the signature it would have had with the options written out (its own
    positional parameters, then the options, then its keyword-only ones): what ``train.py``'s key and type
    checks, ``--help``, LightningCLI and ``inspect.signature`` read, so a config may say exactly those keys.
    A call is bound against it (an unknown keyword is a TypeError, as for a written-out signature, and not
    passed on to the base) and ``options`` holds every option, given or default."""
    base = inspect.signature(ContinualDataModule.__init__).parameters
    types = typing.get_type_hints(ContinualDataModule.__init__)
    unknown = [n for n in (*names, *defaults) if n not in base or n == "num_tasks"]
    if unknown or not set(defaults) <= set(names):
        raise TypeError(f"loader_options: {unknown or sorted(set(defaults) - set(names))} not among {names}")

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(init).parameters.values()
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        head = [p for p in own if p.kind is kind]
        tail = [p.replace(kind=kind) for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        options = [inspect.Parameter(n, kind, default=defaults.get(n, base[n].default), annotation=base[n].annotation)
                   for n in names]
        signature = inspect.Signature([*head, *options, *tail])

        @functools.wraps(init)
        def wrapper(self: ContinualDataModule, *args: Any, **kwargs: Any) -> None:
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{init.__qualname__}() {err}") from None
            bound.apply_defaults()
            given = dict(bound.arguments)
            del given[head[0].name]  # self
            init(self, **given)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        resolved = {**types, **typing.get_type_hints(init)}  # each name in its own module's namespace
        wrapper.__annotations__ = {p.name: resolved[p.name] for p in signature.parameters.values()
                                   if p.annotation is not inspect.Parameter.empty}
        return wrapper

    return decorate
