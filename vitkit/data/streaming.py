"""Streaming: images decoded from their files in DataLoader worker processes while the model trains.

For data larger than the decode cache (vitkit/data/sources.py keeps one uint8 array at one size) and for the
full-resolution recipe: each worker decodes a sample (`torchvision.io.decode_jpeg` for JPEGs, PIL for the rest),
crops it from the full image (RandomResizedCrop for training, the checkpoint's resize and centre crop for
evaluation) and hands whole uint8 batches at the model's input size to the training process, which runs the rest of
the recipe on the batch as for cached data (flip, RandAugment, normalise, erasing, MixUp / CutMix; on the GPU when
there is one).

Two readers, one position rule (the loader's `(epoch, batch_index)`, as `BatchLoader` keeps it):

  * `RandomAccessLoader`: rows that can be read in any order (image folders, CSVs, Hugging Face datasets). The
    epoch's order is `BatchLoader`'s (a permutation seeded by (seed, epoch), global batches striped over ranks);
    workers decode whole batches.
  * `ShardLoader`: tar shards, read front to back. Each pass over the data permutes the shards (seeded by
    (seed, pass)) and deals them out to the ranks; a rank reads its shards in turn through a shuffle buffer of
    `buffer` samples that is emptied in a seeded random order before it refills. The training stream never ends
    (a pass follows the last) and an epoch is `samples // (ranks x batch)` batches, so every rank takes the same
    number of steps. The DataLoader takes batches from its workers in turn, so worker k decodes batches k, k + W,
    ...: which samples batch g holds follows from g alone, whatever the number of workers, and a resume re-reads
    at most one buffer's worth of encoded bytes.

Every random draw of a worker is seeded by where it happens (seed, pass, sample), not by what ran before, so a
resumed run crops the very same boxes; the batch-level draws use torch's RNG in the training process, which the
checkpoint saves. Undecodable samples are dropped from their batch, named in `loader.skipped` and logged.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from ..config import PreprocessConfig
from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .listing import DataSourceError
from .loader import BatchLoader
from .preprocess import interpolation_mode, resize_and_crop
from .shards import ShardIndex, iter_samples
from .transforms import AugmentConfig

try:  # deprecated since torchvision 0.29 in favour of TorchCodec, still faster than PIL (benchmarks/data_pipeline.py)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without it: PIL decodes JPEGs too
    decode_jpeg = None

log = logging.getLogger("vitkit.data")

SHUFFLE_BUFFER = 1000  # samples in a shard stream's shuffle buffer ...
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # ... fewer when their encoded images would hold more than this per worker
MAX_LOGGED_SKIPS = 10  # undecodable samples named one per line; the rest are counted in `loader.skipped`


def stream_workers() -> int:
    """Decoder processes of a streaming loader: `$VITKIT_DECODE_WORKERS`, else half the cores (1 to 8), leaving
    the other half to the training step (0: decode in the training process)."""
    env = os.environ.get("VITKIT_DECODE_WORKERS")
    if env is not None:
        return max(int(env), 0)
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# ----------------------------------------------------------------------------------------- per-sample pixels
def decode_tensor(data: bytes | Path, name: str) -> torch.Tensor:
    """An encoded image -> (3, H, W) uint8. JPEGs go through `torchvision.io.decode_jpeg` (libjpeg-turbo straight
    into a tensor, EXIF orientation applied); other formats, and JPEGs it refuses, through `decode_image` (PIL),
    which converts odd modes and raises ImageDecodeError with the reason.
    """
    if isinstance(data, Path):
        if not data.is_file():  # missing, a folder, a FIFO: decode_image refuses it with the reason
            return torch.from_numpy(decode_image(data, name=name)).permute(2, 0, 1)
        try:
            data = data.read_bytes()
        except OSError as e:
            raise ImageDecodeError(f"image '{name}' could not be read ({e.strerror or e})") from None
    if decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            w, h = Image.open(io.BytesIO(data)).size  # the header only: refuse a bomb before allocating it
            if 0 < w * h <= DEFAULT_MAX_PIXELS:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # its deprecation, once per call
                    return decode_jpeg(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (OSError, RuntimeError, ValueError, SyntaxError):
            pass  # decode_image below says what is wrong with it
    return torch.from_numpy(decode_image(data, name=name)).permute(2, 0, 1)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (run seed, pass, sample ...): the same parts, the same draws."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TrainCrop:
    """RandomResizedCrop of one full-resolution image (torchvision's box sampler, an antialiased resize)."""

    def __init__(self, aug: AugmentConfig, pre: PreprocessConfig):
        self.size = list(pre.input_size)
        self.scale, self.ratio = aug.rrc_scale, aug.rrc_ratio
        self.mode = interpolation_mode(pre.interpolation)

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # the sampler draws from the CPU generator: seed a private copy
            torch.default_generator.manual_seed(seed)
            top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        return TF.resized_crop(img, top, left, h, w, self.size, interpolation=self.mode, antialias=True)


class EvalCrop:
    """The checkpoint's evaluation preprocessing of one image: resize by 1 / crop_pct, centre crop (as predict)."""

    def __init__(self, pre: PreprocessConfig):
        self.pre = pre
        self.size = list(pre.input_size)

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        return resize_and_crop(img, self.pre)


def batch_augment(aug: AugmentConfig) -> AugmentConfig:
    """The batch-level part of `aug` for streamed batches: the crop already happened per image in the worker."""
    return replace(aug, random_resized_crop=False, random_crop_pad=0)


def batch_preprocess(pre: PreprocessConfig) -> PreprocessConfig:
    """Evaluation preprocessing for streamed batches: resized and cropped per image already; normalise only."""
    return replace(pre, crop_pct=1.0)


SampleOp = Callable[[torch.Tensor, int], torch.Tensor]


def decode_batch(
    items: Sequence[tuple[str, bytes | Path, int, int]], op: SampleOp
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(name, encoded image, label, seed) rows -> (uint8 (n, 3, h, w), int64 (n,), skipped); undecodable rows are
    left out of the batch and named in `skipped`."""
    images, labels, skipped = [], [], []
    for name, data, label, seed in items:
        try:
            images.append(op(decode_tensor(data, name), seed))
            labels.append(label)
        except ImageDecodeError as e:
            skipped.append((name, str(e)))
    x = torch.stack(images) if images else torch.zeros((0, 3, *op.size), dtype=torch.uint8)
    return x, torch.tensor(labels, dtype=torch.int64), skipped


# ----------------------------------------------------------------------------------------------- the source
@dataclass
class StreamSource:
    """A dataset read as it trains: its labels and classes up front, its pixels when a worker decodes them.

    Either `index` (tar shards, read in order) or `read` (row i -> (name, encoded bytes or file), any order) is set.
    Shares `labels`, `classes`, `skipped` and `source` with ImageArrayDataset, so splits and tasks work alike.
    """

    labels: np.ndarray  # (N,) int64 class indices
    classes: list[str]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index: ShardIndex | None = None
    read: Callable[[int], tuple[str, bytes | Path]] | None = None
    load_seconds: float = 0.0
    from_cache: bool = False  # never: nothing is decoded ahead (the shard index may be cached)
    cache_path: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sequential(self) -> bool:
        """True for tar shards: read front to back (ShardLoader), not row by row (RandomAccessLoader)."""
        return self.index is not None


def align_stream_classes(src: StreamSource, classes: Sequence[str]) -> StreamSource:
    """`src` with its labels re-indexed onto `classes` (a validation source onto the training classes).

    Raises:
        DataSourceError: `src` has a class that `classes` lacks.
    """
    classes = [str(c) for c in classes]
    if list(src.classes) == classes:
        return src
    missing = [c for c in src.classes if c not in classes]
    if missing:
        raise DataSourceError(
            f"{src.source}: classes {missing[:10]} are not among the {len(classes)} training classes "
            f"({classes[:10]}{'...' if len(classes) > 10 else ''}); use data with the same class names"
        )
    remap = np.array([classes.index(c) for c in src.classes], dtype=np.int64)
    return replace(src, labels=remap[src.labels], classes=classes)


class SkipLog:
    """Undecodable samples met while streaming: each named once in the log (up to MAX_LOGGED_SKIPS), all kept."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[tuple[str, str]] = []
        self._seen: set[str] = set()

    def add(self, skipped: Sequence[tuple[str, str]]) -> None:
        for name, reason in skipped:
            if name in self._seen:  # the same bad file comes round again every epoch
                continue
            self._seen.add(name)
            self.items.append((name, reason))
            if len(self.items) <= MAX_LOGGED_SKIPS:
                log.warning("%s: skipped %s (%s)", self.where, name, reason)
            elif len(self.items) == MAX_LOGGED_SKIPS + 1:
                log.warning("%s: more undecodable samples skipped; loader.skipped lists them all", self.where)


def _identity(batch):
    return batch


def _dataloader(dataset: Dataset, workers: int, seed: int, **kw) -> DataLoader:
    """A DataLoader of whole batches. Its own generator: a new iterator draws a seed for its workers, which from
    torch's global RNG would shift the augmentation draws of the training process by when the iterator started
    (a resumed run starts it elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity, generator=generator, **kw)


def _apply(transform: Callable | None, pairs: bool, x: torch.Tensor, y: torch.Tensor):
    if transform is None:
        return x, y
    return transform(x, y) if pairs else (transform(x), y)


# ------------------------------------------------------------------------------------ rows in any order
class _DecodedBatches(Dataset):
    """Item b is batch b of this rank's epoch, decoded and cropped (in a worker process)."""

    def __init__(self, src: StreamSource, batches: list[np.ndarray], firsts: list[int], op: SampleOp, seeds: tuple):
        self.src, self.batches, self.firsts, self.op, self.seeds = src, batches, firsts, op, seeds

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        rows = []
        for j, i in enumerate(self.batches[b]):
            name, data = self.src.read(int(i))
            rows.append((name, data, int(self.src.labels[i]), sample_seed(*self.seeds, self.firsts[b] + j)))
        return decode_batch(rows, self.op)


class RandomAccessLoader(BatchLoader):
    """BatchLoader's order, position and rank striping over a StreamSource read row by row, decoded by `workers`
    processes (0: in this one); `op` crops each image, `transform` runs on the uint8 batch as for cached data."""

    def __init__(
        self, src: StreamSource, indices: np.ndarray | None, batch_size: int, *, op: SampleOp, workers: int, **kw
    ):
        if src.read is None:
            raise ValueError(f"{src.source} is read in order (tar shards): use ShardLoader")
        super().__init__(src, indices, batch_size, **kw)
        self.op, self.workers = op, workers
        self.skips = SkipLog(src.source)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.skips.items

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stream": True}  # marks a streamed run: a resume streams too

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batch_indices()
        firsts = [g * self.batch_size for g in range(self.rank, self._global_batches(), self.world_size)]
        items = _DecodedBatches(self.ds, batches, firsts, self.op, (self.seed, self.epoch))
        order = range(self.batch_index, len(batches))
        loader = _dataloader(items, self.workers, self.seed, sampler=order)
        for x, y, skipped in loader:
            self.skips.add(skipped)
            x, y = _apply(self.transform, self._pairs, x, y)
            self.batch_index += 1  # counted before yielding: a checkpoint taken now resumes at the next batch
            yield x, y
        self.epoch += 1
        self.batch_index = 0


# -------------------------------------------------------------------------------------- shards, in order
class ShardPlan:
    """The order in which a rank reads its samples, pass after pass: no state, only seeds.

    Pass p permutes the shards (seed, p) and deals shard i of the permutation to rank i mod R; the rank's stream is
    its shards' kept samples (those in `mask`) in reading order, cut into blocks of `buffer` that are emitted in a
    seeded order. Batch k of the rank is emitted samples kB .. kB + B - 1 of its endless stream, whichever process
    decodes it, so the order does not depend on the number of decoder processes.
    """

    def __init__(
        self, index: ShardIndex, mask: np.ndarray, *, seed: int, rank: int, world_size: int, buffer: int, shuffle: bool
    ):
        self.index, self.seed, self.rank, self.world = index, seed, rank, world_size
        self.buffer, self.shuffle = buffer, shuffle
        starts = index.starts
        self.kept = [starts[s] + np.flatnonzero(mask[starts[s] : starts[s + 1]]) for s in range(len(index.shards))]
        self.kept_counts = np.array([len(k) for k in self.kept], dtype=np.int64)

    def shards_of(self, p: int) -> np.ndarray:
        n = len(self.kept)
        order = np.random.default_rng([self.seed, p]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world]

    def pass_gids(self, p: int) -> np.ndarray:
        """Global sample numbers the rank reads in pass p, in reading order."""
        shards = self.shards_of(p)
        return np.concatenate([self.kept[s] for s in shards]) if len(shards) else np.zeros(0, np.int64)

    def pass_length(self, p: int) -> int:
        return int(self.kept_counts[self.shards_of(p)].sum())

    def block_order(self, p: int, b: int, n: int) -> np.ndarray:
        """Reading positions of block b of pass p in the order they are emitted."""
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, p, self.rank, b]).permutation(n)

    def locate(self, position: int) -> tuple[int, int]:
        """(pass, the position in it where it starts) of the stream's emitted sample number `position`."""
        p, start, empty = 0, 0, 0
        while True:
            n = self.pass_length(p)
            empty = empty + 1 if n == 0 else 0
            if empty > 4 * len(self.kept) + 8:
                raise DataSourceError(
                    f"{self.index.description}: rank {self.rank} gets no samples from its shards; "
                    "write more shards (vitkit shard --max-size smaller)"
                )
            if position < start + n:
                return p, start
            start += n
            p += 1


def batches_before(g: int, w: int, streams: int) -> int:
    """How many of the batches 0..g-1 stream w made: the DataLoader takes batch g from stream g mod `streams`."""
    return max(0, -(-(g - w) // streams))


class _ShardCursor:
    """Reads wanted samples of the shards front to back, keeping the current shard open between calls."""

    def __init__(self, index: ShardIndex):
        self.index, self.starts = index, index.starts
        self.shard, self.next, self.want = -1, 0, frozenset()
        self.samples: Iterator | None = None

    def fetch(self, gids: np.ndarray) -> dict[int, tuple[str, bytes]]:
        """Encoded images of `gids` (in reading order: shard by shard, ascending within one), keyed by gid."""
        out: dict[int, tuple[str, bytes]] = {}
        shard_of = np.searchsorted(self.starts, gids, side="right") - 1
        for s in dict.fromkeys(shard_of.tolist()):
            out.update(self._read(s, gids[shard_of == s] - self.starts[s]))
        return out

    def _read(self, s: int, js: np.ndarray) -> dict[int, tuple[str, bytes]]:
        path = self.index.shards[s]
        if s != self.shard or js[0] < self.next:
            self.samples = iter_samples(path, self.index.layout, wanted=lambda j: j in self.want)
            self.shard, self.next = s, 0
        self.want = frozenset(js.tolist())
        got: dict[int, tuple[str, bytes]] = {}
        last = int(js[-1])
        for sample in self.samples:
            self.next = sample.index + 1
            if sample.index in self.want:
                got[int(self.starts[s]) + sample.index] = (f"{path.name}:{sample.key}", sample.image or b"")
            if sample.index >= last:
                break
        if len(got) < len(js):
            raise DataSourceError(f"shard '{path}' changed since it was indexed (sample {last} is gone); restart")
        return got


class ShardStream(IterableDataset):
    """The batches of one rank: DataLoader worker k decodes batches k, k + W, ... counted from `start_batch`
    (each reads every shard of the rank, seeking over the samples of the other workers' batches).

    Training (`endless`): the rank's stream from batch `start_batch` on, pass after pass. Evaluation: one pass
    over the rank's shards in their listed order, the last batch short.
    """

    def __init__(
        self,
        plan: ShardPlan,
        labels: np.ndarray,
        op: SampleOp,
        batch_size: int,
        *,
        endless: bool,
        start_batch: int = 0,
    ):
        self.plan, self.labels, self.op, self.batch_size = plan, labels, op, batch_size
        self.endless, self.start_batch = endless, start_batch

    def __iter__(self):
        info = get_worker_info()
        k, workers = (0, 1) if info is None else (info.id, info.num_workers)
        rows: list = []
        for p, gid, (name, data) in self._mine(self.start_batch + k, workers):
            rows.append((name, data, int(self.labels[gid]), sample_seed(self.plan.seed, p, gid)))
            if len(rows) == self.batch_size:
                yield decode_batch(rows, self.op)
                rows = []
        if rows:
            yield decode_batch(rows, self.op)

    def _mine(self, first: int, workers: int) -> Iterator[tuple[int, int, tuple[str, bytes]]]:
        """(pass, gid, (name, encoded image)) of batches first, first + workers, ... in emitted order."""
        plan, cursor, bsz = self.plan, _ShardCursor(self.plan.index), self.batch_size
        p, pass_start = plan.locate(first * bsz) if self.endless else (0, 0)
        while True:
            gids = plan.pass_gids(p)
            q = max(first * bsz - pass_start, 0)
            for b in range(q // plan.buffer, -(-len(gids) // plan.buffer)):
                block = gids[b * plan.buffer : (b + 1) * plan.buffer]
                order = plan.block_order(p, b, len(block))
                position = pass_start + b * plan.buffer + np.arange(len(block))  # emitted numbers of the block
                batch = position // bsz
                mine = (batch >= first) & ((batch - first) % workers == 0)
                if not mine.any():
                    continue
                data = cursor.fetch(block[np.sort(order[mine])])  # read in shard order, only what is mine
                for gid in block[order[mine]]:
                    yield p, int(gid), data[int(gid)]
            if not self.endless:
                return
            p, pass_start = p + 1, pass_start + len(gids)


def default_buffer(image_bytes: np.ndarray) -> int:
    """SHUFFLE_BUFFER samples, fewer (at least 16) when that many encoded images would pass SHUFFLE_BUFFER_BYTES."""
    mean = float(image_bytes.mean()) if len(image_bytes) else 1.0
    return int(max(16, min(SHUFFLE_BUFFER, SHUFFLE_BUFFER_BYTES // max(mean, 1.0))))


class ShardLoader:
    """Batches of (uint8 (B, C, H, W) or transformed, int64 (B,)) from tar shards, each rank its own shards.

    Args:
        src: a StreamSource with a shard `index`.
        indices: the samples to use (e.g. the training split); the rest are read past.
        batch_size: samples per batch on each rank.
        train: an endless shuffled stream of `len(self)` batches an epoch, resumable (else one ordered pass).
        op: the per-image crop (TrainCrop / EvalCrop); `transform` runs on each uint8 batch afterwards.
        workers: decoder processes (0: in this process); they share the rank's batches, not its shards, so the
            order is the same for any number of them.
        buffer: the shuffle buffer (default: `default_buffer`).
    """

    def __init__(
        self,
        src: StreamSource,
        indices: np.ndarray | None,
        batch_size: int,
        *,
        train: bool,
        op: SampleOp,
        transform: Callable | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        buffer: int | None = None,
    ):
        from .loader import _takes_targets

        if src.index is None:
            raise ValueError(f"{src.source} is read row by row: use RandomAccessLoader")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shards = len(src.index.shards)
        if shards < world_size:
            raise DataSourceError(
                f"{src.source}: {shards} shard(s) cannot be split over {world_size} ranks; write at least one shard "
                "per rank (vitkit shard --max-size smaller)"
            )
        self.src, self.batch_size, self.train, self.op = src, batch_size, train, op
        self.transform, self.seed, self.rank, self.world_size = transform, seed, rank, world_size
        self._pairs = transform is not None and _takes_targets(transform)
        self.mask = np.zeros(len(src), dtype=bool)
        self.mask[np.arange(len(src)) if indices is None else np.asarray(indices, dtype=np.int64)] = True
        if not self.mask.any():
            raise ValueError(f"{src.source}: no samples to load (empty index set)")
        self.workers = workers
        self.buffer = buffer or default_buffer(src.index.image_bytes[self.mask])
        self.skips = SkipLog(src.source)
        self.kept_total = int(self.mask.sum())
        self.epoch, self.batch_index = 0, 0
        self._plan()
        self._live: Iterator | None = None
        self._live_next = -1  # the run's batch number the live iterator yields next

    def _plan(self) -> None:
        self.plan = ShardPlan(
            self.src.index,
            self.mask,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            buffer=self.buffer,
            shuffle=self.train,
        )

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.skips.items

    def __len__(self) -> int:
        if self.train:
            return self.kept_total // (self.world_size * self.batch_size)
        return -(-self.plan.pass_length(0) // self.batch_size)

    # ------------------------------------------------------------------ position
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch_index = int(epoch), 0

    def state_dict(self) -> dict:
        """The position (epoch, batch) and what the order depends on besides the seed: the buffer and the shards."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "stream": True,
            "buffer": self.buffer,
            "index": self.src.index.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        if "index" not in state:
            raise ValueError("this checkpoint's data position is not a shard stream's; resume with --cache")
        if state["index"] != self.src.index.fingerprint:
            raise ValueError(
                f"{self.src.source}: the shards changed since the checkpoint was written, so its data "
                "position means other samples; restore the shards or start a new run (--out)"
            )
        if int(state["buffer"]) != self.buffer:  # the order depends on it: a run keeps the buffer it started with
            self.buffer = int(state["buffer"])
            self._plan()
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
        self._live = None

    # ------------------------------------------------------------------ batches
    def _start(self, first_batch: int, endless: bool) -> Iterator:
        stream = ShardStream(
            self.plan, self.src.labels, self.op, self.batch_size, endless=endless, start_batch=first_batch
        )
        return iter(_dataloader(stream, self.workers, self.seed))

    def _batches(self) -> Iterator:
        if not self.train:
            yield from self._start(0, endless=False)
            return
        run_batch = self.epoch * len(self) + self.batch_index
        if self._live is None or self._live_next != run_batch:  # a resume or set_epoch moved the position
            self._live, self._live_next = self._start(run_batch, endless=True), run_batch
        while self.batch_index < len(self):
            self._live_next += 1
            yield next(self._live)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, skipped in self._batches():
            self.skips.add(skipped)
            x, y = _apply(self.transform, self._pairs, x, y)
            self.batch_index += 1  # counted before yielding: a checkpoint taken now resumes at the next batch
            yield x, y
        self.epoch += 1
        self.batch_index = 0

    def close(self) -> None:
        """Stop the decoder processes of the training stream (they also stop with this process)."""
        self._live = None


__all__ = [
    "EvalCrop",
    "RandomAccessLoader",
    "ShardLoader",
    "ShardPlan",
    "StreamSource",
    "TrainCrop",
    "align_stream_classes",
    "batch_augment",
    "batch_preprocess",
    "decode_batch",
    "decode_tensor",
    "default_buffer",
    "sample_seed",
    "stream_workers",
]
