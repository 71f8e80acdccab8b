"""The frozen-encoder cache: VAE latents and caption features of a dataset, in safetensors shards.

Both encoders are frozen while the transformer trains, so each image and caption is encoded
once and every later run reads the shards. A cache lives in ``cache_dir/<key>/`` where the
key hashes everything its contents depend on: each sample's file (path, tar member, size,
modification time) and caption, the encoders' files (names, sizes, modification times),
the bucket grid, the maximum caption length and the prompt enhancer's name. Change any of
them and a new cache is built; otherwise it is reused as it is.

``shard-NNNNN.safetensors`` holds ``latents.K`` ((C, 1, h, w), the VAE posterior mean scaled
as the pipeline scales it) and ``captions.K`` ((L, D) text features) of up to
``SHARD_SIZE`` samples; its metadata lists their dataset index and bucket, and how many
images of its range could not be read (skipped, never a crash). Shard 0 also holds
``captions.empty``, the empty prompt's features (classifier-free guidance's negative).
``index.json``, written last, marks the cache complete. Under torchrun the processes encode
alternate shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import parallel
from .datasets import ImageCaptionDataset, fit_to_bucket, nearest_bucket
from .fileio import atomic_write
from .vae_codec import scale_latents, to_vae_input

logger = logging.getLogger(__name__)

SHARD_SIZE = 256
ENCODE_BATCH = 16  # images per VAE forward (one bucket at a time)


def cache_key(dataset: ImageCaptionDataset, encoder_folders: list[Path], buckets: list[tuple[int, int]],
              max_sequence_length: int, enhancer_name: str) -> str:
    h = hashlib.sha256(json.dumps([buckets, max_sequence_length, enhancer_name, SHARD_SIZE]).encode())
    for s in dataset.samples:
        stat = os.stat(s.source)
        h.update(json.dumps([s.source, s.member, s.caption, stat.st_size, stat.st_mtime_ns]).encode())
    for folder in encoder_folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                stat = f.stat()
                h.update(json.dumps([str(f.relative_to(folder)), stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def _encode_shard(dataset, indices, vae, text_encoder, enhancer, buckets, max_sequence_length, device):
    loaded = [(i, dataset.load(i)) for i in indices]
    good = [(i, item) for i, item in loaded if item is not None]
    tensors, items = {}, []
    if indices[0] == 0:
        tensors["captions.empty"] = text_encoder.encode([""], max_sequence_length)[0].float().cpu().clone(memory_format=torch.contiguous_format)
    if good:
        captions = enhancer([caption for _, (_, caption) in good])
        features = text_encoder.encode(captions, max_sequence_length)
        by_bucket: dict[tuple[int, int], list] = {}
        for k, (i, (image, _)) in enumerate(good):
            by_bucket.setdefault(nearest_bucket(image.width, image.height, buckets), []).append((k, i, image))
        cfg = vae.config
        for bucket, members in by_bucket.items():
            for start in range(0, len(members), ENCODE_BATCH):
                chunk = members[start:start + ENCODE_BATCH]
                pixels = torch.stack([torch.from_numpy(np.array(fit_to_bucket(im, bucket), dtype=np.uint8))
                                      for _, _, im in chunk]).permute(0, 3, 1, 2)
                x = to_vae_input(pixels).to(device, vae.dtype)
                z = scale_latents(vae.encode(x).latent_dist.mean.float(), cfg)
                for (k, i, _), zk in zip(chunk, z):
                    tensors[f"latents.{k}"] = zk.unsqueeze(1).cpu().clone(memory_format=torch.contiguous_format)  # own storage: safetensors refuses shared
                    tensors[f"captions.{k}"] = features[k].float().cpu().clone(memory_format=torch.contiguous_format)  # repeated captions share one tensor
        items = [(i, list(nearest_bucket(im.width, im.height, buckets))) for i, (im, _) in good]
    return tensors, {"items": json.dumps(items), "skipped": str(len(loaded) - len(good))}


class LatentCache:
    """The encoded samples of one cache folder, read lazily shard by shard."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.skipped = index["skipped"]
        self.entries = [(shard, k, tuple(bucket)) for shard, items in enumerate(index["shards"])
                        for k, (_, bucket) in enumerate(items)]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def bucket_ids(self) -> list[int]:
        sizes = sorted({b for _, _, b in self.entries})
        return [sizes.index(b) for _, _, b in self.entries]

    def _shard(self, shard: int):
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / f"shard-{shard:05d}.safetensors"), "pt")
        return self._open[shard]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, k, _ = self.entries[i]
        f = self._shard(shard)
        return f.get_tensor(f"latents.{k}"), f.get_tensor(f"captions.{k}")

    def empty_caption(self) -> torch.Tensor:
        return self._shard(0).get_tensor("captions.empty")


def build_cache(dataset: ImageCaptionDataset, cache_dir: Path, key: str, encoders, enhancer,
                buckets: list[tuple[int, int]], max_sequence_length: int, device) -> LatentCache:
    """The cache of ``dataset`` under ``cache_dir/key``, encoding what is missing first.
    ``encoders()`` returns (vae, text_encoder) and is only called when there is work, so a
    complete cache never loads them. Shards already written by an interrupted build are kept."""
    folder = Path(cache_dir) / key
    if not (folder / "index.json").is_file():
        n_shards = -(-len(dataset) // SHARD_SIZE)
        mine = [s for s in range(n_shards) if s % parallel.world_size() == parallel.rank()
                and not (folder / f"shard-{s:05d}.safetensors").is_file()]
        if mine:
            vae, text_encoder = encoders()
            folder.mkdir(parents=True, exist_ok=True)
            for s in mine:
                indices = list(range(s * SHARD_SIZE, min((s + 1) * SHARD_SIZE, len(dataset))))
                tensors, meta = _encode_shard(dataset, indices, vae, text_encoder, enhancer, buckets,
                                              max_sequence_length, device)
                atomic_write(folder / f"shard-{s:05d}.safetensors", lambda p: save_file(tensors, str(p), meta))
            del vae, text_encoder
        parallel.barrier()
        if parallel.is_main():
            shards, skipped = [], 0
            for s in range(n_shards):
                with safe_open(str(folder / f"shard-{s:05d}.safetensors"), "pt") as f:
                    meta = f.metadata()
                shards.append(json.loads(meta["items"]))
                skipped += int(meta["skipped"])
            index = {"shards": shards, "skipped": skipped}
            atomic_write(folder / "index.json", lambda p: p.write_text(json.dumps(index)))
        parallel.barrier()
    cache = LatentCache(folder)
    if cache.skipped and parallel.is_main():
        logger.warning("%d unreadable image(s) skipped while encoding %s", cache.skipped, folder)
    return cache
