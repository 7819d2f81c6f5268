"""The built-in data: scenes of ten kinds of shapes, drawn on the fly (no download), for a first run in minutes."""
import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2


def _polygon(radii, angles=None):  # radius radii[i] at angles[i] (degrees; default: evenly spaced)
    t = np.radians(np.arange(len(radii)) * 360 / len(radii) if angles is None else angles)
    return np.stack([np.cos(t), np.sin(t)], 1) * np.asarray(radii, dtype=float)[:, None]


def _arc(cx, r, start, stop):  # 24 points on the circle of centre (cx, 0), from angle start to stop
    return _polygon([r] * 24, np.linspace(start, stop, 24)) + [cx, 0]


_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
SHAPES = {  # class c draws shape c: outlines within the unit disc; the ring is a thick circle instead
    "circle": _polygon([1] * 48), "square": _polygon([1] * 4), "triangle": _polygon([1] * 3),
    "star": _polygon([1, 0.4] * 5), "cross": _polygon([1, 0.42, 0.42] * 4), "ring": None,
    "crescent": np.concatenate([_arc(0, 1, 53, 307), _arc(0.6, 0.8, 270, 90)]), "half-disc": _arc(0, 1, 0, 180),
    "arrow": np.array([[1, 0], [0.1, 0.75], [0.1, 0.3], [-1, 0.3], [-1, -0.3], [0.1, -0.3], [0.1, -0.75]]),
    "heart": np.stack([np.sin(_t) ** 3, (5 * np.cos(2 * _t) + 2 * np.cos(3 * _t) + np.cos(4 * _t) - 13 * np.cos(_t))
                       / 16], 1)}


class SyntheticShapes(torch.utils.data.Dataset):
    """The built-in data, drawn on the fly: class c is 3-6 shapes of kind c and a distractor, in two complementary
    hues (c/20 and c/20 + 1/2 of the colour wheel) on a gradient or stripes of the same hues. Colours average to
    grey, so a model must learn which colours and outlines go together; both halves of a scene show its class.
    Image i of a split comes from np.random.default_rng((seed, split, i)): the same on every machine."""
    def __init__(self, num_images=2000, img_size=32, split="train", seed=0):
        self.img_size, self.seed, self.split_id = img_size, seed, ("train", "val", "test").index(split)
        self.classes, self.targets = list(SHAPES), [i % len(SHAPES) for i in range(num_images)]  # class-balanced

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        rng, label, big = np.random.default_rng((self.seed, self.split_id, i)), self.targets[i], 2 * self.img_size
        hues = (label / 20, label / 20 + 0.5)
        colour = lambda hue: np.float32(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.5, 1), rng.uniform(0.5, 1))) * 255
        c1, c2 = (colour(hue) for hue in rng.permutation(hues))
        x = np.arange(big) / big
        angle, waves = rng.uniform(0, 2 * np.pi), rng.choice([0, rng.uniform(3, 12)])
        along = np.cos(angle) * x + np.sin(angle) * x[:, None]  # the position along a random direction
        t = (along - along.min()) / np.ptp(along) if waves == 0 else 0.5 + 0.5 * np.sin(2 * np.pi * waves * along)
        image = Image.fromarray((c1 + t[..., None] * (c2 - c1)).astype(np.uint8))
        draw = ImageDraw.Draw(image)  # drawn at twice the size, then 2x2 pixels averaged: antialiasing
        shapes = [(label, rng.uniform(0.14, 0.26), colour(rng.choice(hues))) for _ in range(rng.integers(3, 7))]
        shapes.insert(rng.integers(len(shapes) + 1), (rng.integers(len(SHAPES)), rng.uniform(0.08, 0.12),
                                                     rng.uniform(0, 255, 3)))  # the distractor
        for kind, radius, rgb in shapes:
            centre, angle, radius = rng.uniform(0, big, 2), rng.uniform(0, 2 * np.pi), radius * big
            fill = tuple(rgb.astype(int).tolist())
            if SHAPES[self.classes[kind]] is None:
                draw.ellipse([*(centre - radius), *(centre + radius)], outline=fill, width=max(1, round(0.4 * radius)))
            else:
                rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
                draw.polygon([tuple(p) for p in SHAPES[self.classes[kind]] @ rotation.T * radius + centre], fill=fill)
        return v2.functional.pil_to_tensor(image.reduce(2)), label
