"""Source: WebDataset shards (tar files of samples), read and written with the ``webdataset`` library.

A sample is the tar members sharing one key: ``KEY.jpg`` (or png, webp, …: the image file's own bytes)
and, for labelled data, ``KEY.cls`` (the class index as text). ``leanmim shard`` writes
``SPLIT-000000.tar, …`` plus ``manifest.json`` (splits, shard names and sample counts, classes,
channels, per-channel mean/std of an evenly spread sample of the training images).

``--data`` names shards as a brace pattern (``'DIR/train-{000000..000127}.tar'``), any URL the library
opens (``pipe:``, ``http(s)://``, …; only local files are tested), or a directory holding ``manifest.json``.

Streaming for pretraining (``ShardSpec.loader``), one process of ``world_size``, ``W`` loader workers:

    slot s = rank · W + worker        (W·world_size slots, each an independent stream)
    epoch e: shards in a random order seeded by (seed, e), repeated as needed; slot s reads the
             shards at positions s, s + slots, s + 2·slots, …
      ─ tar samples ─ shuffle buffer (seeded by seed, e, s) ─ raw batches of B samples
      ─ decode + crop in the worker (each sample's crop seeded by its position in the slot's stream)
      ─▶ uint8 (B, C, img, img); the engine's batch_transform flips and normalizes on the device
    the DataLoader takes batches from the workers in turn; an epoch is samples_per_epoch // (B·world)
    batches per process, split evenly between the workers.

A sample that fails to decode is replaced by another sample of the same batch (so every batch keeps B
images and consumes exactly B samples of the stream), warned about once and named in ``skipped_files``
as ``SHARD:KEY``; an unreadable shard is skipped and named too.

Resume guarantee: exact. Each epoch's stream is a function of (seed, epoch, rank, world size, workers),
and a run resumed after k batches of an epoch regenerates that epoch's streams and fast-forwards each
worker past the raw batches it had delivered without decoding them; per-sample crop seeds (per-batch torch
seeds for a transform without ``takes_seed``) make the rest identical. Exact provided the resumed run has the
same number of processes and ``--num-workers`` (otherwise the data order changes, the run still continues), and
no batch of the skipped part was wholly unreadable.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .common import DataError, SkipLog, decode_bytes, image_mode, mix_seed, one_line, worker_start_method
from .manifest import manifest_problem

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "leanmim-shards/1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
URL_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "file:")


# ----------------------------------------------------------------------------- naming shards

def looks_like_shards(data: str) -> bool:
    """A shard pattern or URL rather than a directory or a dataset name."""
    return data.startswith(URL_SCHEMES) or bool(re.search(r"\.tar(\.gz)?(\}|$)|\{.*\.\..*\}", data))


def is_shard_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        manifest = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read shard manifest '{path}' ({one_line(e)}): rewrite it with leanmim shard") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"'{path}' is not a leanmim shard manifest (format {MANIFEST_FORMAT}): "
                        "rewrite the shards with leanmim shard")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"shard manifest '{path}': {problem}; rewrite it with leanmim shard (or repair the entry)")
    return manifest


MAX_SHARDS = 1_000_000  # names one pattern may expand to (ImageNet-21k at 1000 samples a shard: ~14 000)


def expand_pattern(pattern: str, data: str, check_local: bool = True) -> list[str]:
    """The names of a brace pattern, expanded lazily: a local name that does not exist stops the expansion at once
    (a pattern of 10^8 names is refused at its first missing shard, not after listing them all); more than
    MAX_SHARDS names are refused."""
    ranges = list(re.finditer(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}", pattern))
    names = math.prod(abs(int(m.group(2)) - int(m.group(1))) + 1 for m in ranges)
    if names > MAX_SHARDS:  # braceexpand lists a numeric range whole before yielding its first name
        first = re.sub(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}", lambda m: m.group(1), pattern)
        if check_local and not first.startswith(URL_SCHEMES) and "{" not in first and not os.path.isfile(first):
            raise DataError(f"shard '{first}' (the first name of the pattern '{data}') does not exist, and the pattern "
                            f"names {names} shards: check the pattern's range against the files")
        raise DataError(f"'{data}' names {names} shards, more than {MAX_SHARDS}: check the brace pattern's range")
    urls = []
    for number, url in enumerate(braceexpand(pattern)):
        if number >= MAX_SHARDS:
            raise DataError(f"'{data}' names more than {MAX_SHARDS} shards: check the brace pattern's range")
        if check_local and not url.startswith(URL_SCHEMES) and not os.path.isfile(url):
            raise DataError(f"shard '{url}' (name {number + 1} of the pattern '{data}') does not exist: check the "
                            f"pattern's range against the files, or write shards with leanmim shard")
        urls.append(url)
    return urls


@dataclass
class ShardSpec:
    """Shards named by ``--data``: their URLs per split, and the manifest when there is one."""
    data: str
    splits: dict[str, list[str]]                       # split -> shard URLs
    manifest: dict[str, Any] | None = None
    counts: dict[str, int | None] = field(default_factory=dict)   # split -> samples (manifest), None: unknown

    @property
    def classes(self) -> list[str] | None:
        return (self.manifest or {}).get("classes")


def open_shards(data: str, check_local: bool = True) -> ShardSpec:
    """Resolve a shard pattern / URL / manifest directory into URLs (one-line DataError when nothing is there)."""
    path = os.path.expanduser(data)
    if os.path.isdir(path):
        manifest = read_manifest(path)
        if manifest is None:
            raise DataError(f"'{data}' has no {MANIFEST}: pass a shard pattern such as '{data}/train-{{000000..000009}}.tar'")
        splits, counts = {}, {}
        for split, entry in manifest["splits"].items():
            splits[split] = [os.path.join(path, shard["name"]) for shard in entry["shards"]]
            counts[split] = int(entry["count"])
        spec = ShardSpec(data, splits, manifest, counts)
    else:
        urls = expand_pattern(path, data, check_local)
        directory = os.path.dirname(urls[0]) if not data.startswith(URL_SCHEMES) else ""
        manifest = read_manifest(directory) if directory and os.path.isdir(directory) else None
        counts = {}
        if manifest is not None:  # sample counts of the named shards, when the manifest lists them all
            known = {shard["name"]: int(shard["count"]) for entry in manifest["splits"].values()
                     for shard in entry["shards"]}
            names = [os.path.basename(u) for u in urls]
            counts["train"] = sum(known[n] for n in names) if all(n in known for n in names) else None
        spec = ShardSpec(data, {"train": urls}, manifest, counts or {"train": None})
    if check_local:
        for split, urls in spec.splits.items():
            local = [u for u in urls if not u.startswith(URL_SCHEMES)]
            missing = [u for u in local if not os.path.isfile(u)]
            if missing:
                raise DataError(f"{len(missing)} of the {len(urls)} {split} shards named by '{data}' do not exist "
                                f"(e.g. '{missing[0]}'): check the pattern, or write shards with leanmim shard")
    return spec


# ----------------------------------------------------------------------------- reading samples

def _skip_shard(log: SkipLog) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:
        where = re.search(r"@ (.*)$", str(exn.args[0]) if exn.args else "")
        log.add(where.group(1) if where else "shard", one_line(exn))
        return True  # continue with the next sample / shard
    return handler


MAX_MEMBER_BYTES = 256 << 20  # a tar member larger than this is skipped unread (an image file is a few MB at most)


def bounded_members(streams: Iterator[dict[str, Any]], handler: Callable[[Exception], bool],
                    max_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_expander``, with every member's size checked from its tar header before it is read:
    a member over ``max_bytes`` is skipped (and counted by ``handler``) without being held in memory, so a small
    ``.tar.gz`` that expands to gigabytes cannot exhaust the machine. Yields {fname, data, __url__}, then an end-of-
    shard marker ({}) per shard, as webdataset's expander does."""
    max_bytes = MAX_MEMBER_BYTES if max_bytes is None else max_bytes
    for source in streams:
        url = source["url"]
        try:
            archive = tarfile.open(fileobj=source["stream"], mode="r|*")
            for member in archive:
                if not member.isreg() or re.match(r"__[^/]*__($|/)", member.name):
                    continue
                if member.size > max_bytes:
                    handler(DataError(f"member '{member.name}' holds {member.size / (1 << 20):.0f} MiB, over the "
                                      f"{max_bytes >> 20} MiB a sample member may have: skipped @ {url}"))
                    continue
                yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": url}
                archive.members = []
            yield {}
        except Exception as exn:  # noqa: BLE001 - a damaged shard: the handler counts it, the next shard follows
            exn.args = (f"{exn.args[0] if exn.args else exn} @ {url}",) + tuple(exn.args[1:])
            if not handler(exn):
                break


def raw_samples(urls: list[str], log: SkipLog) -> Iterator[dict[str, Any]]:
    """Undecoded samples (dicts of bytes keyed by extension, plus __key__ and __url__) of ``urls`` in order."""
    from webdataset.tariterators import group_by_keys, url_opener

    handler = _skip_shard(log)
    streams = url_opener(iter([{"url": url} for url in urls]), handler=handler)
    return group_by_keys(bounded_members(streams, handler), handler=handler)


def sample_name(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def decode_sample(sample: dict[str, Any], channels: int) -> tuple[torch.Tensor, int | None]:
    """uint8 (C, H, W) image (EXIF orientation applied) and the ``cls`` label (None when absent); raises if bad."""
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise DataError(f"no image member ({', '.join(IMAGE_KEYS)}) in the sample, only {sorted(k for k in sample if not k.startswith('__'))}")
    label = int(sample["cls"]) if "cls" in sample else None
    return decode_bytes(image, channels), label


def first_image_mode(urls: list[str]) -> str | None:
    log = SkipLog()
    for sample in itertools.islice(raw_samples(urls[:4], log), 16):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        try:
            return image_mode(io.BytesIO(image))
        except Exception:  # noqa: BLE001 - a bad sample: try the next
            continue
    return None


# ----------------------------------------------------------------------------- the training stream

class ShardStream(IterableDataset):
    """One process's stream of batches: transform(uint8 (C, H, W)) stacked per item (with WorkerCrop, uint8
    (B, C, img, img)), ``__len__`` batches per epoch. A transform with ``takes_seed`` is called as
    ``transform(image, draw_seed)``, the seed a function of the sample's position in its slot's stream; any other
    runs under torch's generator seeded per batch.

    Built by :meth:`ShardSpec`-based :class:`ShardSource.loader`; ``epoch`` and ``skip`` (batches of this epoch
    already trained) are set by the loader in the main process before its workers start.
    """

    def __init__(self, urls: list[str], channels: int, transform: nn.Module, batch_size: int, batches_per_epoch: int,
                 seed: int, rank: int, world_size: int, shuffle_buffer: int, log: SkipLog):
        self.urls, self.channels, self.transform = urls, channels, transform
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.rank, self.world_size, self.shuffle_buffer, self.log = rank, world_size, shuffle_buffer, log
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def shard_order(self, epoch: int, slot: int, slots: int) -> Iterator[str]:
        """This slot's shards for ``epoch``: every slots-th of an endless sequence of seeded permutations."""
        for rounds in itertools.count():
            order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch * 7919 + rounds))
            for position, index in enumerate(order.tolist()):
                if (rounds * len(self.urls) + position) % slots == slot:
                    yield self.urls[index]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (worker + self.skip) % workers   # resumed mid-epoch: the next batch is logical worker skip % W's
        quota = len(range(logical, self.batches_per_epoch, workers))
        skip = len(range(logical, self.skip, workers))
        slot, slots = self.rank * workers + logical, self.world_size * workers
        samples = _endless(self.shard_order(self.epoch, slot, slots), self.log)
        shuffled = wds.shuffle(bufsize=self.shuffle_buffer, initial=min(self.shuffle_buffer, 1000),
                               seed=self.seed * 1_000_003 + self.epoch * 7919 + slot)(samples)
        stream_seed = mix_seed(0x53484152, self.seed, self.epoch, slot, slots)  # 0x53484152: "SHAR"
        delivered = 0
        for index in itertools.count():
            raw = list(itertools.islice(shuffled, self.batch_size))
            if delivered >= quota or len(raw) < self.batch_size:
                return
            if index < skip:
                delivered += 1
                continue
            seed = (((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) * 1009 + logical) * 1_000_003 + index
            position = index * self.batch_size  # of the batch's first sample in this slot's stream, this epoch
            draw_seeds = [mix_seed(stream_seed, position + j) for j in range(self.batch_size)]
            batch = self._decode(raw, seed % (1 << 63), draw_seeds)
            if batch is not None:
                delivered += 1
                yield batch

    def _decode(self, raw: list[dict[str, Any]], seed: int, draw_seeds: list[int]) -> torch.Tensor | None:
        """Decode and transform B raw samples (``draw_seeds``: each one's, for a ``takes_seed`` transform; ``seed``:
        the batch's torch seed for any other); a bad sample is replaced by the batch's next good one, cropped
        with the bad one's seed."""
        decoded: list[torch.Tensor | None] = []
        for sample in raw:
            try:
                decoded.append(decode_sample(sample, self.channels)[0])
            except Exception as e:  # noqa: BLE001 - any decoder error: skip the sample, never the epoch
                self.log.add(sample_name(sample), one_line(e))
                decoded.append(None)
        good = [i for i, image in enumerate(decoded) if image is not None]
        if not good:
            return None
        images = [decoded[i] if decoded[i] is not None else decoded[next((g for g in good if g > i), good[0])]
                  for i in range(len(decoded))]
        if getattr(self.transform, "takes_seed", False):
            return torch.stack([self.transform(image, draw) for image, draw in zip(images, draw_seeds)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([self.transform(image) for image in images])


def _endless(shards: Iterator[str], log: SkipLog) -> Iterator[dict[str, Any]]:
    """Samples of the shards in ``shards`` (an endless sequence), one shard after the other."""
    empty = 0
    for url in shards:
        found = False
        for sample in raw_samples([url], log):
            found = True
            yield sample
        empty = 0 if found else empty + 1
        if empty > 1000:
            raise DataError(f"no readable sample in the last 1000 shards read (e.g. '{url}'): check the shards")


class _EpochLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` that tells it the epoch (and where a resumed epoch starts)
    before the workers start: ``epoch()`` gives the trainer's current epoch."""

    def __init__(self, stream: ShardStream, num_workers: int, epoch: Callable[[], int],
                 resume_at: tuple[int, int] | None):
        super().__init__(stream, batch_size=None, num_workers=num_workers,
                         multiprocessing_context=worker_start_method(num_workers))
        self._epoch, self._resume_at = epoch, resume_at

    def __iter__(self):
        stream = self.dataset
        stream.epoch, stream.skip = self._epoch(), 0
        if self._resume_at is not None and self._resume_at[0] == stream.epoch:
            stream.skip, self._resume_at = self._resume_at[1], None
        return super().__iter__()


@dataclass
class ShardSource:
    """What ``build_pretrain_data`` returns as the dataset for shards: ``len()`` is the samples per epoch;
    :meth:`loader` builds this process's DataLoader (the engine calls it with its rank and world size)."""
    urls: list[str]
    channels: int
    transform: nn.Module
    samples_per_epoch: int
    shuffle_buffer: int
    log: SkipLog

    def __len__(self) -> int:
        return self.samples_per_epoch

    @property
    def skipped_files(self) -> list[str]:
        return self.log.names

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int,
               epoch: Callable[[], int] = lambda: 0, resume_at: tuple[int, int] | None = None) -> DataLoader:
        batches = self.samples_per_epoch // (batch_size * world_size)
        if batches == 0:
            raise DataError(f"--samples-per-epoch {self.samples_per_epoch} is less than one global batch of "
                            f"{batch_size * world_size}: raise it or lower --batch-size")
        stream = ShardStream(self.urls, self.channels, self.transform, batch_size, batches, seed, rank, world_size,
                             self.shuffle_buffer, self.log)
        return _EpochLoader(stream, num_workers, epoch, resume_at)


# ----------------------------------------------------------------------------- labelled shards in memory

def read_split(urls: list[str], channels: int, to_stored: Callable[[torch.Tensor], torch.Tensor], log: SkipLog,
               max_bytes: int, size: tuple[int, int], num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``urls`` in order, decoded and passed through ``to_stored`` -> (uint8 (N, C, Hs, Ws),
    int64 labels (N,)), ``size`` (Hs, Ws) the stored box; bad samples are skipped and logged."""
    images, labels = [], []
    for sample in raw_samples(urls, log):
        try:
            image, label = decode_sample(sample, channels)
        except Exception as e:  # noqa: BLE001
            log.add(sample_name(sample), one_line(e))
            continue
        if label is None:
            raise DataError(f"sample '{sample_name(sample)}' has no .cls label: probing and fine-tuning need labelled "
                            "shards (leanmim shard on a DIR/train/<class>/ layout or on fashion-mnist)")
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"sample '{sample_name(sample)}' has label {label}, but the manifest names {num_classes} "
                            f"classes (labels 0 to {num_classes - 1}): the shards and their manifest disagree")
        images.append(to_stored(image))
        labels.append(label)
        if len(images) * channels * size[0] * size[1] > max_bytes:
            raise DataError(f"the labelled shards do not fit in memory (over {max_bytes / (1 << 30):.1f} GiB decoded): "
                            "probing and fine-tuning read labelled shards into memory; use a smaller split")
    if not images:
        raise DataError(f"no readable labelled sample in {len(urls)} shard(s) (e.g. '{urls[0]}'): check the shards")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
