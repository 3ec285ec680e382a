"""What crosses between the parties of split learning: packed tokens, lengths, noise.

What crosses is *packed*: the real tokens of every sequence back to back plus the sequence
lengths, never padding. Each party re-pads internally (right padding for training, left padding
for generation) and derives positions and masks from the lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedshield_flwr.split.arch import SplitError


def pack(
    x: torch.Tensor, lengths: Sequence[int] | torch.Tensor, left: bool = False
) -> torch.Tensor:
    """Real-token rows of a padded ``[B, T, H]`` tensor, back to back: ``[sum(lengths), H]``."""
    mask = padding_mask(lengths, x.shape[1], left=left, device=x.device).bool()
    return x[mask]


def unpack(
    packed: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    width: int | None = None,
    left: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[B, width, H]`` with zeros at padding (differentiable)."""
    lens = torch.as_tensor(lengths, dtype=torch.long)
    width = int(lens.max()) if width is None else width
    mask = padding_mask(lens, width, left=left, device=packed.device).bool()
    out = packed.new_zeros(len(lens), width, packed.shape[-1])
    return out.masked_scatter(mask[..., None], packed)


def padding_mask(
    lengths: Sequence[int] | torch.Tensor,
    width: int,
    left: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[B, width]`` long mask with ``lengths[b]`` ones, right- or left-aligned."""
    lens = torch.as_tensor(lengths, dtype=torch.long, device=device)
    ar = torch.arange(width, device=device)[None, :]
    m = ar >= (width - lens[:, None]) if left else ar < lens[:, None]
    return m.long()


def add_relative_noise(
    h: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """FedSEA-style noise: ``h + N(0, (sigma * mean|h_row|)^2)`` per token row of packed ``h``."""
    if sigma <= 0:
        return h
    scale = h.abs().mean(dim=-1, keepdim=True) * sigma
    noise = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
    return h + noise * scale


def length_buckets(
    lengths: Sequence[int], max_ratio: float = 1.25, max_buckets: int = 8
) -> list[list[int]]:
    """Group sequence indices by similar length so the server pads little (rows independent).

    Sequences are sorted longest first; a bucket closes when the next one is shorter than
    ``bucket max / max_ratio``. At most ``max_buckets`` buckets (the last takes the rest).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if (
            buckets
            and len(buckets) < max_buckets
            and lengths[i] * max_ratio < lengths[buckets[-1][0]]
        ) or not buckets:
            buckets.append([i])
        else:
            buckets[-1].append(i)
    return buckets


def generation_positions(
    seen: torch.Tensor, lengths: torch.Tensor, start: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mask columns, position ids and width for new tokens of a left-padded generation batch."""
    width = int(lengths.max())
    new_mask = padding_mask(lengths, width, left=True)
    if start:
        pos = (new_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        pos = seen[:, None] + torch.arange(width)[None]
    return new_mask, pos, width


def batch_lengths(attention_mask: torch.Tensor, who: str = "silo") -> torch.Tensor:
    """Sequence lengths of a right-padded batch; refuses left padding or holes in the mask."""
    lens = attention_mask.long().sum(1)
    if not torch.equal(attention_mask.long(), padding_mask(lens, attention_mask.shape[1])):
        raise SplitError(
            f"{who}: split training needs right-padded batches (attention_mask a prefix of ones "
            "per row); set tokenizer.padding_side='right'"
        )
    if int(lens.min()) < 1:
        raise SplitError(f"{who}: the batch contains an empty sequence; drop it")
    return lens
