"""Training augmentation applied to whole batches on the batch's device: no per-sample Python, no workers.

An augmentation is split in two: :meth:`BatchAugmentation.draw` draws the random parameters of ``n`` samples
(a ``[n, k]`` CPU tensor, from a ``torch.Generator`` the caller seeds), :meth:`BatchAugmentation.apply` applies
them to a batch in one batched operation. The split is what keeps runs exact: the parameters depend only on the
generator's seed (not the device), and a DDP rank can draw those of the global batch and apply its own rows,
so 2 processes augment each sample as 1 process does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def step_generator(task: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded by the run's seed (``torch.initial_seed()``, which the runner sets per task), the
    task, the optimizer step and a ``salt`` naming the use: the same on every rank and after a resume."""
    seed = ((torch.initial_seed() * 1_000_003 + task) * 1_000_003 + step) * 31 + salt
    return torch.Generator().manual_seed(seed % (2**63 - 1))


def draw_share(augmentation: BatchAugmentation, global_n: int, generator: torch.Generator, rank: int = 0,
               world_size: int = 1) -> Tensor:
    """This rank's rows of the parameters drawn for a global batch of ``global_n`` samples (ranks hold
    ``tensor_split`` shares of it, as the batch sampler and the replay memory give them): each sample is
    augmented as in a single-process run."""
    return augmentation.draw(global_n, generator).tensor_split(world_size)[rank]


class BatchAugmentation:
    """Base: random parameters per sample (:meth:`draw`), applied batch-wise (:meth:`apply`)."""

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.draw(len(x), generator))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _flip_rows(x: Tensor, flip: Tensor) -> Tensor:
    """Mirrors (last axis) the rows of ``x`` where ``flip`` is true."""
    mask = flip.to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


class RandomCropFlip(BatchAugmentation):
    """A random crop of the image's own size from the image padded by ``padding`` pixels of ``fill`` on each side,
    then a horizontal flip with probability 1/2 (torchvision's ``RandomCrop(size, padding)`` +
    ``RandomHorizontalFlip``, the CIFAR and TinyImageNet references' training augmentation).

    Args:
        padding: pixels added on each side before cropping.
        flip: mirror half of the samples.
        fill: the padded pixels' value, per channel or one for all: for normalised images, the normalised
            value of a black pixel (``-mean / std``), which is what padding the raw image with 0 gives.
    """

    def __init__(self, padding: int = 4, flip: bool = True, fill: Sequence[float] | float = 0.0):
        if padding < 0:
            raise ValueError(f"padding={padding} must not be negative")
        self.padding, self.flip = padding, flip
        self.fill = tuple(fill) if isinstance(fill, Sequence) else float(fill)

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator) if self.flip else torch.zeros(n, 1, dtype=torch.long)
        return torch.cat([offsets, flips], 1)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.padding
        params = params.to(x.device)
        if p:
            padded = x.new_empty(n, c, h + 2 * p, w + 2 * p)
            fill = torch.as_tensor(self.fill, dtype=x.dtype, device=x.device)
            padded[:] = fill.view(1, -1, 1, 1) if fill.dim() else fill
            padded[:, :, p:p + h, p:p + w] = x
            rows = (params[:, 0, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (params[:, 1, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            samples = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            x = padded[samples, torch.arange(c, device=x.device).view(1, c, 1, 1), rows, cols]
        return _flip_rows(x, params[:, 2]) if self.flip else x


class RandomResizedCropFlip(BatchAugmentation):
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip`` on a batch: a box of
    a random area fraction (``scale``) and aspect ratio (``ratio``, log-uniform) at a random place, resized to
    ``size`` bilinearly (``torchvision.ops.roi_align``, every box of the batch in one call); as torchvision,
    10 tries per sample and a centred crop of the nearest valid ratio when none fits.

    Args:
        size: output side (default: the input's).
        scale: range of the box's area as a fraction of the image's.
        ratio: range of the box's width / height.
        flip: mirror half of the samples.
    """

    def __init__(self, size: int | None = None, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={tuple(scale)} must satisfy 0 < low <= high <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={tuple(ratio)} must satisfy 0 < low <= high")
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip

    def draw(self, n: int, generator: torch.Generator, tries: int = 10) -> Tensor:
        """``[n, 5]``: box corner x, y and width, height as fractions of the image's sides, and the flip."""
        area = torch.empty(n, tries).uniform_(self.scale[0], self.scale[1], generator=generator)
        log_r = torch.empty(n, tries).uniform_(torch.tensor(self.ratio[0]).log().item(),
                                               torch.tensor(self.ratio[1]).log().item(), generator=generator)
        r = log_r.exp()
        w, h = (area * r).sqrt(), (area / r).sqrt()
        ok = (w <= 1) & (h <= 1)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        take = first.clamp(min=0).unsqueeze(1)
        w, h = w.gather(1, take).squeeze(1), h.gather(1, take).squeeze(1)
        fallback = first < 0  # torchvision's fallback: the whole image cropped to the nearest allowed ratio
        fw = torch.full((n,), min(1.0, self.ratio[1]))
        fh = torch.full((n,), min(1.0, 1.0 / self.ratio[0]))
        w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
        u = torch.rand(n, 2, generator=generator)
        x0, y0 = u[:, 0] * (1 - w), u[:, 1] * (1 - h)
        flips = torch.randint(0, 2, (n,), generator=generator) if self.flip else torch.zeros(n, dtype=torch.long)
        return torch.stack([x0, y0, w, h, flips.float()], 1)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        from torchvision.ops import roi_align  # imported where used: torchvision.ops costs start-up time

        n, _, height, width = x.shape
        size = self.size or height
        p = params.to(device=x.device, dtype=torch.float32)
        boxes = torch.stack([torch.arange(n, device=x.device, dtype=torch.float32),
                             p[:, 0] * width, p[:, 1] * height, (p[:, 0] + p[:, 2]) * width,
                             (p[:, 1] + p[:, 3]) * height], 1)
        out = roi_align(x.float(), boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0,
                        aligned=True).to(x.dtype)
        return _flip_rows(out, p[:, 4] > 0.5) if self.flip else out
