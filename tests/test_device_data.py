"""The device data path (device_data.py) against the worker path it replaces (data.MaskedImages: torchvision's
transforms in the loader workers), on the CPU."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import device_data
from test_faults import write_bad_files, write_images
from test_pretrain import ENV, ROOT, TINY, assert_same_weights, log_rows, run, wait_for_step, weights


def write_photos(folder, count=24, seed=0):
    """JPEGs of the built-in scenes at sizes and aspect ratios that differ, as a photo folder's do."""
    os.makedirs(folder, exist_ok=True)
    rng, scenes = np.random.default_rng(seed), data.SyntheticShapes(count, 64, seed=seed)
    for i in range(count):
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        Image.fromarray(scenes[i][0].permute(1, 2, 0).numpy()).resize(size).save(f"{folder}/{i}.jpg", quality=90)
    return str(folder)


def both_paths(folder, strong, epoch=0, img_size=32):
    """The same samples through the worker path and through the device path: (worker images, worker patches,
    device images, device patches, the draws)."""
    images = data.build_dataset("folder", folder, "train")
    transform = data.pretrain_transform(img_size, 0.08, strong)
    args = (images, transform, img_size // 4, "splitmask", 0.5, "block", 2)
    workers, device = data.MaskedImages(*args, seed=3), device_data.EncodedImages(*args, seed=3)
    workers.epoch.fill_(epoch)
    device.epoch.fill_(epoch)
    expected, expected_patches, _ = zip(*[workers[i] for i in range(len(images))])
    items, draws, patches, indices = device_data.collate([device[i] for i in range(len(images))])
    got, _ = device_data.DeviceBatches(device, torch.device("cpu")).make((items, draws, patches, indices))
    return torch.stack(expected), torch.stack(expected_patches), got, patches, draws


@pytest.mark.parametrize("epoch", [0, 5])
def test_the_device_path_makes_the_workers_crops_and_flips(tmp_path, epoch):
    """Same seed, same crop boxes and flips: on a CPU the same pixels (decode_jpeg and resized_crop are the worker
    path's own functions), and the same masks."""
    expected, expected_patches, got, patches, draws = both_paths(write_photos(tmp_path), strong=False, epoch=epoch)
    assert got.dtype == torch.uint8 and got.shape == expected.shape == (24, 3, 32, 32)
    assert torch.equal(got, expected)
    assert torch.equal(patches, expected_patches)
    flips, boxes = draws[:, device_data.D["flip"]], draws[:, :4]
    assert 0 < flips.sum() < len(flips) and len(set(map(tuple, boxes.tolist()))) == len(boxes)  # they do vary


def test_strong_augmentation_on_the_device_matches_the_workers_statistics(tmp_path):
    """Colour jitter in each image's drawn order, grayscale, blur (separable on the device) and solarize over the
    whole batch: per-channel mean and std within 0.5 grey levels of the worker path's, and at least 99% of the pixels
    the same (blur's float sums round differently here and there; jitter can carry a difference of one further)."""
    expected, _, got, _, draws = both_paths(write_photos(tmp_path, count=48), strong=True)
    for key in ("jitter", "gray", "blur", "solarize"):  # every step ran on some images and not on others
        assert 0 < draws[:, device_data.D[key]].sum() < len(draws), key
    e, g = expected.float().transpose(0, 1).flatten(1), got.float().transpose(0, 1).flatten(1)
    assert (e.mean(1) - g.mean(1)).abs().max() < 0.5 and (e.std(1) - g.std(1)).abs().max() < 0.5
    assert (got == expected).float().mean() > 0.99


def test_the_device_cache_keeps_the_crops_statistics(tmp_path):
    """The cache holds each image with its short side brought down (never up) to img_size / sqrt(0.75 crop_min_scale),
    boxes drawn on that size: a smaller image's crops are the worker path's, a larger one's cover the same share of
    it. Over 16 epochs of 48 photos, channel means and stds within 1 grey level of the worker path's, sharpness (mean
    step between neighbours) within 3%. (A cache at the evaluation size, 18 px here, fails: std off by 2.1 levels,
    sharpness 15% lower.)"""
    folder = write_photos(tmp_path, count=48)
    images = data.build_dataset("folder", folder, "train")
    dataset = device_data.EncodedImages(images, data.pretrain_transform(16, 0.08), 4, seed=3)
    side = device_data.cache_side(16, 0.08)
    cache = device_data.fill_cache(dataset, "all", torch.device("cpu"), side, workers=0)
    sizes = [data.read_image(path).shape[1:] for path, _ in images.samples]
    assert side == 66 and [min(image.shape[1:]) for image in cache] == [min(side, *size) for size in sizes]
    assert dataset.cached_sizes.tolist() == [list(image.shape[1:]) for image in cache]
    small, expected, got = [k for k, size in enumerate(sizes) if min(size) <= side], [], []
    for epoch in range(16):
        expected.append(both_paths(folder, strong=False, epoch=epoch, img_size=16)[0])
        dataset.epoch.fill_(epoch)
        items, draws, patches, indices = device_data.collate([dataset[i] for i in range(len(images))])
        assert all(item.numel() == 0 for item in items)  # the workers read nothing
        got.append(device_data.DeviceBatches(dataset, torch.device("cpu"), cache).make(
            (items, draws, patches, indices))[0])
        assert 0 < len(small) < len(sizes) and torch.equal(got[-1][small], expected[-1][small])
    expected, got = torch.cat(expected), torch.cat(got)
    e, g = expected.float().transpose(0, 1).flatten(1), got.float().transpose(0, 1).flatten(1)
    assert (e.mean(1) - g.mean(1)).abs().max() < 1 and (e.std(1) - g.std(1)).abs().max() < 1
    sharpness = [(x.float()[..., 1:] - x.float()[..., :-1]).abs().mean() for x in (expected, got)]
    assert abs(sharpness[1] / sharpness[0] - 1) < 0.03


def test_a_sharded_cache_gives_each_process_its_own_shard_reshuffled():
    dataset = list(range(50))
    shards = []
    for rank in range(4):
        sampler = data.Sampler(dataset, 4, rank, shuffle=True, seed=0, drop_last=True)
        sampler.own_shard = True
        epochs = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            epochs.append(list(sampler))
        for order in epochs:  # 12 of its own 12 or 13 images (every process takes as many steps), in a new order
            assert set(order) <= set(range(rank, 50, 4)) and len(order) == len(set(order)) == len(sampler) == 12
        assert epochs[0] != epochs[1]
        shards.append(set(epochs[0]))
    assert not set.intersection(*shards)


def test_a_device_path_run_resumes_bit_exact_and_trains_as_the_workers_do(tmp_path):
    """Killed by SIGTERM mid-epoch and resumed, the device path ends with the weights of the worker path's
    uninterrupted run on the same JPEG folder (on a CPU the same images reach the model)."""
    folder = write_photos(tmp_path / "photos", count=64)
    flags = [*TINY, "--dataset=folder", f"--data_root={folder}", "--strong_aug=True"]
    run("pretrain.py", *flags, "--loader=workers", f"--out_dir={tmp_path / 'workers'}")
    out = str(tmp_path / "device")
    process = subprocess.Popen([sys.executable, "pretrain.py", *flags, "--loader=device", f"--out_dir={out}"],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(process, out, 2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stop signal" in output, output
    resumed = run("pretrain.py", *flags, "--loader=device", f"--out_dir={out}")
    assert "resuming" in resumed.stdout
    assert_same_weights(weights(out), weights(str(tmp_path / "workers")))
    assert [row["cpu_decoded"] for row in log_rows(out)] == [0] * len(log_rows(out))  # all JPEGs, decoded by the device


@pytest.mark.parametrize("cache", ["off", "device"])
def test_unreadable_images_on_the_device_path_are_skipped_and_counted(tmp_path, cache):
    write_images(tmp_path / "images", 61)  # JPEG, CMYK JPEG, PNGs of every mode
    write_bad_files(tmp_path / "images")  # an empty file, a text file, a truncated JPEG (its header reads)
    result = run("pretrain.py", "--dataset=folder", f"--data_root={tmp_path / 'images'}", *TINY, "--epochs=1",
                 "--max_unreadable=0.05", "--loader=device", f"--cache={cache}", f"--out_dir={tmp_path / 'run'}")
    for name in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert name in result.stderr
    last = log_rows(str(tmp_path / "run"))[-1]
    if cache == "off":
        assert last["unreadable"] == 3 and last["cpu_decoded"] > 0  # the PNGs
    else:  # read once, when the cache is filled
        assert "device cache filled: 64 images (" in result.stdout and "3 unreadable ones replaced" in result.stdout
    too_many = run("pretrain.py", "--dataset=folder", f"--data_root={tmp_path / 'images'}", *TINY, "--epochs=1",
                   "--tokenizer=random_projection", "--log_every=4", "--loader=device", f"--cache={cache}",
                   f"--out_dir={tmp_path / 'strict'}", check=False)
    assert too_many.returncode != 0 and "unreadable" in too_many.stderr


def test_the_cache_plan_follows_the_free_memory(monkeypatch, capsys, tmp_path):
    """--cache=auto keeps the set on each GPU when it takes at most 25% of the free memory, shards it across the
    processes when only a share fits, else leaves it off; --cache=device shards or keeps it whatever the memory; a CPU
    caches only when asked. The plan is printed."""
    import common
    folder = write_photos(tmp_path, count=8)
    dataset = device_data.EncodedImages(data.build_dataset("folder", folder, "train"), data.pretrain_transform(16), 4)
    side = device_data.cache_side(16, 0.08)
    need = sum(3 * h * w * min(1, side / min(h, w)) ** 2 for h, w in (dataset.read(i)[1] for i in range(8)))
    monkeypatch.setattr(common, "WORLD", 4)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    for free, auto, device in ((4 * need + 1, "all", "all"), (need, "shard", "shard"), (need / 2, "off", "shard")):
        monkeypatch.setattr(device_data, "free_memory", lambda device: free if device.type == "cuda" else float("inf"))
        for cache, plan in (("auto", auto), ("device", device)):
            cfg = dict(cache=cache, img_size=16, crop_min_scale=0.08, seed=0)
            assert device_data.plan_cache(cfg, dataset, gpu) == plan, (free / need, cache)
            assert f"device cache (--cache={cache}): {plan}: 8 images" in capsys.readouterr().out
    assert device_data.plan_cache(dict(cfg, cache="auto"), dataset, cpu) == "off"
    assert device_data.plan_cache(dict(cfg, cache="device"), dataset, cpu) == "all"  # host memory: not checked
    assert device_data.plan_cache(dict(cfg, cache="off"), dataset, gpu) == "off"


def test_the_cache_needs_the_device_loader(tmp_path):
    result = run("pretrain.py", *TINY, "--loader=workers", "--cache=device", f"--out_dir={tmp_path}", check=False)
    assert result.returncode == 1 and "--cache=device needs the device loader: --loader=device" in result.stderr


def test_a_resumed_run_keeps_the_order_it_drew_its_batches_in(monkeypatch, capsys, tmp_path):
    """Whether batches come from per-process shards is saved in the checkpoint: a resumed run keeps it whatever the
    free memory now says (else the batches a mid-epoch resume skips are not those it trained on)."""
    dataset = device_data.EncodedImages(data.build_dataset("folder", write_photos(tmp_path, count=8), "train"),
                                        data.pretrain_transform(16), 4)
    loader = data.make_loader(dataset, 4, workers=0, collate_fn=device_data.collate)
    cfg = dict(cache="auto", img_size=16, crop_min_scale=0.08, seed=0, workers=0, max_unreadable=0.01)
    cpu = torch.device("cpu")
    for plan, shard, sharded, cached in (("shard", None, True, True), ("all", None, False, True),
                                         ("shard", False, False, False), ("all", True, True, True),
                                         ("off", True, True, False)):
        monkeypatch.setattr(device_data, "plan_cache", lambda *args: plan)
        batches = device_data.device_batches(cfg, dataset, loader, cpu, shard)
        assert loader.sampler.own_shard == sharded and (batches.cache is not None) == cached, (plan, shard)
    assert "this run began without shards" in capsys.readouterr().out
