"""
Fine-tune a pre-trained encoder (or a random one: the baseline) for image classification.

    python finetune.py --init=out/pretrain/ckpt.pt                  # built-in scenes, minutes on a CPU
    python finetune.py --dataset=imagenette --data_root=data/imagenette2 --init=out/imagenette/ckpt.pt
    torchrun --nproc_per_node=8 finetune.py --dataset=inat2019 --data_root=data/inat2019 --recipe=paper --init=...

The encoder's size comes with its checkpoint. Reports top-1 / top-5 on the validation split every
epoch and keeps the best weights in best.pt; relaunching the same command resumes from out_dir.
"""
import os
import shlex
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import common
import data
from model import VIT_SIZES, Classifier, ViT, encoder_weights, load_encoder, param_groups

# -----------------------------------------------------------------------------
# The default run: the built-in scenes. Every line is a flag (--key=value); --help prints the comments.
config = dict(
    init="",  # a pretrain.py or finetune.py checkpoint (its model, image and patch size come with it); "": random
    dataset="synthetic",  # synthetic (built in) | imagefolder (your class folders) | imagenette | ... (README)
    data_root="",  # the dataset's folder; the README's datasets table says where to get each
    recipe="quick",  # real datasets: quick (about 10,000 images, a laptop) | paper (the paper's fine-tuning)
    fraction=1.0,  # class-balanced share of the training and validation images (ImageNet 1%: 0.01), or a number
    num_images=2000,  # built-in scenes to draw
    model="tiny",  # ViT size without --init: tiny | small | base | large
    img_size=32,  # training and test crops, in pixels (with --init: the checkpoint's, unless given)
    patch_size=4,  # patch side, in pixels (with --init: the checkpoint's)
    drop_path=0.1,  # stochastic depth of the deepest block
    # optimisation (BEiT's fine-tuning recipe)
    epochs=10,  # passes over the training images
    batch_size=64,  # global batch, split over processes
    blr=4e-3,  # learning rate at batch 1024, scaled linearly with --batch_size
    min_lr=1e-6,  # learning rate at the end of the cosine decay
    warmup_epochs=1,  # epochs of linear warm-up
    layer_decay=0.75,  # block i of L learns at layer_decay ** (L + 1 - i) times the rate (1: off)
    weight_decay=0.05,  # AdamW weight decay (none on biases, norms, gains, embeddings)
    label_smoothing=0.1,  # share of each target spread over all classes
    mixup=0.8,  # MixUp's Beta(alpha, alpha) (0: off)
    cutmix=1.0,  # CutMix's Beta(alpha, alpha) (0: off); each batch takes one of the two
    randaug=9,  # RandAugment magnitude (2 operations)
    color_jitter=0.4,  # brightness, contrast and saturation jitter
    erase_prob=0.25,  # random erasing probability
    crop_ratio=0.875,  # test: resize to img_size / crop_ratio, then take the centre crop
    # system
    out_dir="",  # checkpoint, best.pt and log; "": <checkpoint>_finetune/ beside it, or out/random_init_finetune/
    device="auto",  # auto: a CUDA GPU if there is one, else the CPU (Apple's mps is not used) | cpu | cuda
    dtype="auto",  # auto: bfloat16 on GPUs that have it, float16 on older ones, float32 on a CPU; or one of those
    compile=False,  # torch.compile the model
    workers=data.cpu_workers(),  # loader processes per training process
    seed=0,  # seeds the head, data order and augmentation
    log_every=10,  # steps between log lines
    max_unreadable=0.01,  # share of unreadable images an epoch may skip before the run stops
    override_config=False,  # resume out_dir even though settings changed
)
# Real datasets start from a recipe, a plain override printed at start; flags override it in turn.
# quick: 5 epochs of ViT-Tiny at 112 px (CIFAR: 32) on about 10,000 images (the README's tables).
QUICK = dict(model="tiny", img_size=112, patch_size=16, epochs=5, batch_size=128, blr=4e-3, warmup_epochs=1,
             layer_decay=0.65)
# paper: 300 epochs at 224 px; large sets lr 1.4e-4, warm-up 5, no layer decay; small sets 4e-3, 60, 0.65.
LARGE = dict(model="small", img_size=224, patch_size=16, epochs=300, batch_size=1024, blr=1.4e-4, warmup_epochs=5,
             layer_decay=1.0)
SMALL = dict(LARGE, blr=4e-3, warmup_epochs=60, layer_decay=0.65)
PAPER_RECIPES = {**{name: LARGE for name in ("imagenet", "inat2018", "inat2019", "food101", "imagefolder")},
                 **{name: SMALL for name in ("cars", "clipart", "painting", "sketch", "imagenette")},
                 **{name: dict(SMALL, img_size=32, patch_size=4, batch_size=256) for name in ("cifar10", "cifar100")}}
PRESETS = {**{f"{name}/paper": recipe for name, recipe in PAPER_RECIPES.items()},
           **{f"{name}/quick": dict(QUICK, fraction=data.QUICK_FRACTION[name],
                                    **(dict(img_size=32, patch_size=4) if "cifar" in name else {}))
              for name in PAPER_RECIPES}}


def mixing(mixup, cutmix, num_classes):
    """(images, labels) -> (mixed images, soft targets): MixUp or CutMix, one of the two per batch
    as in DeiT; an alpha of 0 turns one off. None when both are off."""
    mixes = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []
    mixes += [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
    return v2.RandomChoice(mixes) if mixes else None


def train_step(model, optimizer, scaler, autocast, images, labels, mix, num_classes, label_smoothing):
    """One optimizer step on a batch already on the device: MixUp or CutMix, smoothed targets, cross-entropy.
    Returns the loss, left on the device (reading it waits for the GPU)."""
    images, targets = mix(images, labels) if mix else (images, F.one_hot(labels, num_classes).float())
    targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    with autocast:
        loss = F.cross_entropy(model(images).float(), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def evaluate(model, loader, device, autocast):
    """Top-1 and top-5 accuracy (%), summed over every process; read from the GPU once, at the end."""
    model.eval()
    hits, count = torch.zeros(2, device=device), 0
    with torch.no_grad(), autocast:
        for images, labels in loader:
            logits, labels = model(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            hits, count = hits + torch.stack([top5[:, 0].sum(), top5.any(1).sum()]), count + len(labels)
    counts = torch.cat([hits, torch.full((1,), float(count), device=device)])
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


def main():
    cfg, given = common.configure(config, __doc__, __file__, PRESETS, lambda c: [f"{c['dataset']}/{c['recipe']}"],
                                  dict(dataset=data.DATASETS, model=VIT_SIZES))
    pretrained = encoder_weights(cfg, given, cfg["init"]) if cfg["init"] else None
    world = common.WORLD
    common.check(cfg, [(cfg["batch_size"] % world == 0,
                        f"--batch_size={cfg['batch_size']} must be divisible by the {world} processes")])
    device, autocast, scaler = common.setup(cfg)
    stop = common.StopSignals()
    cfg["out_dir"] = common.make_out_dir(cfg, "_finetune")  # a relaunch resumes from here
    torch.manual_seed(cfg["seed"] + common.RANK)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")

    # data
    train_images, val_images = data.from_flags(cfg, "train"), data.from_flags(cfg, "val")
    num_classes = len(train_images.classes)
    if num_classes < 2:
        common.fail(f"--dataset={cfg['dataset']} has no class labels; fine-tuning needs a labelled dataset")
    augment = data.finetune_transform(cfg["img_size"], cfg["randaug"], cfg["color_jitter"], cfg["erase_prob"])
    train_set = data.Augmented(train_images, augment, cfg["seed"])
    val_set = data.Augmented(val_images, data.eval_transform(cfg["img_size"], cfg["crop_ratio"]))
    cuda, per_process = device.type == "cuda", cfg["batch_size"] // world
    loader = data.make_loader(train_set, per_process, train=True, workers=cfg["workers"], seed=cfg["seed"], pin=cuda)
    val_loader = data.make_loader(val_set, per_process, train=False, workers=cfg["workers"], pin=cuda)
    mix = mixing(cfg["mixup"], cfg["cutmix"], num_classes)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        common.fail(f"{len(train_images)} images give no full batch of {cfg['batch_size']}: lower --batch_size")
    total_steps, warmup_steps = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch

    # model: the pre-trained encoder (decoder and heads dropped) under a new classification head
    model = Classifier(ViT(cfg["model"], cfg["img_size"], cfg["patch_size"], cfg["drop_path"]), num_classes)
    if pretrained is not None:
        load_encoder(model.encoder, pretrained)
    model.to(device)
    peak_lr = cfg["blr"] * cfg["batch_size"] / 1024
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["layer_decay"]), lr=peak_lr, fused=cuda)
    state = common.resume(ckpt_path, cfg, model, optimizer, scaler)
    step, best = (state["step"], state["best_top1"]) if state else (0, 0.0)
    best_path = os.path.join(cfg["out_dir"], "best.pt")
    next_step = (f"next: python export.py --ckpt={shlex.quote(best_path)} "  # the classifier, for timm
                 f"--out={shlex.quote(os.path.join(cfg['out_dir'], 'vit_timm.pth'))}")
    if step >= total_steps:
        return common.print0(f"{ckpt_path} has finished its {total_steps} steps: nothing left to train (best "
                             f"top-1 {best:.2f}% in {best_path})\n{next_step}")
    train_model = common.wrap(model, cfg, device)
    common.print0(f"fine-tuning ViT-{cfg['model']}/{cfg['patch_size']} at {cfg['img_size']} px from "
                  f"{cfg['init'] or 'random init'}: {len(train_images)} images, {num_classes} classes, "
                  f"{common.plural(cfg['epochs'], 'epoch')} of {steps_per_epoch} steps")
    common.log(cfg, {"config": cfg, "world": world})

    def checkpoint(**extra):  # a collective: every process's RNG state goes in
        common.save_run(ckpt_path, cfg, model, optimizer, scaler, step, best_top1=best, **extra)

    # the loop
    bar = tqdm(total=total_steps, initial=step, disable=None if common.MASTER else True, dynamic_ncols=True)
    stop.training = True
    while step < total_steps:
        epoch = step // steps_per_epoch
        data.set_epoch(loader, epoch, skip_batches=step % steps_per_epoch)
        train_model.train()
        loss_sum, count, tick = torch.zeros((), device=device), 0, time.perf_counter()
        for images, labels in loader:
            lr = common.set_lr(optimizer, step, total_steps, warmup_steps, peak_lr, cfg["min_lr"])  # layer-wise decay
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = train_step(train_model, optimizer, scaler, autocast, images, labels, mix, num_classes,
                              cfg["label_smoothing"])
            loss_sum, count, step = loss_sum + loss, count + 1, step + 1
            bar.update(1)
            stopping = stop()  # asked after every step, so that a signal stops the run within one step
            if (step % cfg["log_every"] or step % steps_per_epoch == 0) and not stopping:
                continue
            row = dict(step=step, epoch=epoch, lr=lr, loss=loss_sum.item() / count,  # a log step: a host sync
                       img_s=count * cfg["batch_size"] / (time.perf_counter() - tick))
            common.check_health(cfg, step, [row["loss"]], scaler, 0, len(train_images), epoch)  # before any save
            if common.MASTER:  # a plain line per log step, what a log file keeps (the bar is drawn on a terminal only)
                bar.write(f"step {step}/{total_steps} | loss {row['loss']:.3f} | lr {lr:.2e} | "
                          f"{row['img_s']:.0f} img/s")
            common.log(cfg, row)
            if stopping and step % steps_per_epoch:  # at the end of an epoch, the epoch ends first
                checkpoint()
                stop.exit(ckpt_path, step)
        # end of epoch: loss and unreadable images of every process, validation, checkpoints
        totals = torch.cat([loss_sum.view(1), torch.tensor([float(count), float(train_set.unreadable)], device=device)])
        if world > 1:
            dist.all_reduce(totals)
        train_loss, unreadable = (totals[0] / totals[1]).item(), int(totals[2])
        common.check_health(cfg, step, [train_loss], scaler, unreadable, len(train_images), epoch)
        if unreadable:
            common.print0(f"warning: {unreadable} unreadable images were skipped in epoch {epoch}")
        top1, top5 = evaluate(train_model, val_loader, device, autocast)
        if common.MASTER:
            bar.write(f"epoch {epoch}: train loss {train_loss:.4f}, val top-1 {top1:.2f}%, top-5 {top5:.2f}%")
        common.log(cfg, dict(epoch=epoch, step=step, train_loss=train_loss, top1=top1, top5=top5,
                             unreadable=unreadable))
        if top1 > best and common.MASTER:
            common.save(best_path, dict(model=model.state_dict(), config=cfg, top1=top1, epoch=epoch + 1))
        best = max(best, top1)
        checkpoint(top1=top1)
        if stopping:
            stop.exit(ckpt_path, step)
    bar.close()
    common.print0(f"done: best val top-1 {best:.2f}% in {best_path} (last: ckpt.pt, log: log.jsonl)\n{next_step}")


if __name__ == "__main__":
    main()
