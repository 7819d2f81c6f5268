"""Which patches each branch of SplitMask sees, and which patches BEiT hides.

SplitMask cuts the patch grid of an image (14x14 at 224 px) into two disjoint subsets A and B;
each branch encodes only its own patches and inpaints the other's. The split is a BEiT block mask
(BEiT, Bao et al. 2021, Alg. 1): contiguous rectangles cannot be inpainted by copying a neighbour,
so the model has to understand the image. Masks are flat bool arrays over the grid in row-major
order. This runs per image inside DataLoader workers, so it is numpy only, and takes an explicit
`rng: np.random.Generator` so that a seed fixes every mask.
"""
import math

import numpy as np


def _allowed_cells(grid, num_masked, allowed):
    """The flat bool array of cells that may be masked (all of them by default)."""
    allowed = np.ones(grid[0] * grid[1], dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    assert allowed.shape == (grid[0] * grid[1],) and 0 <= num_masked <= allowed.sum(), \
        f"cannot mask {num_masked} cells: {allowed.sum()} are allowed"
    return allowed


def block_mask(grid, num_masked, rng, min_block=16, max_block=75, min_aspect=0.3, attempts=10,
               allowed=None):
    """BEiT block masking (BEiT, Bao et al. 2021, Alg. 1), topped up to exactly num_masked cells.
    Blocks cover min_block to max_block patches (the paper: 16 to 75), at most what is left to mask."""
    h, w = grid
    allowed = _allowed_cells(grid, num_masked, allowed)
    if num_masked == allowed.sum():  # every allowed cell is needed: nothing left to choose
        return allowed.copy()
    can_mask = allowed.reshape(h, w)
    mask = np.zeros((h, w), dtype=bool)
    log_aspect = math.log(min_aspect), -math.log(min_aspect)
    count = 0
    while count < num_masked:
        need = num_masked - count
        largest = min(max_block, need, h * w)
        smallest = min(min_block, largest)  # a 7x7 grid or an almost met budget has no room for 16
        added = 0
        for _ in range(attempts):
            area = rng.uniform(smallest, largest)
            aspect = math.exp(rng.uniform(*log_aspect))
            block_h = min(max(round(math.sqrt(area * aspect)), 1), h)
            block_w = min(max(round(math.sqrt(area / aspect)), 1), w)
            top = rng.integers(h - block_h + 1)
            left = rng.integers(w - block_w + 1)
            window = (slice(top, top + block_h), slice(left, left + block_w))
            # Only cells that are allowed and not yet masked count towards the budget.
            new = can_mask[window] & ~mask[window]
            added = int(new.sum())
            # Like BEiT, redraw a block that adds nothing or would overshoot the budget.
            if 0 < added <= need:
                mask[window] |= new
                break
            added = 0
        if added == 0:  # `attempts` blocks in a row found no place: give up, as BEiT does
            break
        count += added
    mask = mask.reshape(-1)
    # Blocks never overshoot, but they can stop short; SplitMask needs exact counts, so top up
    # with random allowed cells (rarely needed: under 1% of 14x14 masks, about one cell each).
    if count < num_masked:
        free = np.flatnonzero(allowed & ~mask)
        mask[rng.choice(free, num_masked - count, replace=False)] = True
    return mask


def random_mask(grid, num_masked, rng, allowed=None):
    """Uniform random masking: exactly num_masked cells drawn without replacement from `allowed`."""
    allowed = _allowed_cells(grid, num_masked, allowed)
    mask = np.zeros_like(allowed)
    mask[rng.choice(np.flatnonzero(allowed), num_masked, replace=False)] = True
    return mask


def _draw(kind, grid, num_masked, rng, min_block, allowed=None):
    """One mask of the given kind; split_patches and beit_mask share it."""
    assert kind in ("block", "random"), f"mask kind {kind!r}"
    if kind == "block":
        return block_mask(grid, num_masked, rng, min_block=min_block, allowed=allowed)
    return random_mask(grid, num_masked, rng, allowed=allowed)


def split_patches(grid, mask_ratio, rng, kind="block", min_block=16):
    """Visible patch indices of SplitMask's branches A and B: int64 [2, k], rows sorted ascending.

    Each branch hides mask_ratio of the n patches, so sees k = round(n * (1 - mask_ratio)). At 0.5
    (the paper's default) B is exactly A's complement when n is even (odd n: one patch is seen by
    neither). Above 0.5 (e.g. 0.75, for small datasets) the branches see disjoint k-patch subsets;
    the rest is seen by neither and not predicted (each branch predicts the other's patches).
    Equal k lets both branches run as one batch of 2B sequences of length k.
    """
    k = round(grid[0] * grid[1] * (1 - mask_ratio))
    assert 0.5 <= mask_ratio < 1, f"mask_ratio {mask_ratio}: the two branches cannot be disjoint"
    assert k > 0, f"mask_ratio {mask_ratio} on a {grid} grid leaves no visible patch"
    seen_by_a = _draw(kind, grid, k, rng, min_block)
    # B draws its k patches from those A does not see; at 50% that leaves exactly A's complement.
    seen_by_b = _draw(kind, grid, k, rng, min_block, allowed=~seen_by_a)
    return np.stack([np.flatnonzero(seen_by_a), np.flatnonzero(seen_by_b)]).astype(np.int64)


def beit_mask(grid, mask_ratio, rng, kind="block", min_block=16):
    """Masked positions (flat bool) for the BEiT baseline; BEiT hides 75 of 196 patches, our default 0.4 hides 78."""
    assert 0 < mask_ratio < 1, f"mask_ratio {mask_ratio}"
    return _draw(kind, grid, round(grid[0] * grid[1] * mask_ratio), rng, min_block)
