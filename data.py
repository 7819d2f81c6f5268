"""Images in, batches out: datasets (each item a uint8 image [3, H, W] and a label, -1 if none), augmentations
(torchvision's, on uint8 tensors: 3-4x faster than on PIL images; pre-training batches stay uint8 until `normalize`
runs on the device), masks and loaders."""
import functools
import math
import os
import shlex
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

import common
from masking import beit_mask, split_patches
from scenes import SyntheticShapes  # the built-in data


# ----------------------------------------------------------------------------- image files
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def load_rgb(path):
    """Open any image file as an 8-bit RGB PIL image: grayscale, palette, alpha, CMYK and 16-bit included."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # convert("L") would clip 16-bit values to white
            pixels = np.asarray(image, dtype=np.float64)
            scale = 257.0 if image.mode != "I" or pixels.max() > 255 else 1.0
            return Image.fromarray((pixels / scale).round().clip(0, 255).astype(np.uint8)).convert("RGB")
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # on white, as a viewer shows it
            image = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
        return image.convert("RGB")


def read_image(path):
    """Any image file as a uint8 RGB tensor [3, H, W] (JPEGs by torchvision: PIL's pixels, faster; others by load_rgb).
    An unreadable file raises OSError, its message starting with the file's name."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:3] == b"\xff\xd8\xff":
            return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return v2.functional.pil_to_tensor(load_rgb(path))
    except (OSError, ValueError, SyntaxError, RuntimeError) as e:
        raise OSError(f"{path}: {e}") from e


class ImageFiles(torch.utils.data.Dataset):
    """A list of (path, label) pairs, read with read_image. `classes` names the labels."""
    def __init__(self, samples, classes):
        self.samples, self.classes, self.targets = samples, classes, [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return read_image(self.samples[i][0]), self.samples[i][1]


def _image_files(folder):  # every image file under folder, recursively, in a fixed (sorted) order
    return sorted(os.path.join(parent, f) for parent, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------- datasets
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}
LABELLED_FOLDERS = ("imagefolder", "imagenette", "imagenet", "inat2018", "inat2019", "food101", "cars",
                    "clipart", "painting", "sketch")
CIFAR_PYTHON = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's download
# Unlabelled image collections (label -1) with fixed layouts: name -> its (train, val) folders under the root.
UNLABELLED = {"coco": ("train2017", "val2017"), "ade20k": ("images/training", "images/validation")}
DATASETS = ("synthetic", *LABELLED_FOLDERS, *CIFAR_PYTHON, "folder", *UNLABELLED)
TRAIN_IMAGES = dict(imagenet=1_281_167, inat2018=437_513, inat2019=265_240, coco=118_287, food101=75_750,
                    painting=52_867, cifar10=50_000, cifar100=50_000, sketch=49_115, clipart=34_019,
                    ade20k=20_210, imagenette=9_469, cars=8_144)  # the paper's datasets' training images
QUICK_FRACTION = {name: round(min(1.0, 10_000 / TRAIN_IMAGES[name]), 3) if name in TRAIN_IMAGES else 10_000.0
                  for name in DATASETS}  # the quick recipe's ~10,000 images: a share, or for a folder the number
# What a dataset's root must hold (the README's datasets table says where to get each).
IMAGE_FOLDER = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (the ImageFolder layout)"
LAYOUTS = {"folder": "image files anywhere under <root> (or under <root>/train/ and <root>/val/)",
           **{name: f"<root>/{train}/*.jpg and <root>/{val}/*.jpg" for name, (train, val) in UNLABELLED.items()},
           **{name: f"<root>/{pickles}/ (the python version), or {IMAGE_FOLDER}"
              for name, pickles in CIFAR_PYTHON.items()}}


def _missing(name, problem):
    return FileNotFoundError(f"--dataset={name}: {problem}. Expected {LAYOUTS.get(name, IMAGE_FOLDER)}; "
                             "the README's datasets table says where to get it")


def _split_dir(root, split):
    return next((os.path.join(root, d) for d in SPLIT_DIRS[split] if os.path.isdir(os.path.join(root, d))), None)


def build_dataset(name, root, split, img_size=224, fraction=1.0, seed=0, num_images=None):
    """A dataset of (uint8 image, int label) by name; `fraction` < 1 keeps a class-balanced share (chosen by seed),
    above 1 about that many images. Raises FileNotFoundError naming the layout expected when root lacks the dataset."""
    assert name in DATASETS and split in SPLIT_DIRS and 0 < fraction, (name, split, fraction)
    if name == "synthetic":  # drawn on the fly: no root
        dataset = SyntheticShapes(num_images or (2000 if split == "train" else 500), img_size, split, seed)
    elif not root or not os.path.isdir(root):
        raise _missing(name, f"--data_root={root} is not a folder" if root else "it needs --data_root=<its folder>")
    elif name in CIFAR_PYTHON and os.path.isdir(os.path.join(root, CIFAR_PYTHON[name])):
        from torchvision.datasets import CIFAR10, CIFAR100
        dataset = (CIFAR10 if name == "cifar10" else CIFAR100)(root, split == "train", v2.PILToTensor())
    elif name == "folder" or name in UNLABELLED:  # label -1: any photo collection, COCO, ADE20k
        folders = UNLABELLED.get(name)  # "folder": <root>/train/ and <root>/val/ if there are, else all of <root>
        folder = os.path.join(root, folders[split != "train"]) if folders else _split_dir(root, split) or root
        dataset = ImageFiles([(path, -1) for path in _image_files(folder)], classes=[])
        if not dataset.samples:
            raise _missing(name, f"no image files under {folder}")
    else:  # the ImageFolder layout <root>/<split>/<class>/<image> (CIFAR's too), class names sorted into labels
        folder = _split_dir(root, split)
        if folder is None:  # two likely mistakes: a split folder given as the root, a flat folder of images
            split_itself = os.path.basename(os.path.normpath(root)) in (*SPLIT_DIRS["train"], *SPLIT_DIRS["val"])
            hint = (f"; {root} looks like a split folder itself: point --data_root at its parent" if split_itself
                    else "; for images without class folders use --dataset=folder" if _image_files(root) else "")
            raise _missing(name, f"no {' or '.join(SPLIT_DIRS[split])} folder in {root}{hint}")
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not classes:
            raise _missing(name, f"no class folders in {folder}")
        samples = [(path, label) for label, c in enumerate(classes) for path in _image_files(os.path.join(folder, c))]
        if not samples:
            raise _missing(name, f"no image files in the class folders of {folder}")
        dataset = ImageFiles(samples, classes)
    fraction = min(1.0, fraction / len(dataset)) if fraction > 1 else fraction  # a number of images: its share
    if fraction == 1.0:
        return dataset
    targets, rng, picked = np.asarray(dataset.targets), np.random.default_rng(seed), []
    for c in np.unique(targets):  # the same share of every class; unlabelled sets are the one class -1
        members = rng.permutation(np.flatnonzero(targets == c))
        picked += members[:max(1, round(fraction * len(members)))].tolist()
    subset = torch.utils.data.Subset(dataset, sorted(picked))
    subset.classes, subset.targets = dataset.classes, [dataset.targets[i] for i in subset.indices]
    return subset


def from_flags(cfg, split):
    """build_dataset with a script's flags (--num_images: training only); a missing dataset stops the run."""
    try:
        return build_dataset(cfg["dataset"], cfg["data_root"], split, cfg["img_size"], cfg["fraction"], cfg["seed"],
                             cfg["num_images"] if split == "train" else None)
    except FileNotFoundError as e:
        common.fail(e)


def check_unreadable(cfg, unreadable, num_images, which, examples=""):
    """After a pass over num_images (which: the images it read): too many unreadable ones stop the run, naming the
    --max_unreadable that would let it skip them."""
    if unreadable > cfg["max_unreadable"] * num_images:
        common.fail(f"{unreadable} of the {num_images} images {which} are unreadable{examples}: fix or remove them, or "
                    f"let the run skip them with --max_unreadable={math.ceil(100 * unreadable / num_images) / 100}")


def same_data(cfg, given):  # the flags given that name a run's data: a command suggested next passes them on
    return "".join(" " + shlex.quote(f"--{key}={cfg[key]}") for key in ("dataset", "data_root", "recipe", "fraction",
                                                                         "num_images") if key in given)


# ----------------------------------------------------------------------------- augmentations
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the usual normalisation for ViTs
STD = (0.229, 0.224, 0.225)
BICUBIC = v2.InterpolationMode.BICUBIC


def pretrain_transform(img_size, crop_min_scale=0.08, strong=False):
    """Random resized crop and flip, uint8 in and out; strong=True adds the small datasets' colour jitter, grayscale,
    blur (23 px at 224) and solarize. The paper crops ADE20k "at most 25%": we read it as crop_min_scale=0.25."""
    steps = [v2.RandomResizedCrop(img_size, (crop_min_scale, 1.0), interpolation=BICUBIC, antialias=True),
             v2.RandomHorizontalFlip()]
    if strong:  # probabilities as in BYOL and DINO
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
                  v2.RandomApply([v2.GaussianBlur(2 * round(0.05 * img_size) + 1, (0.1, 2.0 * img_size / 224))], p=0.5),
                  v2.RandomSolarize(threshold=128, p=0.2)]
    return v2.Compose(steps)


def finetune_transform(img_size, randaug_magnitude=9, color_jitter=0.4, erase_prob=0.25):
    """DeiT/BEiT fine-tuning augmentation: crop, flip, colour jitter, RandAugment (2 ops), random
    erasing after normalisation. (torchvision's RandAugment has no magnitude noise, the paper's std 0.5.)"""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, interpolation=BICUBIC, antialias=True), v2.RandomHorizontalFlip(),
        v2.ColorJitter(color_jitter, color_jitter, color_jitter), v2.RandAugment(2, randaug_magnitude),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), v2.RandomErasing(erase_prob)])


def eval_transform(img_size, crop_ratio=0.875, normalized=True):
    """Resize the short side to img_size / crop_ratio (256 for 224), then the centre crop (normalized=False: uint8)."""
    crop = [v2.Resize(int(img_size / crop_ratio), interpolation=BICUBIC, antialias=True), v2.CenterCrop(img_size)]
    return v2.Compose(crop + ([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)] if normalized else []))


def normalize(images, undo=False):
    """uint8 images [..., 3, H, W] -> what ToDtype(scale=True) + Normalize(MEAN, STD) give, on their device.
    undo=True: back to [0, 1] for display."""
    mean, std = _statistics(images.device)
    return (images * std + mean).clamp(0, 1) if undo else (images.float() / 255 - mean) / std


@functools.cache
def _statistics(device):  # made once per device: a tensor made from Python numbers on a GPU is a copy that waits
    return tuple(torch.tensor(stat, device=device).view(3, 1, 1) for stat in (MEAN, STD))


# ----------------------------------------------------------------------------- masks and loaders
class Augmented(torch.utils.data.Dataset):
    """(image, label), transformed under a seed made of (seed, epoch, i) alone: the same whatever the workers,
    processes or where a resumed run restarted. set_epoch reaches persistent workers' copies (shared memory)."""
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
        """dataset[i], or the next readable image; an unreadable one is counted as sample i (once per epoch,
        whatever replaces what) and named once."""
        for j in range(i, i + 100):
            try:
                return self.dataset[j % len(self.dataset)]
            except (OSError, Image.DecompressionBombError) as e:
                self.unreadable += j == i
                if j not in self.warned:
                    self.warned.add(j)
                    print(f"warning: skipping unreadable image {j}: {e}", file=sys.stderr)
        raise RuntimeError(f"100 unreadable images in a row from index {i}: is this an image dataset?")

    def seeded(self, i, fn, *args):
        """fn(*args) under the seed of sample i, leaving the caller's RNG stream untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.sample_seed(i))  # not torch.manual_seed: it reseeds CUDA too
            return fn(*args)

    def __getitem__(self, i):
        image, label = self.load(i)
        return self.seeded(i, self.transform, image), label


class MaskedImages(Augmented):
    """(image, patches, label): SplitMask's [2, k] visible patch indices of branches A and B, or BEiT's [m]
    masked patch indices. Counts are exact, so default collation stacks them."""
    def __init__(self, dataset, transform, grid, method="splitmask", mask_ratio=0.5, mask_kind="block",
                 min_block=16, seed=0):
        super().__init__(dataset, transform, seed)
        self.method, self.grid = method, (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.mask_ratio, self.mask_kind, self.min_block = mask_ratio, mask_kind, min_block

    def patches(self, i):  # SplitMask's visible patches, or BEiT's masked ones, of sample i
        args = (self.grid, self.mask_ratio, np.random.default_rng(self.sample_seed(i)), self.mask_kind, self.min_block)
        patches = split_patches(*args) if self.method == "splitmask" else np.flatnonzero(beit_mask(*args))
        return torch.from_numpy(patches)

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return image, self.patches(i).long(), label


class Sampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for a run resumed mid-epoch. own_shard=True: each process
    draws from its own shard of the images (rank, rank + world, ...: what a sharded device cache holds), reshuffled."""
    skip, own_shard = 0, False

    def __iter__(self):
        if not self.own_shard:
            return iter(list(super().__iter__())[self.skip:])
        shard = torch.arange(self.rank, len(self.dataset), self.num_replicas)
        order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(shard[order][:self.num_samples].tolist()[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def leave_stop_signals_to_main(worker_id):
    """Ctrl-C, SIGTERM, SIGUSR1 reach every process: the main one saves and exits; workers ignore them and follow it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def cpu_workers():  # loader processes per training process: the cores it may use, minus its own, at most 8
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def make_loader(dataset, batch_size, train=True, workers=4, seed=0, pin=False, collate_fn=None):
    """A DataLoader ordered by (seed, epoch) (set_epoch before every epoch), sharded across processes (in evaluation
    a few samples repeat to even the shards); pin=True: page-locked batches, which a GPU copies without waiting."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    sampler = Sampler(dataset, world, rank, shuffle=train, seed=seed, drop_last=train)
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, collate_fn=collate_fn,
        drop_last=train, persistent_workers=workers > 0, worker_init_fn=leave_stop_signals_to_main,
        generator=torch.Generator().manual_seed(seed))  # worker seeds: not drawn from the global RNG


def set_epoch(loader, epoch, skip_batches=0):
    """Reshuffle, start after skip_batches batches, give augmentations and masks their epoch, count unreadable anew."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_batches * loader.batch_size
    if hasattr(loader.dataset, "epoch"):
        loader.dataset.epoch.fill_(epoch)
        for count in ("unreadable", "cpu_decoded"):  # the device path counts images it decoded on the CPU too
            getattr(loader.dataset, count, torch.zeros(())).zero_()
