"""Datasets, image loading, transforms, masks and loaders, on tiny images made here."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import (MEAN, STD, MaskedImages, SyntheticShapes, build_dataset, eval_transform,
                  load_rgb, make_loader, normalize, pretrain_transform, read_image, set_epoch)


def pixels(image):
    return np.asarray(image, dtype=np.int64)


# ----------------------------------------------------------------------------- SyntheticShapes

def test_synthetic_is_deterministic_per_index_and_split():
    a, b = SyntheticShapes(10, 32, seed=0), SyntheticShapes(10, 32, seed=0)
    assert np.array_equal(pixels(a[3][0]), pixels(b[3][0]))
    assert not np.array_equal(pixels(a[3][0]), pixels(a[4][0]))
    val = SyntheticShapes(10, 32, split="val", seed=0)
    assert not np.array_equal(pixels(a[3][0]), pixels(val[3][0]))
    assert not np.array_equal(pixels(a[3][0]), pixels(SyntheticShapes(10, 32, seed=1)[3][0]))


@pytest.mark.parametrize("size", [16, 32, 224])
def test_synthetic_any_size(size):
    image, label = SyntheticShapes(3, size)[2]
    assert image.dtype == torch.uint8 and image.shape == (3, size, size)
    assert isinstance(label, int)


def test_synthetic_labels_cover_all_classes_evenly():
    dataset = SyntheticShapes(200, 16)
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert labels == dataset.targets
    counts = np.bincount(labels, minlength=10)
    assert len(dataset.classes) == 10 and len(counts) == 10
    assert counts.min() >= 15 and counts.max() <= 25


def test_synthetic_label_is_not_in_the_mean_colour():
    # A nearest-class-mean classifier on per-image mean RGB must stay near chance (10%).
    def mean_rgb(dataset):
        return np.stack([pixels(dataset[i][0]).mean((1, 2)) for i in range(len(dataset))])
    train, val = SyntheticShapes(500, 16, "train"), SyntheticShapes(500, 16, "val")
    x_train, x_val = mean_rgb(train), mean_rgb(val)
    y_train, y_val = np.array(train.targets), np.array(val.targets)
    centres = np.stack([x_train[y_train == c].mean(0) for c in range(10)])
    predicted = np.linalg.norm(x_val[:, None] - centres[None], axis=2).argmin(1)
    assert (predicted == y_val).mean() < 0.2


# ----------------------------------------------------------------------------- image files

def write_awkward_images(folder):
    """One image per awkward mode, with the RGB value each should load as (None: don't check)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 6), 100).save(folder / "gray.png")
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(folder / "clear.png")  # fully transparent red
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((6, 8), 32896, dtype=np.uint16)).save(folder / "deep.png")  # 16-bit mid grey
    Image.new("RGB", (8, 6), (1, 2, 3)).save(folder / "plain.png")
    return {"gray.png": (100, 100, 100), "palette.png": (10, 200, 30), "clear.png": (255, 255, 255),
            "cmyk.jpg": (255, 0, 0), "deep.png": (128, 128, 128), "plain.png": (1, 2, 3)}


def test_load_rgb_converts_every_mode(tmp_path):
    expected = write_awkward_images(tmp_path)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really a 16-bit file
    for name, rgb in expected.items():
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (8, 6)
        assert np.abs(pixels(image) - rgb).max() <= 3, name  # JPEG may be off by a little


def make_imagefolder(root, split_name="train", classes=("cat", "dog"), per_class=4):
    for c, name in enumerate(classes):
        folder = root / split_name / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (c * 100, i, 0)).save(folder / f"{i}.png")


def test_imagefolder_labels_and_rgb(tmp_path):
    write_awkward_images(tmp_path / "train" / "a")
    make_imagefolder(tmp_path, classes=("b",), per_class=2)
    make_imagefolder(tmp_path, "validation", classes=("a", "b"), per_class=1)
    train = build_dataset("imagefolder", str(tmp_path), "train")
    assert train.classes == ["a", "b"] and len(train) == 8
    assert sorted(train.targets) == [0] * 6 + [1] * 2
    for i in range(len(train)):
        image, label = train[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and label == train.targets[i]
    val = build_dataset("imagenette", str(tmp_path), "val")  # "validation" counts as val
    assert val.targets == [0, 1]


def test_folder_finds_nested_images_unlabelled(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "top.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "a" / "b" / "deep.PNG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    dataset = build_dataset("folder", str(tmp_path), "train")
    assert len(dataset) == 2 and dataset.targets == [-1, -1]
    image, label = dataset[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and label == -1
    (tmp_path / "train2017").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train2017" / "1.jpg")
    assert len(build_dataset("coco", str(tmp_path), "train")) == 1
    (tmp_path / "images" / "validation").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "validation" / "1.jpg")
    assert len(build_dataset("ade20k", str(tmp_path), "val")) == 1


def test_cifar_falls_back_to_imagefolder(tmp_path):
    make_imagefolder(tmp_path, "test", classes=("airplane", "cat"), per_class=2)
    dataset = build_dataset("cifar10", str(tmp_path), "val")
    assert dataset.classes == ["airplane", "cat"] and len(dataset) == 4


def test_fraction_is_class_balanced(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=6)
    half = build_dataset("imagenet", str(tmp_path), "train", fraction=0.5, seed=0)
    assert np.bincount(half.targets).tolist() == [3, 3, 3]
    assert half.classes == ["a", "b", "c"]
    assert [half[i][1] for i in range(len(half))] == half.targets
    other = build_dataset("imagenet", str(tmp_path), "train", fraction=0.5, seed=1)
    assert other.indices != half.indices  # the seed picks which images
    unlabelled = build_dataset("folder", str(tmp_path), "train", fraction=0.5)
    assert len(unlabelled) == 9
    assert len(build_dataset("synthetic", None, "train", num_images=100, fraction=0.1)) == 10


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_dataset("food101", str(tmp_path / "missing"), "train")
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_dataset("folder", str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match=r"<root>/train/<class>/"):
        build_dataset("cars", str(tmp_path), "train")  # no train/ at all
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.jpg")
    with pytest.raises(FileNotFoundError, match="no class folders.*ImageFolder layout"):
        build_dataset("imagenet", str(tmp_path), "train")
    with pytest.raises(AssertionError, match="mnist"):  # the command line names the known ones
        build_dataset("mnist", str(tmp_path), "train")


# ----------------------------------------------------------------------------- transforms

def test_pretrain_transform_normalises():
    grey = torch.full((3, 30, 40), 128, dtype=torch.uint8)
    out = normalize(pretrain_transform(32)(grey))  # uint8 crops, normalised on the training device
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    assert torch.allclose(normalize(out, undo=True), torch.full((3, 32, 32), 128 / 255), atol=1e-5)
    strong = pretrain_transform(32, crop_min_scale=0.25, strong=True)(SyntheticShapes(1, 48)[0][0])
    assert strong.shape == (3, 32, 32) and strong.dtype == torch.uint8
    assert eval_transform(32)(torch.zeros(3, 40, 50, dtype=torch.uint8)).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- the loader against plain torchvision
# Test images carry their coordinates (red = x, green = y), so the crop box and flip can be read back from pixels.
GREY_STD = torch.tensor(STD).view(3, 1, 1) * 255  # normalised units -> grey levels


def coordinate_jpeg(folder, width, height, mode="RGB"):
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    path = str(folder / f"{width}x{height}{mode}.jpg")
    Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)).convert(mode).save(path, quality=95)
    return path


def torchvision_crop(path, seed, scale, size=224):
    """The plain torchvision pipeline: PIL decode, RandomResizedCrop, flip, ToTensor, Normalize."""
    from torchvision import transforms as T
    torch.manual_seed(seed)
    return T.Compose([T.RandomResizedCrop(size, scale, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])(Image.open(path).convert("RGB"))


def our_crop(path, seed, scale, size=224):
    torch.manual_seed(seed)
    out = pretrain_transform(size, scale[0])(read_image(path))
    assert out.dtype == torch.uint8 and out.shape == (3, size, size)
    return normalize(out)


def grey_levels(a, b):
    return ((a - b).abs() * GREY_STD).mean().item()


def geometry(normalised, width, height, size=224, margin=16):
    """(centre x, centre y, width, height) of the crop as shares of the image, and the flip, read from
    the coordinate pattern by a linear fit of red per column and green per row."""
    grey = (normalised * GREY_STD + torch.tensor(MEAN).view(3, 1, 1) * 255).double()
    u = torch.arange(margin, size - margin, dtype=torch.double) - (size - 1) / 2
    inner = grey[:, margin:size - margin, margin:size - margin]
    fits = []
    for profile, n in ((inner[0].mean(0), width), (inner[1].mean(1), height)):
        slope, pixels = (profile * u).sum() / (u * u).sum(), (n - 1) / 255  # image pixels per grey level
        fits.append(((profile.mean() * pixels + 0.5) / n, abs(slope) * pixels * size / n, slope < 0))
    (cx, w, flipped), (cy, h, _) = fits
    return [cx.item(), cy.item(), w.item(), h.item(), float(flipped)]


@pytest.mark.parametrize("width, height, scale", [(160, 120, (0.08, 1.0)), (640, 480, (0.08, 1.0)),
                                                  (640, 480, (0.6, 1.0))])
def test_same_seed_same_crop_as_torchvision(tmp_path, width, height, scale):
    path = coordinate_jpeg(tmp_path, width, height)
    for seed in range(10):
        ref, out = torchvision_crop(path, seed, scale), our_crop(path, seed, scale)
        assert grey_levels(ref, out) < 1.0, (seed, grey_levels(ref, out))
        np.testing.assert_allclose(geometry(out, width, height), geometry(ref, width, height), atol=0.01)


def test_same_resampling_as_torchvision_on_texture(tmp_path):
    """A smooth pattern cannot see the resampling filter; noise can (no antialiasing: 1-3 grey levels off)."""
    path = str(tmp_path / "texture.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((640, 480), Image.BICUBIC).save(path, quality=95)
    for seed in range(6):
        assert grey_levels(torchvision_crop(path, seed, (0.08, 1.0)), our_crop(path, seed, (0.08, 1.0))) < 0.5


def test_crop_and_flip_statistics_match_torchvision(tmp_path):
    """Over 300 seeds each, disjoint, so that this checks the distribution and not the shared RNG draws."""
    path = coordinate_jpeg(tmp_path, 160, 120)
    ref = np.array([geometry(torchvision_crop(path, s, (0.08, 1.0), 64), 160, 120, 64, 4) for s in range(300)])
    out = np.array([geometry(our_crop(path, s, (0.08, 1.0), 64), 160, 120, 64, 4) for s in range(10_000, 10_300)])
    assert 0.25 < ref[:, 4].mean() < 0.75 and ref[:, 2].min() < 0.4 and ref[:, 2].max() > 0.95  # the read-back works
    # about 3.5 standard deviations of the difference between two samples of 300
    np.testing.assert_allclose(out[:, :4].mean(0), ref[:, :4].mean(0), atol=0.04)
    assert abs(out[:, 4].mean() - ref[:, 4].mean()) < 0.15
    np.testing.assert_allclose(np.percentile(out[:, :4], [25, 50, 75], 0), np.percentile(ref[:, :4], [25, 50, 75], 0),
                               atol=0.1)


def test_read_image_gives_pils_pixels(tmp_path):
    expected = write_awkward_images(tmp_path)  # PNGs of every mode, and a CMYK JPEG
    paths = [tmp_path / name for name in expected] + [coordinate_jpeg(tmp_path, 64, 48, mode) for mode in ("L", "CMYK")]
    for path in paths:
        ours, pil = read_image(path), torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert ours.dtype == torch.uint8 and torch.equal(ours, pil), path
    (tmp_path / "cut.jpg").write_bytes(open(paths[-1], "rb").read()[:200])
    with pytest.raises(OSError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_normalize_is_totensor_then_normalize():
    from torchvision import transforms as T
    image = torch.randint(0, 256, (3, 37, 41), dtype=torch.uint8)
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(image.permute(1, 2, 0).numpy()))
    assert torch.equal(normalize(image[None])[0], expected)


# ----------------------------------------------------------------------------- masks and loaders

@pytest.mark.parametrize("method,ratio,shape", [("splitmask", 0.5, (2, 32)), ("splitmask", 0.75, (2, 16)),
                                                ("beit", 0.4, (26,))])
def test_masked_images_shapes(method, ratio, shape):
    dataset = MaskedImages(SyntheticShapes(4, 32), pretrain_transform(32), (8, 8), method, ratio)
    image, mask, label = dataset[1]
    assert image.shape == (3, 32, 32) and mask.shape == shape and mask.dtype == torch.int64
    assert label == 1
    assert mask.unique().numel() == mask.numel() and 0 <= mask.min() and mask.max() < 64
    if ratio == 0.5:  # the two branches are exact complements
        assert sorted(mask.flatten().tolist()) == list(range(64))


def batches(loader):
    return [(images.clone(), masks.clone(), labels.clone()) for images, masks, labels in loader]


def test_loader_is_reproducible_with_workers():
    dataset = MaskedImages(SyntheticShapes(8, 32), pretrain_transform(32), (4, 4), "splitmask", 0.5, min_block=4)

    def run():
        torch.manual_seed(0)
        return batches(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2))
    first, second = run(), run()
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    masks = first[0][1]
    assert not all(torch.equal(masks[0], m) for m in masks[1:])  # each sample gets its own mask


def test_make_loader_stacks_and_reshuffles():
    dataset = MaskedImages(SyntheticShapes(10, 16), pretrain_transform(16), (4, 4), "beit", 0.5, min_block=4)
    loader = make_loader(dataset, batch_size=4, train=True, workers=2, seed=0)
    set_epoch(loader, 0)
    epoch0 = batches(loader)
    assert len(epoch0) == 2  # drop_last in training
    images, masks, labels = epoch0[0]
    assert images.shape == (4, 3, 16, 16) and masks.shape == (4, 8) and labels.shape == (4,)
    set_epoch(loader, 1)  # reaches the persistent workers too
    epoch1 = batches(loader)
    assert not torch.equal(epoch0[0][1], epoch1[0][1])  # new masks (and order) every epoch
    # (seed, epoch) fixes everything, whatever the number of workers or what ran before
    again = make_loader(dataset, batch_size=4, train=True, workers=0, seed=0)
    set_epoch(again, 0)
    assert all(torch.equal(x, y) for x, y in zip(epoch0[0], batches(again)[0]))
    set_epoch(loader, 0)
    assert all(torch.equal(x, y) for x, y in zip(epoch0[1], batches(loader)[1]))
    assert len(make_loader(dataset, batch_size=4, train=False, workers=0)) == 3


def test_sample_augmentation_leaves_caller_rng_alone():
    dataset = MaskedImages(SyntheticShapes(2, 16), pretrain_transform(16), (4, 4), "splitmask", 0.5, min_block=4)
    torch.manual_seed(0)
    dataset[0]
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_make_loader_shards_under_ddp(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        loader = make_loader(SyntheticShapes(6, 16), batch_size=2, train=True, workers=0, seed=0)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        orders = []
        for epoch in (0, 1, 0):
            set_epoch(loader, epoch)
            orders.append(list(loader.sampler))
        assert orders[0] == orders[2] and orders[0] != orders[1]  # set_epoch reshuffles, reproducibly
    finally:
        torch.distributed.destroy_process_group()
