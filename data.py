"""Images in, (image tensor, mask, label) out: datasets, augmentations, masks and loaders.

Every dataset yields (PIL RGB image, int label), label -1 when there is none. `SyntheticShapes`
needs nothing from outside, so the whole pipeline runs on a fresh machine; `build_dataset` reads
the paper's datasets from the usual folder layouts. `MaskedImages` adds the per-image mask
(SplitMask's two branches, or BEiT's masked positions) and `make_loader` batches it all.
"""
import colorsys
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torchvision import transforms

from masking import beit_mask, split_patches

# ----------------------------------------------------------------------------- built-in scenes

def _fit(points):
    """An outline centred and scaled to fit the unit disc."""
    points = np.asarray(points, dtype=float)
    points = points - (points.min(0) + points.max(0)) / 2
    return points / np.linalg.norm(points, axis=1).max()


def _polygon(radii):  # radius radii[i] at angle 2*pi*i/len(radii): regular polygons and stars
    t = 2 * np.pi * np.arange(len(radii)) / len(radii)
    return np.stack([np.cos(t), np.sin(t)], 1) * np.asarray(radii, dtype=float)[:, None]


def _arc(cx, r, start, stop, n=24):  # n points on the circle of centre (cx, 0), angles in degrees
    t = np.radians(np.linspace(start, stop, n))
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)


_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
SHAPES = {name: None if outline is None else _fit(outline) for name, outline in {  # class c draws shape c
    "circle": _polygon(np.ones(48)), "square": _polygon(np.ones(4)), "triangle": _polygon(np.ones(3)),
    "star": _polygon([1.0, 0.4] * 5),
    "cross": 0.95 * np.array([[1, .3], [.3, .3], [.3, 1], [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3],
                              [-.3, -1], [.3, -1], [.3, -.3], [1, -.3]]),
    "ring": None,  # a thick circle outline: the background shows through the hole
    "crescent": np.concatenate([_arc(0, 1, 53.13, 306.87), _arc(0.6, 0.8, 270, 90)]),  # disc minus a disc
    "half-disc": _arc(0, 1, 0, 180),
    "arrow": [[1, 0], [0.1, 0.75], [0.1, 0.3], [-1, 0.3], [-1, -0.3], [0.1, -0.3], [0.1, -0.75]],
    "heart": np.stack([np.sin(_t) ** 3, -(13 * np.cos(_t) - 5 * np.cos(2 * _t) - 2 * np.cos(3 * _t)
                                         - np.cos(4 * _t)) / 16], 1)}.items()}


class SyntheticShapes(torch.utils.data.Dataset):
    """The built-in data: scenes drawn on the fly, so everything runs on a fresh machine.

    Class c is a kind of shape (circle, square, ...) in two complementary hues, c/20 and c/20 + 1/2 of
    the colour wheel: 3-6 such shapes and a small distractor of any kind and colour on a textured
    background of the same hues. Complementary colours average to grey, so an image's mean colour
    says little about its class: a model must learn which colours and outlines go together. Both
    halves of a scene show its class, as SplitMask's matching needs. Image i of a split is drawn from
    np.random.default_rng((seed, split, i)): the same on every machine and in every epoch.
    """

    def __init__(self, num_images=2000, img_size=32, split="train", seed=0):
        self.num_images, self.img_size, self.seed = num_images, img_size, seed
        self.split_id = ("train", "val", "test").index(split)
        self.classes = list(SHAPES)
        self.targets = [i % len(SHAPES) for i in range(num_images)]  # every split exactly class-balanced

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        rng, label = np.random.default_rng((self.seed, self.split_id, i)), self.targets[i]
        hues = (label / 20, label / 20 + 0.5)
        colour = lambda hue: np.float32(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.5, 1), rng.uniform(0.5, 1))) * 255
        ends = [colour(h) for h in rng.permutation(hues)]
        big = 2 * self.img_size  # drawn at twice the size, then 2x2 pixels averaged: antialiasing
        image = Image.fromarray(self._background(rng, *ends).astype(np.uint8)).resize((big, big), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        # 3-6 shapes of the label's kind, radii 14-26% of the width; one distractor at 8-12%; random order
        shapes = [(label, rng.uniform(0.14, 0.26) * big, rng.uniform(0, big, 2), colour(rng.choice(hues)))
                  for _ in range(rng.integers(3, 7))]
        distractor = (rng.integers(len(SHAPES)), rng.uniform(0.08, 0.12) * big, rng.uniform(0, big, 2),
                      rng.uniform(0, 255, 3))
        shapes.insert(rng.integers(len(shapes) + 1), distractor)
        for kind, radius, centre, rgb in shapes:
            angle, fill = rng.uniform(0, 2 * np.pi), tuple(rgb.astype(int).tolist())
            if self.classes[kind] == "ring":
                draw.ellipse([*(centre - radius), *(centre + radius)], outline=fill, width=max(1, round(0.4 * radius)))
            else:
                rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
                draw.polygon([tuple(p) for p in SHAPES[self.classes[kind]] @ rotation.T * radius + centre], fill=fill)
        return image.reduce(2), label

    def _background(self, rng, c1, c2):
        """Blobs, a linear gradient or soft stripes between colours c1 and c2: float32 [size, size, 3]."""
        size, kind = self.img_size, rng.integers(3)
        if kind == 0:  # a few random mixes of the two colours per side, upsampled
            cells = rng.integers(2, 6)
            blobs = Image.fromarray((c1 + rng.uniform(0, 1, (cells, cells, 1)) * (c2 - c1)).astype(np.uint8))
            return np.asarray(blobs.resize((size, size), Image.BILINEAR), dtype=np.float32)
        x = np.arange(size, dtype=np.float32) / size
        angle = rng.uniform(0, 2 * np.pi)
        along = np.cos(angle) * x + np.sin(angle) * x[:, None]  # position along a direction
        if kind == 1:
            t = (along - along.min()) / (along.max() - along.min())
        else:  # period between 1/12 and 1/3 of the image
            t = 0.5 + 0.5 * np.sin(2 * np.pi * along * rng.uniform(3, 12) + rng.uniform(0, 2 * np.pi))
        return c1 + t[..., None].astype(np.float32) * (c2 - c1)


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def load_rgb(path):
    """Open any image file as 8-bit RGB: grayscale, palette, alpha, CMYK and 16-bit included."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit values would clip to white under convert("L"): rescale 0..65535 to 0..255.
            pixels = np.asarray(image, dtype=np.float64)
            scale = 257.0 if image.mode != "I" or pixels.max() > 255 else 1.0
            return Image.fromarray((pixels / scale).round().clip(0, 255).astype(np.uint8)).convert("RGB")
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # convert("RGB") would keep whatever colour hides under transparent pixels; show them
            # on white instead, as an image viewer does.
            image = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image).convert("RGB")
        return image.convert("RGB")


def _image_files(folder):
    """Every image file under folder, recursively, in a fixed (sorted) order."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


class ImageFiles(torch.utils.data.Dataset):
    """A list of (path, label) pairs, read with load_rgb. `classes` names the labels."""

    def __init__(self, samples, classes):
        self.samples, self.classes = samples, classes
        self.targets = [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return load_rgb(path), label
        except (OSError, ValueError, SyntaxError) as e:  # name the file in the message
            raise OSError(f"{path}: {e}") from e


class Subset(torch.utils.data.Subset):
    """torch's Subset, keeping the `classes` and `targets` of what it picks from."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in indices]


# Folder names accepted for each split; the first one that exists is used.
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}
LABELLED_FOLDERS = ("imagefolder", "imagenette", "imagenet", "inat2018", "inat2019", "food101", "cars",
                    "clipart", "painting", "sketch")
DATASETS = ("synthetic", *LABELLED_FOLDERS, "cifar10", "cifar100", "folder", "coco", "ade20k")
# Training images of the paper's datasets (Table 1 and its appendix), for the quick recipe's share.
TRAIN_IMAGES = dict(imagenet=1_281_167, inat2018=437_513, inat2019=265_240, coco=118_287, food101=75_750,
                    painting=52_867, cifar10=50_000, cifar100=50_000, sketch=49_115, clipart=34_019,
                    ade20k=20_210, imagenette=9_469, cars=8_144)
# What a dataset's root must hold (the README's datasets table says where to get each).
IMAGE_FOLDER = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (the ImageFolder layout)"
LAYOUTS = {"folder": "image files anywhere under <root> (or under <root>/train/ and <root>/val/)",
           "coco": "<root>/train2017/*.jpg and <root>/val2017/*.jpg",
           "ade20k": "<root>/images/training/*.jpg and <root>/images/validation/*.jpg",
           "cifar10": "<root>/cifar-10-batches-py/ (the python version), or " + IMAGE_FOLDER,
           "cifar100": "<root>/cifar-100-python/ (the python version), or " + IMAGE_FOLDER}


def quick_fraction(name):
    """The share of a dataset's training images that makes about 10,000: a laptop-sized run."""
    return round(min(1.0, 10_000 / TRAIN_IMAGES.get(name, 10_000)), 3)


def _split_dir(root, split):
    return next((os.path.join(root, d) for d in SPLIT_DIRS[split] if os.path.isdir(os.path.join(root, d))), None)


def _missing(name, problem):
    return FileNotFoundError(f"--dataset={name}: {problem}. Expected {LAYOUTS.get(name, IMAGE_FOLDER)}; "
                             "the README's datasets table says where to get it")


def image_folder(root, split, name="imagefolder"):
    """The ImageFolder layout <root>/<split>/<class>/<image>, class names sorted into labels."""
    folder = _split_dir(root, split)
    if folder is None:
        raise _missing(name, f"no {' or '.join(SPLIT_DIRS[split])} folder in {root}")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise _missing(name, f"no class folders in {folder}")
    samples = [(path, label) for label, c in enumerate(classes) for path in _image_files(os.path.join(folder, c))]
    if not samples:
        raise _missing(name, f"no image files in the class folders of {folder}")
    return ImageFiles(samples, classes)


def image_files(folder, name="folder"):
    """Every image found under folder, unlabelled (label -1): COCO, ADE20k, any photo collection."""
    files = _image_files(folder) if os.path.isdir(folder) else []
    if not files:
        raise _missing(name, f"no image files under {folder}")
    return ImageFiles([(f, -1) for f in files], classes=[])


def pick_fraction(dataset, fraction, seed):
    """The same fraction of every class (chosen by seed); a random fraction of unlabelled sets."""
    if fraction == 1.0:
        return dataset
    targets = np.asarray(dataset.targets)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(targets):  # unlabelled sets are the single "class" -1
        members = rng.permutation(np.flatnonzero(targets == c))
        picked += members[:max(1, round(fraction * len(members)))].tolist()
    return Subset(dataset, sorted(picked))


def build_dataset(name, root, split, img_size=224, fraction=1.0, seed=0, num_images=None):
    """A dataset of (PIL RGB image, int label) by name; `fraction` < 1 keeps a class-balanced part.
    Raises FileNotFoundError naming the layout expected when root does not hold the dataset."""
    assert name in DATASETS and split in SPLIT_DIRS and 0 < fraction <= 1, (name, split, fraction)
    if name == "synthetic":  # root is ignored: the images are drawn on the fly
        dataset = SyntheticShapes(num_images or (2000 if split == "train" else 500), img_size, split, seed)
    elif not root:
        raise _missing(name, "it needs --data_root=<its folder>")
    elif not os.path.isdir(root):
        raise _missing(name, f"--data_root={root} is not a folder")
    elif name in LABELLED_FOLDERS:
        dataset = image_folder(root, split, name)
    elif name in ("cifar10", "cifar100"):
        pickles = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        if os.path.isdir(os.path.join(root, pickles)):
            from torchvision.datasets import CIFAR10, CIFAR100
            dataset = (CIFAR10 if name == "cifar10" else CIFAR100)(root, train=split == "train", download=False)
        else:  # e.g. CIFAR as image files in class folders
            dataset = image_folder(root, split, name)
    elif name == "folder":
        dataset = image_files(_split_dir(root, split) or root, name)
    elif name == "coco":
        dataset = image_files(os.path.join(root, "train2017" if split == "train" else "val2017"), name)
    else:  # ade20k
        dataset = image_files(os.path.join(root, "images", "training" if split == "train" else "validation"), name)
    return pick_fraction(dataset, fraction, seed)


# ----------------------------------------------------------------------------- augmentations

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the usual normalisation for ViTs
STD = (0.229, 0.224, 0.225)


def pretrain_transform(img_size, crop_min_scale=0.08, strong=False):
    """Random resized crop and flip; strong=True adds the small-dataset colour and blur set.

    crop_min_scale is the smallest crop, as a fraction of the image area. The paper says ADE20k
    crops "at most 25%" of the image; we read that as crops covering at least 25% of the image
    (crop_min_scale=0.25), since scene images lose their layout in tiny crops.
    """
    steps = [transforms.RandomResizedCrop(img_size, scale=(crop_min_scale, 1.0),
                                          interpolation=transforms.InterpolationMode.BICUBIC),
             transforms.RandomHorizontalFlip()]
    if strong:  # probabilities as in BYOL / DINO; blur sized relative to the image (23 px at 224)
        kernel = 2 * round(0.05 * img_size) + 1
        steps += [transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  transforms.RandomGrayscale(p=0.2),
                  transforms.RandomApply([transforms.GaussianBlur(kernel, (0.1, 2.0 * img_size / 224))], p=0.5),
                  transforms.RandomSolarize(threshold=128, p=0.2)]
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(steps)


def finetune_transform(img_size, randaug_magnitude=9, color_jitter=0.4, erase_prob=0.25):
    """DeiT/BEiT fine-tuning augmentation: crop, flip, colour jitter, RandAugment (2 ops), random
    erasing after normalisation. (torchvision's RandAugment has no magnitude noise, the paper's std 0.5.)"""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ColorJitter(color_jitter, color_jitter, color_jitter),
        transforms.RandAugment(2, randaug_magnitude), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        transforms.RandomErasing(erase_prob)])


def eval_transform(img_size, crop_ratio=0.875):
    """Resize the short side to img_size / crop_ratio (256 for 224), then take the centre crop."""
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def denormalize(images):
    """Undo Normalize(MEAN, STD) on [3, H, W] or [B, 3, H, W] images, clamped to [0, 1] for display."""
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------- masks and loaders


class Augmented(torch.utils.data.Dataset):
    """(image tensor, label): the transform of sample i in epoch e runs under a seed made of
    (seed, e, i) alone, so it does not depend on worker count, process count or where a resumed
    run restarted. set_epoch(loader, e) reaches the copies in persistent workers (shared memory)."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.classes = getattr(dataset, "classes", [])
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self.unreadable = torch.zeros((), dtype=torch.long).share_memory_()  # this epoch, all workers
        self.warned = set()  # in this process: a file is named once per run, not once per epoch

    def __len__(self):
        return len(self.dataset)

    def sample_seed(self, i):
        return int(np.random.SeedSequence((self.seed, int(self.epoch), i)).generate_state(1)[0])

    def load(self, i):
        """dataset[i]; an unreadable image is replaced by the next readable one. It is counted where it is
        sample i itself (so once per epoch, whatever replaces what) and named in a warning once."""
        for j in range(i, i + 100):
            try:
                return self.dataset[j % len(self.dataset)]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self.unreadable += j == i
                if j not in self.warned:
                    self.warned.add(j)
                    print(f"warning: skipping unreadable image {j}: {e}", file=sys.stderr)
        raise RuntimeError(f"100 unreadable images in a row from index {i}: is this an image dataset?")

    def __getitem__(self, i):
        image, label = self.load(i)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.default_generator.manual_seed(self.sample_seed(i))  # not torch.manual_seed: it reseeds CUDA too
            return self.transform(image), label


class MaskedImages(Augmented):
    """(image tensor, mask, label): the mask is SplitMask's [2, k] visible patch indices of branches
    A and B, or BEiT's [m] masked patch indices. Counts are exact, so default collation stacks them."""

    def __init__(self, dataset, transform, grid, method="splitmask", mask_ratio=0.5, mask_kind="block",
                 min_block=16, seed=0):
        super().__init__(dataset, transform, seed)
        self.method, self.grid = method, (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.mask_ratio, self.mask_kind, self.min_block = mask_ratio, mask_kind, min_block

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        rng = np.random.default_rng(self.sample_seed(i))
        if self.method == "splitmask":
            mask = split_patches(self.grid, self.mask_ratio, rng, self.mask_kind, self.min_block)
        else:
            mask = np.flatnonzero(beit_mask(self.grid, self.mask_ratio, rng, self.mask_kind, self.min_block))
        return image, torch.from_numpy(mask).long(), label


class Sampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for a run resumed mid-epoch."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def leave_stop_signal_to_main(worker_id):
    """Ctrl-C and a scheduler's SIGUSR1 reach every process of the job: the main process saves and exits,
    its loader workers must not die of them. (PyTorch's workers die of a SIGTERM not sent by their
    parent, so with --workers>0 send SIGTERM to the main process only.)"""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size, train=True, workers=4, seed=0, drop_last=None):
    """A DataLoader whose order is a function of (seed, epoch): call set_epoch(loader, epoch) before
    every epoch. Sharded across processes under torch.distributed (for evaluation with
    drop_last=False, DistributedSampler repeats a few samples so every process gets as many)."""
    drop_last = train if drop_last is None else drop_last
    distributed = dist.is_available() and dist.is_initialized()
    sampler = Sampler(
        dataset, num_replicas=dist.get_world_size() if distributed else 1, rank=dist.get_rank() if distributed else 0,
        shuffle=train, seed=seed, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
        drop_last=drop_last, persistent_workers=workers > 0, worker_init_fn=leave_stop_signal_to_main,
        generator=torch.Generator().manual_seed(seed))  # worker seeds: not drawn from the global RNG


def set_epoch(loader, epoch, skip_batches=0):
    """Reshuffle for this epoch, start it after skip_batches batches, and give the dataset's
    augmentations and masks their epoch (and a fresh count of unreadable images)."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_batches * loader.batch_size
    if hasattr(loader.dataset, "epoch"):
        loader.dataset.epoch.fill_(epoch)
        loader.dataset.unreadable.zero_()
