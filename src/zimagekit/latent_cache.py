"""The frozen-encoder cache: VAE latents and caption features of a dataset, in safetensors shards.

Both encoders are frozen while the transformer trains, so each image and caption is encoded
once and every later run reads the shards. A cache lives in ``cache_dir/<key>/`` where the
key hashes everything its contents depend on: each item's identity (for files: path, tar
member, size, modification time and caption), the encoders' files (names, sizes,
modification times), the bucket grid, the maximum caption length and the prompt enhancer's
name. Change any of them and a new cache is built; otherwise it is reused as it is.

Captions are stored once per distinct caption, not once per image: datasets repeat captions
(the shapes world's 200,000 scenes have about 1,100), and a caption's features (up to 512 x
2,560 floats for Z-Image's Qwen3) outweigh its latent many times.

* ``captions-NNNNN.safetensors``: ``captions.J`` ((L, D) text features) for up to
  ``SHARD_SIZE`` distinct captions, numbered in order of first appearance in the dataset
  and passed through the prompt enhancer first. Shard 0 also holds ``captions.empty``, the
  empty prompt's features (classifier-free guidance's negative).
* ``latents-NNNNN.safetensors``: ``latents.K`` ((C, 1, h, w), the VAE posterior mean scaled
  as the pipeline scales it) of up to ``SHARD_SIZE`` items; its metadata lists each one's
  dataset index, bucket and caption number, and how many images of its range could not be
  read (skipped, never a crash).

``index.json``, written last, marks the cache complete. Under torchrun the processes encode
alternate shards. :meth:`LatentCache.preload` holds a cache that fits on the training device,
so batches are tensor gathers rather than file reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import parallel
from .datasets import CaptionedImages, fit_to_bucket, nearest_bucket
from .fileio import atomic_write
from .vae_codec import scale_latents, to_vae_input

logger = logging.getLogger(__name__)

SHARD_SIZE = 256
ENCODE_BATCH = 16  # images per VAE forward (one bucket at a time), captions per text-encoder forward
FORMAT = 2  # 1: caption features stored per image
_OPEN_SHARDS = 64  # file handles kept open while reading lazily


def cache_key(dataset: CaptionedImages, encoder_folders: list[Path], buckets: list[tuple[int, int]],
              max_sequence_length: int, enhancer_name: str) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, buckets, max_sequence_length, enhancer_name, SHARD_SIZE]).encode())
    for row in dataset.identity():
        h.update(json.dumps(row).encode())
    for folder in encoder_folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                stat = f.stat()
                h.update(json.dumps([str(f.relative_to(folder)), stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


def _own(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage: safetensors refuses tensors that share one."""
    return t.float().cpu().clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def _encode_captions(shard: int, distinct: list[str], text_encoder, enhancer, max_sequence_length: int):
    numbers = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(distinct)))
    tensors = {"captions.empty": _own(text_encoder.encode([""], max_sequence_length)[0])} if shard == 0 else {}
    for start in range(numbers.start, numbers.stop, ENCODE_BATCH):
        chunk = range(start, min(start + ENCODE_BATCH, numbers.stop))
        features = text_encoder.encode(enhancer([distinct[j] for j in chunk]), max_sequence_length)
        tensors.update({f"captions.{j}": _own(f) for j, f in zip(chunk, features)})
    return tensors, {"count": str(len(numbers))}


@torch.no_grad()
def _encode_latents(dataset, indices, caption_of, vae, buckets, device):
    loaded = [(i, dataset.load(i)) for i in indices]
    good = [(k, i, item[0]) for k, (i, item) in enumerate(loaded) if item is not None]
    by_bucket: dict[tuple[int, int], list] = {}
    for k, i, image in good:
        by_bucket.setdefault(nearest_bucket(image.width, image.height, buckets), []).append((k, image))
    tensors = {}
    for bucket, members in by_bucket.items():
        for start in range(0, len(members), ENCODE_BATCH):
            chunk = members[start:start + ENCODE_BATCH]
            pixels = torch.stack([torch.from_numpy(np.array(fit_to_bucket(im, bucket), dtype=np.uint8))
                                  for _, im in chunk]).permute(0, 3, 1, 2)
            z = scale_latents(vae.encode(to_vae_input(pixels).to(device, vae.dtype)).latent_dist.mean.float(), vae.config)
            tensors.update({f"latents.{k}": _own(zk.unsqueeze(1)) for (k, _), zk in zip(chunk, z)})
    items = [(i, list(nearest_bucket(im.width, im.height, buckets)), caption_of[i]) for _, i, im in good]
    return tensors, {"items": json.dumps(items), "skipped": str(len(loaded) - len(good))}


class LatentCache:
    """The encoded items of one cache folder: read lazily shard by shard, or all at once onto a
    device with :meth:`preload`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.skipped, self.distinct_captions = index["skipped"], index["captions"]
        # (latent shard, key within it, bucket, caption number) per item.
        self.entries = [(shard, k, tuple(bucket), caption) for shard, items in enumerate(index["shards"])
                        for k, (_, bucket, caption) in enumerate(items)]
        self._open: OrderedDict[str, object] = OrderedDict()
        self._preloaded = None

    def __len__(self) -> int:
        return len(self.entries)

    def bucket_ids(self) -> list[int]:
        sizes = sorted({e[2] for e in self.entries})
        return [sizes.index(e[2]) for e in self.entries]

    def _file(self, name: str):
        if name not in self._open:
            if len(self._open) >= _OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[name] = safe_open(str(self.folder / name), "pt")
        self._open.move_to_end(name)
        return self._open[name]

    def _caption(self, j: int) -> torch.Tensor:
        return self._file(f"captions-{j // SHARD_SIZE:05d}.safetensors").get_tensor(f"captions.{j}")

    def _latent(self, i: int) -> torch.Tensor:
        shard, k, _, _ = self.entries[i]
        return self._file(f"latents-{shard:05d}.safetensors").get_tensor(f"latents.{k}")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent (C, 1, h, w), caption features (L, D)) of item ``i``."""
        return self._latent(i), self._caption(self.entries[i][3])

    def empty_caption(self) -> torch.Tensor:
        return self._file("captions-00000.safetensors").get_tensor("captions.empty")

    def preload(self, device) -> None:
        """Read every latent (one tensor per bucket) and each distinct caption onto ``device``,
        each bucket moved in one copy."""
        by_bucket: dict[tuple, list[int]] = {}
        for i, e in enumerate(self.entries):
            by_bucket.setdefault(e[2], []).append(i)
        latents, row = {}, torch.zeros(len(self.entries), dtype=torch.int64)
        for bucket, members in by_bucket.items():
            latents[bucket] = torch.stack([self._latent(i) for i in members]).to(device)
            row[members] = torch.arange(len(members))
        captions = [self._caption(j).to(device) for j in range(self.distinct_captions)]
        self._preloaded = latents, row.to(device), captions

    def batch(self, indices: list[int], device) -> dict:
        """``{"latents": (B, C, 1, h, w), "captions": [(L, D)] * B}`` on ``device``; the items
        must share a bucket (batches of :class:`~zimagekit.trainer.IndexDataSource` do)."""
        if self._preloaded is None:
            items = [self[i] for i in indices]
            return {"latents": torch.stack([z for z, _ in items]).to(device),
                    "captions": [c.to(device) for _, c in items]}
        latents, row, captions = self._preloaded
        index = torch.tensor(indices)
        if row.device.type == "cuda":  # pinned and asynchronous: the host never waits for the GPU here
            index = index.pin_memory().to(row.device, non_blocking=True)
        bucket = latents[self.entries[indices[0]][2]]
        return {"latents": bucket[row[index]].to(device),
                "captions": [captions[self.entries[i][3]].to(device) for i in indices]}


def build_cache(dataset: CaptionedImages, cache_dir: Path, key: str, encoders, enhancer,
                buckets: list[tuple[int, int]], max_sequence_length: int, device) -> LatentCache:
    """The cache of ``dataset`` under ``cache_dir/key``, encoding what is missing first.
    ``encoders()`` returns (vae, text_encoder) and is only called when there is work, so a
    complete cache never loads them (nor reads the dataset). Shards already written by an
    interrupted build are kept."""
    folder = Path(cache_dir) / key
    if not (folder / "index.json").is_file():
        numbers: dict[str, int] = {}
        caption_of = [numbers.setdefault(c, len(numbers)) for c in dataset.captions()]
        distinct = list(numbers)
        jobs = [f"captions-{s:05d}" for s in range(-(-len(distinct) // SHARD_SIZE))]
        jobs += [f"latents-{s:05d}" for s in range(-(-len(dataset) // SHARD_SIZE))]
        mine = [job for n, job in enumerate(jobs) if n % parallel.world_size() == parallel.rank()
                and not (folder / f"{job}.safetensors").is_file()]
        if mine:
            vae, text_encoder = encoders()
            folder.mkdir(parents=True, exist_ok=True)
            for job in mine:
                kind, shard = job.split("-")[0], int(job.split("-")[1])
                if kind == "captions":
                    tensors, meta = _encode_captions(shard, distinct, text_encoder, enhancer, max_sequence_length)
                else:
                    indices = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(dataset)))
                    tensors, meta = _encode_latents(dataset, indices, caption_of, vae, buckets, device)
                atomic_write(folder / f"{job}.safetensors", lambda p: save_file(tensors, str(p), meta))
            del vae, text_encoder
        parallel.barrier()
        if parallel.is_main():
            shards, skipped = [], 0
            for job in (j for j in jobs if j.startswith("latents")):
                with safe_open(str(folder / f"{job}.safetensors"), "pt") as f:
                    meta = f.metadata()
                shards.append(json.loads(meta["items"]))
                skipped += int(meta["skipped"])
            index = {"format": FORMAT, "shards": shards, "captions": len(distinct), "skipped": skipped}
            atomic_write(folder / "index.json", lambda p: p.write_text(json.dumps(index)))
        parallel.barrier()
    cache = LatentCache(folder)
    if cache.skipped and parallel.is_main():
        logger.warning("%d unreadable image(s) skipped while encoding %s", cache.skipped, folder)
    return cache
