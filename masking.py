"""Which patches each branch of SplitMask sees, and which patches BEiT hides.

SplitMask cuts the patch grid into two disjoint subsets A and B with BEiT block masking (Bao et al. 2021,
Alg. 1): contiguous rectangles cannot be inpainted by copying a neighbour, so the model has to understand
the image. Masks are flat bool arrays over the grid in row-major order. Numpy only (this runs in DataLoader
workers), with an explicit `rng: np.random.Generator` so that a seed fixes every mask.
"""
import math

import numpy as np


def _allowed_cells(grid, num_masked, allowed):  # the flat bool array of cells that may be masked (default: all)
    allowed = np.ones(grid[0] * grid[1], dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    assert allowed.shape == (grid[0] * grid[1],) and 0 <= num_masked <= allowed.sum(), \
        f"cannot mask {num_masked} cells: {allowed.sum()} are allowed"
    return allowed


def block_mask(grid, num_masked, rng, min_block=16, max_block=75, min_aspect=0.3, attempts=10, allowed=None):
    """BEiT block masking (BEiT, Bao et al. 2021, Alg. 1), topped up to exactly num_masked cells.
    Blocks cover min_block to max_block patches (the paper: 16 to 75), at most what is left to mask."""
    h, w = grid
    allowed = _allowed_cells(grid, num_masked, allowed)
    if num_masked == allowed.sum():  # every allowed cell is needed: nothing left to choose
        return allowed.copy()
    can_mask = allowed.reshape(h, w)
    mask, count = np.zeros((h, w), dtype=bool), 0
    log_aspect = math.log(min_aspect), -math.log(min_aspect)
    while count < num_masked:
        need = num_masked - count
        largest = min(max_block, need, h * w)
        smallest = min(min_block, largest)  # a 7x7 grid or an almost met budget has no room for 16
        for _ in range(attempts):
            area, aspect = rng.uniform(smallest, largest), math.exp(rng.uniform(*log_aspect))
            block_h = min(max(round(math.sqrt(area * aspect)), 1), h)
            block_w = min(max(round(math.sqrt(area / aspect)), 1), w)
            top, left = rng.integers(h - block_h + 1), rng.integers(w - block_w + 1)
            window = (slice(top, top + block_h), slice(left, left + block_w))
            new = can_mask[window] & ~mask[window]  # only allowed, not yet masked cells count
            added = int(new.sum())
            if 0 < added <= need:  # like BEiT, redraw a block that adds nothing or would overshoot
                mask[window] |= new
                count += added
                break
        else:  # `attempts` blocks in a row found no place: give up, as BEiT does
            break
    mask = mask.reshape(-1)
    # SplitMask needs exact counts: top up with random allowed cells (under 1% of 14x14 masks, ~1 cell each).
    if count < num_masked:
        mask[rng.choice(np.flatnonzero(allowed & ~mask), num_masked - count, replace=False)] = True
    return mask


def random_mask(grid, num_masked, rng, allowed=None):
    """Uniform random masking: exactly num_masked cells drawn without replacement from `allowed`."""
    allowed = _allowed_cells(grid, num_masked, allowed)
    mask = np.zeros_like(allowed)
    mask[rng.choice(np.flatnonzero(allowed), num_masked, replace=False)] = True
    return mask


def _cells(kind, grid, count, rng, min_block, allowed=None):  # a flat bool array: count cells chosen by kind
    assert kind in ("block", "random"), f"mask kind {kind!r}"
    if kind == "block":
        return block_mask(grid, count, rng, min_block=min_block, allowed=allowed)
    return random_mask(grid, count, rng, allowed=allowed)


def split_patches(grid, mask_ratio, rng, kind="block", min_block=16):
    """Visible patch indices of branches A and B, int64 [2, k] with sorted rows; each branch hides mask_ratio
    of the n patches. Above 0.5 (e.g. 0.75, for small datasets) the patches neither branch sees are not
    predicted. Equal k lets both branches run as one batch of 2N sequences of length k."""
    k = round(grid[0] * grid[1] * (1 - mask_ratio))
    assert 0.5 <= mask_ratio < 1, f"mask_ratio {mask_ratio}: the two branches cannot be disjoint"
    assert k > 0, f"mask_ratio {mask_ratio} on a {grid} grid leaves no visible patch"
    visible_a = _cells(kind, grid, k, rng, min_block)
    # B draws from the patches A does not see: at 0.5 (the paper's) that is A's complement (odd n: one left over).
    visible_b = _cells(kind, grid, k, rng, min_block, allowed=~visible_a)
    return np.stack([np.flatnonzero(visible_a), np.flatnonzero(visible_b)]).astype(np.int64)


def beit_mask(grid, mask_ratio, rng, kind="block", min_block=16):
    """Masked positions (flat bool) for the BEiT baseline; BEiT hides 75 of 196 patches, our default 0.4 hides 78."""
    assert 0 < mask_ratio < 1, f"mask_ratio {mask_ratio}"
    return _cells(kind, grid, round(grid[0] * grid[1] * mask_ratio), rng, min_block)
