"""
Pre-train a ViT with SplitMask (split, inpaint, match) or the BEiT baseline.

    python pretrain.py                                                     # built-in scenes, minutes on a CPU
    python pretrain.py --dataset=imagenette --data_root=data/imagenette2   # quick recipe: about an hour
    torchrun --nproc_per_node=8 pretrain.py --dataset=coco --data_root=data/coco --recipe=paper

Table 8 of the paper: --method=beit, --nce_weight=0 (split + inpaint), --mim_weight=0 (split + match).
Relaunching the same command resumes from out_dir; Ctrl-C, SIGTERM and SIGUSR1 save and exit.
"""
import itertools
import os
import shlex
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import data
import device_data
import tokenizers
from features import Monitor
from model import VIT_SIZES, BEiT, SplitMask, ViT, param_groups

# -----------------------------------------------------------------------------
# The default run: the built-in scenes. Every line is a flag (--key=value); --help prints the comments.
config = dict(
    dataset="synthetic",  # synthetic (built in) | imagefolder (your class folders) | folder (any images) | coco | ...
    data_root="",  # the dataset's folder; the README's datasets table says where to get each
    recipe="quick",  # real datasets: quick (about 10,000 images, a laptop) | paper (the paper's Sec. 4)
    fraction=1.0,  # class-balanced share of the training and validation images (ImageNet 1%: 0.01), or a number
    num_images=2000,  # built-in scenes to draw
    # method (Table 8)
    method="splitmask",  # splitmask | beit
    mim_weight=1.0,  # weight of inpainting (cross-entropy on the other branch's words); 0: split + match
    nce_weight=1.0,  # weight of matching (InfoNCE between the two branches); 0: split + inpaint
    temperature=0.2,  # InfoNCE temperature
    mask_kind="block",  # block (BEiT's blockwise masking) | random
    mask_ratio=0.5,  # share of patches each SplitMask branch does not see (0.5: two halves); BEiT: masked
    min_block=4,  # smallest masked block, in patches (paper: 16 of 196)
    # model
    model="tiny",  # ViT size: tiny | small | base | large
    img_size=32,  # training crops, in pixels
    patch_size=4,  # patch side, in pixels (even: words are patches of the half-size image)
    drop_path=0.1,  # stochastic depth of the deepest block
    layer_scale=0.1,  # initial gain of every residual branch (0: no layer scale)
    decoder_depth=2,  # SplitMask's inpainting decoder, in blocks
    # visual words (Sec. 4, Table 2)
    tokenizer="kmeans",  # kmeans | random_patches | random_projection
    vocab_size=256,  # words in the vocabulary (paper: 8192)
    tokenizer_samples=50_000,  # patches sampled for k-means or random patches (paper: 3M)
    # optimisation (BEiT's recipe)
    epochs=5,  # passes over the training images
    batch_size=64,  # global batch, split over processes and accumulation steps
    accum_steps=1,  # micro-batches per step (each has its own InfoNCE negatives)
    blr=1.5e-2,  # learning rate at batch 2048, scaled linearly with --batch_size (paper: 1.5e-3)
    min_lr=1e-5,  # learning rate at the end of the cosine decay
    warmup_epochs=1,  # epochs of linear warm-up
    weight_decay=0.05,  # AdamW weight decay (none on biases, norms, gains, embeddings)
    beta2=0.999,  # AdamW beta2
    clip_grad=3.0,  # gradient norm clipping
    crop_min_scale=0.5,  # smallest random crop, as a share of the image area (paper: 0.08)
    strong_aug=False,  # colour jitter, grayscale, blur and solarize (small datasets)
    # system
    out_dir="out/pretrain",  # checkpoint, log and pictures; a relaunch resumes from here
    device="auto",  # auto: a CUDA GPU if there is one, else the CPU (Apple's mps is not used) | cpu | cuda
    dtype="auto",  # auto: bfloat16 on GPUs that have it, float16 on older ones, float32 on a CPU; or one of those
    compile=False,  # torch.compile the model
    workers=data.cpu_workers(),  # loader processes per training process
    loader="auto",  # auto: device on a GPU, else workers | device: workers read bytes, the GPU decodes and augments
    cache="auto",  # device loader: decode the set once, keep it on the GPU | off | auto: if it takes <25% of its memory
    seed=0,  # seeds weights, data order, augmentation, masks and words
    log_every=10,  # steps between log lines
    save_every=1,  # epochs between checkpoints
    pictures=4,  # inpainting pictures per run, spread over the epochs (0: none)
    monitor_every=1,  # epochs between the monitor's rows (k-NN where there are labels, RankMe); one at step 0; 0: off
    monitor_images=0,  # images of each split the monitor encodes; 0: a twentieth of the training set, 200 to 5000
    max_unreadable=0.01,  # share of unreadable images an epoch may skip before the run stops
    override_config=False,  # resume out_dir even though settings changed
)
# Real datasets start from a recipe, a plain override printed at start; flags override it in turn.
# quick: ViT-Tiny at 112 px (CIFAR: 32) on about 10,000 images for 8 epochs (the README's tables).
QUICK = dict(model="tiny", img_size=112, patch_size=16, epochs=8, batch_size=128, blr=1.5e-2, warmup_epochs=1,
             vocab_size=1024, tokenizer_samples=200_000, min_block=4, crop_min_scale=0.08, strong_aug=True)
# paper: Sec. 4, as many updates as 300 ImageNet epochs, capped at 5000 (ADE20k 21000); small sets mask
# 75% at random, with strong augmentation, against overfitting.
PAPER = dict(model="small", img_size=224, patch_size=16, batch_size=2048, blr=1.5e-3, warmup_epochs=10,
             vocab_size=8192, tokenizer_samples=1_000_000, min_block=16, crop_min_scale=0.08)
SMALL_SETS = dict(PAPER, epochs=5000, mask_kind="random", mask_ratio=0.75, strong_aug=True)
CIFAR = dict(img_size=32, patch_size=4, min_block=4)
PAPER_RECIPES = {
    "imagenet": dict(PAPER, model="base", epochs=300), "coco": dict(PAPER, model="base", epochs=3000),
    "ade20k": dict(PAPER, model="base", epochs=21000, crop_min_scale=0.25),
    "inat2018": dict(PAPER, epochs=800), "inat2019": dict(PAPER, epochs=1400), "food101": dict(PAPER, epochs=5000),
    **{name: SMALL_SETS for name in ("cars", "clipart", "painting", "sketch", "imagenette", "imagefolder", "folder")},
    **{name: dict(SMALL_SETS, **CIFAR, batch_size=256) for name in ("cifar10", "cifar100")},
}
PRESETS = {"beit": dict(mask_ratio=0.4),  # BEiT masks 40% (75 of 196 patches)
           **{f"{name}/paper": recipe for name, recipe in PAPER_RECIPES.items()},
           **{f"{name}/quick": dict(QUICK, fraction=data.QUICK_FRACTION[name], **(CIFAR if "cifar" in name else {}))
              for name in PAPER_RECIPES}}


def chosen_presets(cfg):
    return (["beit"] if cfg["method"] == "beit" else []) + [f"{cfg['dataset']}/{cfg['recipe']}"]


# -----------------------------------------------------------------------------

def train_step(model, optimizer, scaler, autocast, micro_batches, vocab, patch_size, clip_grad):
    """One optimizer step over micro-batches of (images, the patches each SplitMask branch sees or BEiT masks): the
    losses and MIM accuracy averaged over them, and the gradient norm before clipping, left on the device."""
    stats = dict.fromkeys(("loss", "mim_loss", "nce_loss", "mim_acc"), 0)
    for i, (images, patches) in enumerate(micro_batches):
        with torch.no_grad():
            tokens = tokenizers.tokenize(images, vocab, patch_size)  # the targets, Eq. 1, in float32
        # DDP averages gradients over processes in the backward of the last micro-batch only
        sync = i == len(micro_batches) - 1 or not isinstance(model, DDP)
        with autocast, (nullcontext() if sync else model.no_sync()):
            out = model(images, tokens, patches)
        scaler.scale(out["loss"] / len(micro_batches)).backward()
        stats = {key: mean + out[key].detach().float() / len(micro_batches) for key, mean in stats.items()}
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(parameters, clip_grad).detach().float()
    scaler.step(optimizer)  # float16: skipped on every process at once when a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stats


def on_device(batches, accum_steps):
    """Batches of (uint8 images, patches) on the device, accum_steps per optimizer step, images normalised there (a
    quarter of the host traffic); an incomplete last group is left out."""
    batches = iter(batches)
    while len(group := list(itertools.islice(batches, accum_steps))) == accum_steps:
        yield [(data.normalize(images), patches) for images, patches in group]


def save_picture(path, model, images, patches, vocab, patch_size):
    """Rows: the images, what branch A sees, what B sees, A's inpainting of B, B's of A; predicted words drawn as
    their vocabulary patches, grey where neither branch saw (75% masking). BEiT: images, visible patches, predicted."""
    from torchvision.utils import make_grid
    with torch.no_grad():
        tokens = tokenizers.tokenize(images, vocab, patch_size)
        out = model(images, tokens, patches)  # every process runs it (InfoNCE gathers); rank 0 draws
    if path is None:
        return
    B, n, grid = images.shape[0], model.encoder.num_patches, model.encoder.grid
    scale = tokenizers.tokenizer_patches(images, patch_size).norm(dim=-1).mean()  # words at a natural contrast

    def only(keep):  # grey everywhere but the patches keep [B, k]; and the pixel mask
        m = torch.zeros(B, n, device=images.device).scatter_(1, keep, 1.0).view(B, 1, *grid)
        m = m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
        return images * m, m

    def inpainted(seen, predicted_at, predictions):  # its own pixels where it looked, its words where it predicted
        words = tokens.clone().scatter_(1, predicted_at, predictions)
        return only(seen)[0] + tokenizers.render(words, vocab, grid, patch_size) * scale * only(predicted_at)[1]

    rows, names = [images], ["original"]
    if patches.dim() == 3:  # SplitMask: the patches each branch sees, [B, 2, k]
        a, b = patches[:, 0], patches[:, 1]
        rows, names = rows + [only(a)[0], only(b)[0]], names + ["A sees", "B sees"]
        if "pred_ids" in out:  # none when the inpainting head is off (split + match)
            rows += [inpainted(a, b, out["pred_ids"][:B]), inpainted(b, a, out["pred_ids"][B:])]
            names += ["A predicts B", "B predicts A"]
    else:  # BEiT: the patches it masks, [B, m]
        seen = torch.ones(B, n, dtype=torch.bool, device=images.device).scatter_(1, patches, False).nonzero()[:, 1]
        rows += [only(seen.view(B, -1))[0], inpainted(seen.view(B, -1), patches, out["pred_ids"])]
        names += ["visible", "predicted"]
    picture = torch.cat([data.normalize(r.float().cpu(), undo=True) for r in rows])
    zoom = max(1, 128 // images.shape[-1])  # small images are enlarged so that the patches show
    grid = make_grid(picture.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3), nrow=B, padding=2)
    canvas = Image.new("RGB", (grid.shape[2] + 100, grid.shape[1]), "white")  # a margin for the rows' names
    canvas.paste(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()), (100, 0))
    height = zoom * images.shape[-1] + 2
    for r, name in enumerate(names):
        ImageDraw.Draw(canvas).text((4, r * height + height // 2 - 4), name, fill="black")
    canvas.save(path)


def main():
    choices = dict(dataset=data.DATASETS, method=("splitmask", "beit"), model=VIT_SIZES, mask_kind=("block", "random"),
                   tokenizer=tokenizers.VOCAB_KINDS, loader=("auto", "device", "workers"),
                   cache=("auto", "device", "off"))
    cfg, given = common.configure(config, __doc__, __file__, PRESETS, chosen_presets, choices)
    world, processes_x_accum = common.WORLD, common.WORLD * cfg["accum_steps"]
    common.check(cfg, [
        (cfg["out_dir"] != "", "--out_dir must name a folder (a relaunch resumes from it)"),
        (cfg["patch_size"] % 2 == 0,
         f"--patch_size={cfg['patch_size']} must be even (words are patches of the half-size image)"),
        (cfg["accum_steps"] > 0 and cfg["batch_size"] % processes_x_accum == 0, f"--batch_size={cfg['batch_size']} "
         f"must be divisible by processes x accum_steps = {processes_x_accum}"),
        (0 < cfg["mask_ratio"] < 1, f"--mask_ratio={cfg['mask_ratio']} must be in (0, 1)"),
        (cfg["method"] == "beit" or cfg["mask_ratio"] >= 0.5,
         f"--mask_ratio={cfg['mask_ratio']}: SplitMask's two disjoint subsets need at least 0.5"),
        (cfg["temperature"] > 0, f"--temperature={cfg['temperature']} must be positive"),
        (cfg["monitor_every"] >= 0 and cfg["monitor_images"] != 1 and cfg["monitor_images"] >= 0, "--monitor_every="
         f"{cfg['monitor_every']} must be 0 (off) or more, --monitor_images={cfg['monitor_images']} 0 (auto) or 2+"),
        (0 < cfg["crop_min_scale"] <= 1, f"--crop_min_scale={cfg['crop_min_scale']} must be in (0, 1]"),
        (cfg["vocab_size"] >= 2, f"--vocab_size={cfg['vocab_size']} must be at least 2"),
        (cfg["tokenizer"] == "random_projection" or cfg["tokenizer_samples"] >= cfg["vocab_size"],
         f"--tokenizer_samples={cfg['tokenizer_samples']} must be at least --vocab_size={cfg['vocab_size']}"),
    ])
    device, autocast, scaler = common.setup(cfg)
    stop = common.StopSignals()  # before any work: a signal during the vocabulary pass exits cleanly
    micro_batch = cfg["batch_size"] // processes_x_accum
    if cfg["accum_steps"] > 1 and cfg["method"] == "splitmask" and cfg["nce_weight"] > 0:
        common.print0(f"warning: accum_steps={cfg['accum_steps']}: InfoNCE negatives come from each micro-batch "
                      f"of {micro_batch * world} images, not from the global batch of {cfg['batch_size']}")
    torch.manual_seed(cfg["seed"] + common.RANK)  # drop path differs per process; data order comes from the sampler
    common.make_out_dir(cfg)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")

    # data: images, their augmentation and masks, drawn per image in the loader workers; with --loader=device (on a
    # GPU) the workers only read the files and draw, and the device decodes and augments (device_data.py)
    encoder = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"], cfg["drop_path"], cfg["layer_scale"])
    images = data.from_flags(cfg, "train")
    transform = data.pretrain_transform(cfg["img_size"], cfg["crop_min_scale"], cfg["strong_aug"])
    on_device_path = cfg["loader"] == "device" or cfg["loader"] == "auto" and device.type == "cuda"
    if cfg["cache"] == "device" and not on_device_path:
        common.fail("--cache=device needs the device loader: --loader=device (auto picks it on a GPU only)")
    train_set = (device_data.EncodedImages if on_device_path else data.MaskedImages)(
        images, transform, encoder.grid, cfg["method"], cfg["mask_ratio"], cfg["mask_kind"], cfg["min_block"],
        seed=cfg["seed"])
    loader = data.make_loader(train_set, micro_batch, train=True, workers=cfg["workers"], seed=cfg["seed"],
                              pin=device.type == "cuda", collate_fn=device_data.collate if on_device_path else None)
    steps_per_epoch = len(loader) // cfg["accum_steps"]
    if steps_per_epoch == 0:
        common.fail(f"{len(images)} images give no full batch of {cfg['batch_size']}: lower --batch_size")
    total_steps, warmup_steps = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    common.print0(f"{cfg['method']} ViT-{cfg['model']}/{cfg['patch_size']} at {cfg['img_size']} px on {world} x "
                  f"{device.type} ({cfg['dtype']}): {len(images)} images, {common.plural(cfg['epochs'], 'epoch')} "
                  f"of {steps_per_epoch} steps, global batch {cfg['batch_size']}")

    # model and optimizer, from the run's checkpoint if it has one
    model = SplitMask(encoder, cfg["vocab_size"], cfg["decoder_depth"], cfg["mim_weight"], cfg["nce_weight"],
                      cfg["temperature"]) if cfg["method"] == "splitmask" else BEiT(encoder, cfg["vocab_size"])
    model.to(device)
    peak_lr = cfg["blr"] * cfg["batch_size"] / 2048
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=peak_lr, betas=(0.9, cfg["beta2"]),
                                  fused=device.type == "cuda")
    state = common.resume(ckpt_path, cfg, model, optimizer, scaler)
    step = state["step"] if state else 0

    # the targets (Sec. 4, Table 2): visual words of a vocabulary fitted on patches of the training images; a
    # resumed run keeps the one it saved
    vocab = state["vocab"].to(device) if state else tokenizers.fit_vocabulary(cfg, images, transform,
                                                                              encoder.num_patches, device)
    # what to run next, on the same data: the probes where there are labels, else the export
    ckpt, timm_file = shlex.quote(ckpt_path), shlex.quote(os.path.join(cfg["out_dir"], "vit_timm.pth"))
    next_step = f"next: python probe.py --init={ckpt}{data.same_data(cfg, given)}" if len(images.classes) > 1 else (
        f"next: python export.py --ckpt={ckpt} --out={timm_file}\n(--dataset={cfg['dataset']} has no labels to "
        f"probe with: probe.py and finetune.py take --init={ckpt} with a labelled --dataset and --data_root)")
    if step >= total_steps:
        return common.print0(f"{ckpt_path} has finished its {total_steps} steps: nothing left to train (a longer "
                             f"run: raise --epochs, with --override_config=True)\n{next_step}")
    train_model = common.wrap(model, cfg, device, find_unused_parameters=cfg["mim_weight"] == 0)
    flops_per_image = model.flops_per_image(cfg["mask_ratio"])
    peak_flops, peak_source = common.peak_flops(device, cfg["dtype"]) if common.MASTER else (1.0, "")
    common.print0(f"MFU: model FLOPs over {peak_flops / 1e12:.3g} TFLOP/s per process ({peak_source})")
    common.log(cfg, {"config": cfg, "world": world, "params": sum(p.numel() for p in model.parameters()),
                     "peak_flops": peak_flops, "peak_source": peak_source})

    history = state.get("monitor", []) if state else []  # RankMe so far, which the monitor appends to
    monitor = Monitor(cfg, encoder, len(images), micro_batch, device, history) if cfg["monitor_every"] else None
    if monitor and step == 0:  # the representation at random init: the first point of its curves
        common.log(cfg, monitor(0, step, autocast))

    def checkpoint():  # a collective: every process's RNG state goes in
        common.save_run(ckpt_path, cfg, model, optimizer, scaler, step, vocab=vocab.cpu(), monitor=history,
                        shard=loader.sampler.own_shard)

    def log_step(epoch, lr, sums, steps, seconds):
        """Means over the steps since the last log and over the processes (the one host sync: every process learns of
        bad images and non-finite losses), checked, logged and printed."""
        counts = [float(getattr(train_set, key, 0)) for key in ("unreadable", "cpu_decoded")]
        totals = torch.cat([torch.stack(list(sums.values())), torch.tensor(counts, device=device)])
        if world > 1:
            dist.all_reduce(totals)
        means = dict(zip(sums, (totals[:-2] / (steps * world)).tolist()))
        unreadable, cpu_decoded = totals[-2:].int().tolist()
        common.check_health(cfg, step, list(means.values()), scaler, unreadable, len(images), epoch)
        img_s = steps * cfg["batch_size"] / seconds
        row = dict(step=step, epoch=epoch, lr=lr, **means, img_s=img_s, unreadable=unreadable,
                   mfu=img_s * flops_per_image / world / peak_flops, cpu_decoded=cpu_decoded)
        common.log(cfg, row)
        if common.MASTER:  # a plain line per log step, what a log file keeps (the bar is drawn on a terminal only)
            bar.write(f"step {step}/{total_steps} | loss {means['loss']:.3f} (mim {means['mim_loss']:.3f}, nce "
                      f"{means['nce_loss']:.3f}) | mim acc {means['mim_acc']:.3f} | {img_s:.0f} img/s | MFU "
                      f"{row['mfu']:.1%} of {peak_flops / 1e12:.3g} TFLOP/s")
        if unreadable and step % steps_per_epoch == 0:
            common.print0(f"warning: {unreadable} unreadable images were skipped in epoch {epoch}")

    shard = state.get("shard") if state else None  # a resumed run keeps the order it drew its batches in
    loader.sampler.own_shard = bool(shard)
    to_device = device_data.device_batches(cfg, train_set, loader, device, shard) if on_device_path else (
        lambda batches: ((pixels.to(device, non_blocking=True), patches.to(device, non_blocking=True))
                         for pixels, patches, _ in batches))  # the worker path: uint8 crops made by the workers
    # the loop: an epoch that was cut short resumes at its next batch (same order, masks, augmentation)
    bar = tqdm(total=total_steps, initial=step, disable=None if common.MASTER else True, dynamic_ncols=True)
    picture_batch, stop.training = None, True
    while step < total_steps:
        epoch = step // steps_per_epoch
        data.set_epoch(loader, epoch, skip_batches=(step % steps_per_epoch) * cfg["accum_steps"])
        train_model.train()
        sums, steps, tick = {}, 0, time.perf_counter()
        for micro_batches in on_device(to_device(loader), cfg["accum_steps"]):
            lr = common.set_lr(optimizer, step, total_steps, warmup_steps, peak_lr, cfg["min_lr"])
            stats = train_step(train_model, optimizer, scaler, autocast, micro_batches, vocab, cfg["patch_size"],
                               cfg["clip_grad"])
            sums, steps, step = {key: sums.get(key, 0) + value for key, value in stats.items()}, steps + 1, step + 1
            bar.update(1)
            if picture_batch is None:
                picture_batch = [t[:8].clone() for t in micro_batches[0]]  # a copy: a view would keep the batch
            stopping = stop()  # asked after every step, so that a signal stops the run within one step
            if step % cfg["log_every"] == 0 or step % steps_per_epoch == 0 or stopping:
                log_step(epoch, lr, sums, steps, time.perf_counter() - tick)
                sums, steps, tick = {}, 0, time.perf_counter()
            if stopping and step % steps_per_epoch:  # mid-epoch: save now (at an epoch's end, the epoch ends first)
                checkpoint()
                stop.exit(ckpt_path, step)
        epoch += 1
        if monitor and (epoch % cfg["monitor_every"] == 0 or step == total_steps):  # logged before the checkpoint:
            common.log(cfg, monitor(epoch, step, autocast))  # a run killed in between logs the epoch again
        if epoch % cfg["save_every"] == 0 or step == total_steps or stopping:
            checkpoint()
        if epoch * cfg["pictures"] // cfg["epochs"] > (epoch - 1) * cfg["pictures"] // cfg["epochs"]:
            model.eval()  # a few pictures per run, spread over the schedule
            picture = os.path.join(cfg["out_dir"], f"inpaint_{epoch:05d}.png") if common.MASTER else None
            with autocast:
                save_picture(picture, model, *picture_batch, vocab, cfg["patch_size"])
        if stopping:
            stop.exit(ckpt_path, step)
    bar.close()
    drawn = min(cfg["pictures"], cfg["epochs"])  # by the schedule: before a resume too
    pictures = f", {common.plural(drawn, 'picture')} {cfg['out_dir']}/inpaint_*.png" if drawn else ""
    curves = f"; the monitor's curves: python report.py --folder={shlex.quote(cfg['out_dir'])}" if monitor else ""
    common.print0(f"done: checkpoint {ckpt_path}, log {cfg['out_dir']}/log.jsonl{pictures}{curves}\n{next_step}")


if __name__ == "__main__":
    main()
