"""
Fine-tune a pre-trained encoder (or a random one, the baseline) for image classification.

    python finetune.py --init=out/pretrain/ckpt.pt          # built-in data, minutes on a CPU
    torchrun --nproc_per_node=8 finetune.py --dataset=inat2019 --data_root=/data/inat2019 --init=...

Every name in `config` is a flag (--name=value); a relaunch of the same command resumes from out_dir.
Reports top-1 / top-5 on the validation split every epoch and keeps the best weights in best.pt.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2
from tqdm import tqdm

import data
from model import Classifier, ViT, load_encoder, param_groups
from pretrain import (autocast_setup, gather_rng, load_checkpoint, lr_at, parse_config, refuse_changed_config, restore_rng,
                      save_checkpoint, setup_distributed)

# -----------------------------------------------------------------------------
# configuration; `None` means "take the dataset preset's value"
config = dict(
    out_dir="out/finetune",
    init="",  # a pretrain.py or finetune.py checkpoint; "" = random init (the baseline)
    dataset="synthetic",
    data_root="",
    fraction=1.0,
    num_images=2000,  # synthetic only
    model=None,
    img_size=None,
    patch_size=None,
    drop_path=0.1,
    # optimisation (METHOD.md's fine-tuning recipe)
    epochs=None,
    batch_size=None,  # global
    blr=None,  # learning rate at batch 1024, scaled linearly
    min_lr=1e-6,
    warmup_epochs=None,
    layer_decay=None,
    weight_decay=0.05,
    label_smoothing=0.1,
    mixup=0.8,  # Beta(alpha, alpha) mixing; 0 turns it off
    cutmix=1.0,
    randaug=9,  # RandAugment magnitude
    color_jitter=0.4,
    erase_prob=0.25,
    crop_ratio=0.875,  # test-time resize + centre crop
    # system
    device="auto",
    dtype="auto",
    compile=False,
    workers=None,
    seed=0,
    log_every=10,
    override_config=False,  # resume a run folder even though settings changed
)
# Large sets: lr 1.4e-4 at batch 1024, warm-up 5, no layer decay. Small sets: 4e-3, warm-up 60, decay 0.65.
LARGE = dict(model="small", img_size=224, patch_size=16, epochs=300, batch_size=1024, blr=1.4e-4,
             warmup_epochs=5, layer_decay=1.0, workers=8)
SMALL = dict(LARGE, blr=4e-3, warmup_epochs=60, layer_decay=0.65)
PRESETS = {
    "synthetic": dict(model="tiny", img_size=32, patch_size=4, epochs=10, batch_size=64, blr=4e-3,
                      warmup_epochs=1, layer_decay=0.75, workers=2),
    **{name: LARGE for name in ["imagenet", "inat2018", "inat2019", "food101", "imagefolder"]},
    **{name: SMALL for name in ["cars", "clipart", "painting", "sketch", "imagenette"]},
    **{name: dict(SMALL, img_size=32, patch_size=4, batch_size=256) for name in ["cifar10", "cifar100"]},
}


def mixing(mixup, cutmix, num_classes):
    """(images, labels) -> (mixed images, soft targets): MixUp or CutMix, one of the two per batch
    as in DeiT; an alpha of 0 turns one off. None when both are off."""
    mixes = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []
    mixes += [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
    return v2.RandomChoice(mixes) if mixes else None


def evaluate(model, loader, device, autocast):
    """Top-1 and top-5 accuracy (%), summed over every process."""
    model.eval()
    counts = torch.zeros(3, device=device)
    with torch.no_grad(), autocast:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)]).float()
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


def main():
    cfg = parse_config(config, PRESETS, sys.argv[1:])
    rank, world, device = setup_distributed(cfg["device"])
    master = rank == 0
    dtype, autocast, scaler = autocast_setup(cfg["dtype"], device)
    cfg["dtype"] = dtype
    if cfg["batch_size"] % world:
        sys.exit(f"error: --batch_size={cfg['batch_size']} must be divisible by the {world} processes")
    torch.manual_seed(cfg["seed"] + rank)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")

    # data
    args = (cfg["data_root"], cfg["img_size"], cfg["fraction"], cfg["seed"])
    try:
        train_images = data.build_dataset(cfg["dataset"], args[0], "train", *args[1:], cfg["num_images"])
        val_images = data.build_dataset(cfg["dataset"], args[0], "val", *args[1:])
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    num_classes = len(train_images.classes)
    if num_classes < 2:
        sys.exit(f"error: --dataset={cfg['dataset']} has no class labels; fine-tuning needs a labelled dataset")
    augment = data.finetune_transform(cfg["img_size"], cfg["randaug"], cfg["color_jitter"], cfg["erase_prob"])
    train_set = data.Augmented(train_images, augment, cfg["seed"])
    val_set = data.Augmented(val_images, data.eval_transform(cfg["img_size"], cfg["crop_ratio"]))
    loader = data.make_loader(train_set, cfg["batch_size"] // world, train=True, workers=cfg["workers"], seed=cfg["seed"])
    val_loader = data.make_loader(val_set, cfg["batch_size"] // world, train=False, workers=cfg["workers"])
    mix = mixing(cfg["mixup"], cfg["cutmix"], num_classes)

    # model: the pre-trained encoder (decoder and heads dropped) under a new classification head
    model = Classifier(ViT(cfg["model"], cfg["img_size"], cfg["patch_size"], cfg["drop_path"]), num_classes)
    resume = load_checkpoint(ckpt_path, device, ("model", "optimizer", "config", "step")) if os.path.exists(ckpt_path) else None
    if resume is None and cfg["init"]:
        try:
            load_encoder(model.encoder, load_checkpoint(cfg["init"], "cpu")["model"])
        except ValueError as e:
            sys.exit(f"error: --init={cfg['init']}: {e}. Pass the same --model and --patch_size as the pre-training run.")
    model.to(device)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_images)} images give no full batch of {cfg['batch_size']}: lower --batch_size")
    total_steps = cfg["epochs"] * steps_per_epoch
    peak_lr = cfg["blr"] * cfg["batch_size"] / 1024
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["layer_decay"]), lr=peak_lr,
                                  fused=device.type == "cuda")
    step, best = 0, 0.0
    if resume is not None:
        refuse_changed_config(resume["config"], cfg, ckpt_path)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step, best = resume["step"], resume["best_top1"]
        restore_rng(resume["rng"], rank, device)
        if master:
            print(f"resuming from {ckpt_path} at step {step} (epoch {step / steps_per_epoch:.2f})")
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    log = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") if master else None
    if master:
        log.write(json.dumps({"config": cfg, "world": world}) + "\n")
        print(f"fine-tuning ViT-{cfg['model']}/{cfg['patch_size']} from {cfg['init'] or 'random init'} on "
              f"{len(train_images)} images, {num_classes} classes, {cfg['epochs']} epochs of {steps_per_epoch} steps")

    def checkpoint(**extra):  # a collective (every process's RNG state), written by rank 0 only
        rng = gather_rng(world)
        if master:
            save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                            config=cfg, best_top1=best, scaler=scaler.state_dict() if scaler else {},
                                            rng=rng, **extra))

    # Preemption (SIGTERM / SIGUSR1): finish the step, save mid-epoch, exit; the same command resumes there.
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def signalled():  # a collective, so that every process stops after the same step
        flag = torch.tensor(float(bool(stop_signal)), device=device)
        if world > 1:
            dist.all_reduce(flag)
        return bool(flag)

    def stop():
        if master:
            print(f"stop signal: saved {ckpt_path} at step {step}; the same command resumes from there")
        sys.exit(0)

    # the loop
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < total_steps:
        epoch = step // steps_per_epoch
        data.set_epoch(loader, epoch, skip_batches=step % steps_per_epoch)
        model.train()
        loss_sum, count, tick = torch.zeros((), device=device), 0, time.perf_counter()
        for images, labels in loader:
            lr = lr_at(step, total_steps, cfg["warmup_epochs"] * steps_per_epoch, peak_lr, cfg["min_lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]  # layer-wise lr decay
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            images, targets = mix(images, labels) if mix is not None else (images, F.one_hot(labels, num_classes).float())
            targets = targets * (1 - cfg["label_smoothing"]) + cfg["label_smoothing"] / num_classes
            with autocast:
                loss = F.cross_entropy(model(images).float(), targets)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            count += 1
            step += 1
            bar.update(1)
            if step % cfg["log_every"] or step % steps_per_epoch == 0:
                continue
            # log step: the one host sync; every process learns of a stop signal here
            row = dict(step=step, epoch=epoch, lr=lr, loss=loss_sum.item() / count,
                       img_s=count * cfg["batch_size"] / (time.perf_counter() - tick))
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{row['img_s']:.0f}")
            if master:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if signalled():
                checkpoint()
                stop()
        # end of epoch: loss and unreadable images of every process, validation, checkpoints
        totals = torch.stack([loss_sum, torch.tensor(float(count), device=device),
                              torch.tensor(float(train_set.unreadable), device=device)])
        if world > 1:
            dist.all_reduce(totals)
        train_loss, unreadable = (totals[0] / totals[1]).item(), int(totals[2])
        if not math.isfinite(train_loss):
            sys.exit(f"error: non-finite loss in epoch {epoch}; the last good checkpoint in {cfg['out_dir']} is kept")
        if unreadable > 0.01 * len(train_images):
            sys.exit(f"error: {unreadable} unreadable images in epoch {epoch} (over 1% of {len(train_images)}); fix the dataset")
        if unreadable and master:
            print(f"warning: {unreadable} unreadable images were skipped in epoch {epoch}")
        top1, top5 = evaluate(model, val_loader, device, autocast)
        if master:
            bar.write(f"epoch {epoch}: train loss {train_loss:.4f}, val top-1 {top1:.2f}%, top-5 {top5:.2f}%")
            log.write(json.dumps(dict(epoch=epoch, step=step, train_loss=train_loss, top1=top1, top5=top5,
                                      unreadable=unreadable)) + "\n")
            log.flush()
            if top1 > best:
                best = top1
                save_checkpoint(os.path.join(cfg["out_dir"], "best.pt"), dict(model=raw_model.state_dict(), config=cfg,
                                                                              top1=top1, epoch=epoch + 1))
        checkpoint(top1=top1)
        if signalled():
            stop()
    bar.close()
    if master:
        print(f"best val top-1 {best:.2f}%: {cfg['out_dir']}/best.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
