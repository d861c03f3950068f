"""The training data as an endless, seeded stream of batches per domain, the same for any number of
workers and ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["FlippedImages", "StreamBatches", "stream_loader"]


class StreamBatches:
    """Batches of (index, flip) for one domain and one rank, as a DataLoader ``batch_sampler``.

    The domain's images form one endless stream: epoch e is a permutation of the dataset drawn
    from (seed, domain, e), each item with a flip bit from the same generator. Global batch t is
    stream positions [t B W, (t + 1) B W) for per-rank batch B and world size W; rank r takes
    [t B W + r B, t B W + (r + 1) B) (the ``DistributedSampler`` split, without dropping data at
    epoch ends). Batch t depends on nothing but (seed, domain, t), so a run resumed at
    ``start = t B W`` sees exactly the batches the uninterrupted run saw, with any workers.
    """

    def __init__(
        self, length: int, batch_size: int, *, seed: int, domain: int, rank: int = 0, world_size: int = 1,
        start: int = 0, flip: bool = False,
    ) -> None:  # fmt: skip
        self.length, self.batch_size, self.seed, self.domain = length, batch_size, seed, domain
        self.rank, self.world_size, self.start, self.flip = rank, world_size, start, flip
        self._epoch_cache: tuple[int, list[int], list[bool]] | None = None

    def _epoch(self, epoch: int) -> tuple[list[int], list[bool]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            seed = int(np.random.SeedSequence([self.seed, self.domain, epoch]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(self.length, generator=generator).tolist()
            flips = (torch.rand(self.length, generator=generator) < 0.5).tolist()
            self._epoch_cache = (epoch, order, flips)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _item(self, position: int) -> tuple[int, bool]:
        epoch, offset = divmod(position, self.length)
        order, flips = self._epoch(epoch)
        return order[offset], self.flip and flips[offset]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self._item(position + k) for k in range(self.batch_size)]
            position += self.batch_size * self.world_size


class FlippedImages(Dataset):
    """``dataset[(index, flip)]`` -> the image (3, H, W) of ``images[index]``, mirrored if ``flip``."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, bool]) -> Tensor:
        index, flip = item
        image = self.images[index]
        return image.flip(-1) if flip else image


def stream_loader(
    images: Dataset,
    batch_size: int,
    *,
    seed: int,
    domain: int,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    flip: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Tensor]:
    """Endless (batch_size, 3, H, W) batches of ``images`` for one rank: the :class:`StreamBatches` of
    (seed, domain) from stream position ``start``, loaded by ``num_workers`` processes."""
    sampler = StreamBatches(
        len(images), batch_size, seed=seed, domain=domain, rank=rank,  # type: ignore[arg-type]
        world_size=world_size, start=start, flip=flip,
    )  # fmt: skip
    loader = DataLoader(
        FlippedImages(images), batch_sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds; leaves the global RNG alone
    )  # fmt: skip
    return iter(loader)
