"""The device data path (pretrain.py --loader=device, the default on a GPU): loader workers only read each image's
encoded bytes and draw its random crop, flip and colours; the device decodes the batch (torchvision's decode_jpeg:
nvjpeg on a GPU) and augments it there, the colours over the whole batch at once. The draws are the ones
data.pretrain_transform makes under the same (seed, epoch, index) seed, so on a CPU the crops and flips are the
same pixels as the worker path's. --cache=device decodes the set once and keeps it on the device."""
import io
import math

import torch
import torch.distributed as dist
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv  # batched already
from tqdm import tqdm

import common
import data

F = v2.functional
# What draw() returns per image, in this order: the crop box, then one value per random choice (0/1 for a coin).
DRAWS = ("top", "left", "height", "width", "flip", "jitter", "order0", "order1", "order2", "order3", "brightness",
         "contrast", "saturation", "hue", "gray", "blur", "sigma", "solarize")
D = {name: i for i, name in enumerate(DRAWS)}
SHARE = 0.25  # --cache=auto keeps the decoded set on the device when it takes at most this share of its free memory


def steps(transform):
    """data.pretrain_transform's steps by name, RandomApply unwrapped: {"RandomResizedCrop": step, ...}."""
    return {type(s.transforms[0] if isinstance(s, v2.RandomApply) else s).__name__: s for s in transform.transforms}


def draw(transform, height, width):
    """The random choices transform makes for an image of this size, made by the same torchvision calls in the same
    order (a coin rand(1) < p, then the step's make_params), so that under the same seed they are the same choices."""
    like = [torch.empty(1, dtype=torch.uint8).expand(3, height, width)]  # make_params reads only the size
    d = torch.zeros(len(DRAWS), dtype=torch.float64)
    for name, step in steps(transform).items():
        if hasattr(step, "p") and not torch.rand(1) < step.p:  # RandomApply, flip, grayscale, solarize: not this time
            continue
        inner = step.transforms[0] if isinstance(step, v2.RandomApply) else step
        if name == "RandomResizedCrop":
            box = inner.make_params(like)
            d[:4] = torch.tensor([box["top"], box["left"], box["height"], box["width"]])
        elif name == "ColorJitter":
            p = inner.make_params(like)
            d[D["jitter"]], d[D["order0"]:D["order3"] + 1] = 1, p["fn_idx"]
            d[D["brightness"]:D["hue"] + 1] = torch.tensor([p[f"{key}_factor"] for key in DRAWS[10:14]])
        elif name == "GaussianBlur":
            d[D["blur"]], d[D["sigma"]] = 1, inner.make_params(like)["sigma"][0]
        else:
            d[D[{"RandomHorizontalFlip": "flip", "RandomGrayscale": "gray", "RandomSolarize": "solarize"}[name]]] = 1
    return d


def _gray(x):  # luma [N, 1, H, W] in float32, computed as torchvision's rgb_to_grayscale does
    return x[:, 0].mul(0.2989).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).unsqueeze(1)


def _blend(x, y, ratio):  # ratio * x + (1 - ratio) * y, cut to uint8 as torchvision's adjustments do
    return x.mul(ratio).add_(y * (1 - ratio)).clamp_(0, 255).to(torch.uint8)


def _hue(x, shift):  # torchvision's adjust_hue with one shift per image: in HSV, hue moved round the colour wheel
    hsv = _rgb_to_hsv(x.float().mul_(1 / 255))
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(hsv).mul_(256 - 1e-3).to(torch.uint8)


def augment(images, draws, transform):
    """A list of uint8 images [3, H_i, W_i] on the device and their draws [N, len(DRAWS)] -> uint8 [N, 3, S, S]:
    each crop resized on its own (the sizes differ), then flip, colours, blur and solarize over the whole batch."""
    s = steps(transform)
    crop, device = s["RandomResizedCrop"], images[0].device
    boxes = draws[:, :4].long().tolist()  # on the host: no wait for the device
    x = torch.stack([F.resized_crop(image, *box, crop.size, crop.interpolation, antialias=True)
                     for image, box in zip(images, boxes)])
    d = draws.to(device, torch.float32, non_blocking=True).view(len(x), -1, 1, 1, 1).unbind(1)  # each [N, 1, 1, 1]
    x = torch.where(d[D["flip"]] > 0, x.flip(-1), x)

    def chosen(rows):  # the images a draw picked, as an index on the device (made on the host, pinned: no wait)
        index = torch.nonzero(rows).flatten()
        return (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)

    if "ColorJitter" in s:  # brightness, contrast, saturation, hue, in each image's drawn order (ColorJitter's fn_idx)
        adjust = (lambda x, f: _blend(x, 0, f), lambda x, f: _blend(x, _gray(x).floor_().mean((1, 2, 3), True), f),
                  lambda x, f: _blend(x, _gray(x).floor_(), f), _hue)  # towards black, mean grey, own grey; hue
        for position in range(4):
            for k, name in enumerate(DRAWS[10:14]):
                rows = (draws[:, D["jitter"]] > 0) & (draws[:, D["order0"] + position] == k)
                if rows.any():
                    picked = chosen(rows)
                    x[picked] = adjust[k](x[picked], d[D[name]][picked])
    if "RandomGrayscale" in s:
        x = torch.where(d[D["gray"]] > 0, _gray(x).to(torch.uint8).expand_as(x), x)
    if "GaussianBlur" in s and (rows := draws[:, D["blur"]] > 0).any():  # torchvision's kernel, each image its own
        size, blurred = s["GaussianBlur"].transforms[0].kernel_size[0], chosen(rows)  # sigma; applied separably:
        lim, n, c, h, w = (size - 1) / (2 * math.sqrt(2)), int(rows.sum()), *x.shape[1:]  # rows, then columns
        sigma = d[D["sigma"]][blurred].view(-1, 1)
        weight = torch.softmax(-(torch.linspace(-lim, lim, size, device=device) / sigma) ** 2, 1)
        weight = weight.repeat_interleave(c, 0)
        y = torch.nn.functional.pad(x[blurred].float(), [size // 2] * 4, mode="reflect")
        y = y.view(1, n * c, h + size - 1, w + size - 1)
        y = torch.nn.functional.conv2d(y, weight.view(n * c, 1, 1, size), groups=n * c)
        y = torch.nn.functional.conv2d(y, weight.view(n * c, 1, size, 1), groups=n * c)
        x[blurred] = y.view(n, c, h, w).round_().to(torch.uint8)
    if "RandomSolarize" in s:
        x = torch.where((d[D["solarize"]] > 0) & (x >= s["RandomSolarize"].threshold), 255 - x, x)
    return x


# ----------------------------------------------------------------------------- the workers' part: bytes and draws
def file_of(dataset, i):  # the path of image i where the dataset reads image files, else None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    return dataset.samples[i][0] if isinstance(dataset, data.ImageFiles) else None


class EncodedImages(data.MaskedImages):
    """data.MaskedImages whose workers leave the pixels to the device: (what to decode: a JPEG file's bytes [L], or the
    image [3, H, W] where there is none to read, or nothing [0] where the device cache holds the image; the draws
    [len(DRAWS)]; the patches; the index i). cached_sizes: the (height, width) of the images the cache holds."""
    cached_sizes = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_decoded = torch.zeros((), dtype=torch.long).share_memory_()  # this epoch: not JPEG, or not nvjpeg's

    def read(self, i):
        """Image i's bytes and (height, width) when it is a whole RGB or grayscale JPEG file (its header read by PIL,
        its end marker there), else (data.Augmented.load) the image, or the next readable one, decoded here: other
        formats, CMYK (nvJPEG cannot) and JPEGs cut short (nvJPEG may not say so) on the CPU."""
        path = file_of(self.dataset, i)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                with Image.open(io.BytesIO(raw)) as image:  # the header only
                    whole = raw.rstrip(b"\0").endswith(b"\xff\xd9")  # JPEG's end-of-image marker
                    if image.format == "JPEG" and image.mode in ("RGB", "L") and whole:
                        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), image.size[::-1]
                self.cpu_decoded += 1
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                pass  # load names and counts it
        image = self.load(i)[0]
        return image, tuple(image.shape[1:])

    def on_cpu(self, i):  # a JPEG the device could not decode: as read() does for any other file
        self.cpu_decoded += 1
        image = self.load(i)[0]
        return image, self.seeded(i, draw, self.transform, *image.shape[1:])

    def __getitem__(self, i):
        if self.cached_sizes is None:
            item, (height, width) = self.read(i)
        else:
            item, (height, width) = torch.empty(0, dtype=torch.uint8), self.cached_sizes[i].tolist()
        return item, self.seeded(i, draw, self.transform, height, width), self.patches(i).long(), i


def collate(batch):  # what to decode stays a list (sizes differ); the rest is stacked
    return [[sample[0] for sample in batch], *torch.utils.data.default_collate([sample[1:] for sample in batch])]


def decode(items, draws, indices, dataset, device):
    """The batch's images as uint8 [3, H, W] on the device: the JPEGs decoded there together (nvjpeg on a GPU), the
    rest moved. One the device cannot decode (a corrupt file, or CMYK for nvjpeg) goes through the CPU as any
    other file would (decoded, or replaced by the next readable image, its draws made anew for that image's size)."""
    images = [item.to(device, non_blocking=True) if item.dim() == 3 else None for item in items]
    jpegs = [k for k, item in enumerate(items) if item.dim() == 1]
    if device.type == "cuda" and jpegs:  # nvJPEG can write its outputs before the work queued on the stream has run,
        torch.cuda.current_stream(device).synchronize()  # into memory that work still reads (pytorch/vision#9606)
    try:
        decoded = decode_jpeg([items[k] for k in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:  # one bad file fails them all: one by one
        decoded = []
        for k in jpegs:
            try:
                decoded.append(decode_jpeg(items[k], mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for k, image in zip(jpegs, decoded):
        if image is None:
            image, draws[k] = dataset.on_cpu(int(indices[k]))
        images[k] = image.to(device, non_blocking=True)
    return images, draws


# ----------------------------------------------------------------------------- the device's part
class DeviceBatches:
    """The loader's batches -> (uint8 images [N, 3, S, S], patches), both on the device: decoded there, or taken from
    the cache (a list of images on the device, None for those of another process's shard), then augmented."""
    def __init__(self, dataset, device, cache=None):
        self.dataset, self.device, self.cache = dataset, device, cache
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def make(self, batch):
        items, draws, patches, indices = batch
        if self.cache is None:
            images, draws = decode(items, draws, indices, self.dataset, self.device)
        else:
            images = [self.cache[i] for i in indices.tolist()]
        return augment(images, draws, self.dataset.transform), patches.to(self.device, non_blocking=True)

    def __call__(self, loader):
        """make() of each batch; on a GPU on a stream of its own, one batch ahead: the GPU decodes and augments batch
        k + 1 while it trains on batch k."""
        if self.stream is None:
            yield from map(self.make, loader)
            return
        training, ahead = torch.cuda.current_stream(self.device), None
        for batch in loader:
            with torch.cuda.stream(self.stream):
                made = self.make(batch), self.stream.record_event()
            if ahead is not None:
                yield self.hand_over(*ahead, training)
            ahead = made
        if ahead is not None:
            yield self.hand_over(*ahead, training)

    @staticmethod
    def hand_over(tensors, ready, training):  # training waits for them; their memory is kept until it has used them
        training.wait_event(ready)
        for tensor in tensors:
            tensor.record_stream(training)
        return tensors


def cache_side(img_size, crop_min_scale):
    """The cache's short side: the smallest crop (crop_min_scale of the area, aspect ratio down to 3/4) of a square
    image still spans img_size pixels, so no crop is resized up from fewer pixels than the file has (915 px at 224
    with 8% crops: most photos as they are)."""
    return math.ceil(img_size / math.sqrt(0.75 * crop_min_scale))


def free_memory(device):  # bytes free on the device, the least of any process's (one plan for all); a CPU: no limit
    if device.type != "cuda":
        return math.inf
    free = torch.tensor(float(torch.cuda.mem_get_info(device)[0]), device=device)
    if common.WORLD > 1:
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return free.item()


def plan_cache(cfg, dataset, device):
    """'all' (every process holds every image), 'shard' (each holds every world-th) or 'off', by --cache, the set's
    decoded size (estimated from the headers of 100 images) and the device's free memory; the plan is printed."""
    if cfg["cache"] == "off" or cfg["cache"] == "auto" and device.type != "cuda":
        return "off"
    world, side, n = common.WORLD, cache_side(cfg["img_size"], cfg["crop_min_scale"]), len(dataset)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"]))[:100].tolist()
    sizes = [dataset.read(i)[1] for i in sample]
    need = n * sum(3 * h * w * min(1, side / min(h, w)) ** 2 for h, w in sizes) / len(sizes)  # bytes
    free = free_memory(device)
    fits = [plan for plan, share in (("all", need), ("shard", need / world)) if share <= SHARE * free]
    plan = fits[0] if fits else "off" if cfg["cache"] == "auto" else "all" if world == 1 else "shard"  # as asked
    held = need / (world if plan == "shard" else 1)
    share = f" ({held / free:.0%} of its free memory; auto takes at most {SHARE:.0%})" if free < math.inf else ""
    common.print0(f"device cache (--cache={cfg['cache']}): {plan}: {n} images at a {side} px short side take about "
                  f"{need / 2**30:.2f} GiB, {held / 2**30:.2f} GiB per process{share}")
    return plan


def fill_cache(dataset, plan, device, side, workers):
    """Every image of this process's share decoded once, its short side brought down to side (never up)."""
    mine = range(common.RANK, len(dataset), common.WORLD) if plan == "shard" else range(len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), 64, num_workers=workers,
                                         collate_fn=collate, worker_init_fn=data.leave_stop_signals_to_main,
                                         generator=torch.Generator())  # not a draw from the global RNG
    cache, sizes = [None] * len(dataset), torch.zeros(len(dataset), 2, dtype=torch.long)
    for items, draws, _, indices in tqdm(loader, "device cache", disable=None if common.MASTER else True):
        for i, image in zip(indices.tolist(), decode(items, draws, indices, dataset, device)[0]):
            if min(image.shape[1:]) > side:
                image = F.resize(image, side, data.BICUBIC, antialias=True)
            cache[i], sizes[i] = image, torch.tensor(image.shape[1:])
    if device.type == "cuda":  # filled on this stream, read on DeviceBatches' own
        torch.cuda.synchronize(device)
    dataset.cached_sizes = sizes
    return cache


def device_batches(cfg, dataset, loader, device, shard=None):
    """pretrain.py's DeviceBatches, with the cache --cache asks for: planned (printed), then filled. shard: whether a
    resumed run drew its batches from per-process shards (None: a new run, sharded when the cache is)."""
    plan = plan_cache(cfg, dataset, device)
    if plan == "shard" and shard is False:  # a run that began on the whole set goes on with it: no cache this time
        common.print0("device cache: off (this run began without shards, and its order stays as it was)")
        plan = "off"
    loader.sampler.own_shard = plan == "shard" if shard is None else shard
    if plan == "off":
        return DeviceBatches(dataset, device)
    for count in (dataset.unreadable, dataset.cpu_decoded):  # the plan's sample read is not the fill's count
        count.zero_()
    cache = fill_cache(dataset, plan, device, cache_side(cfg["img_size"], cfg["crop_min_scale"]), cfg["workers"])
    counts = torch.tensor([float(dataset.unreadable), float(dataset.cpu_decoded)], device=device)
    if plan == "shard" and common.WORLD > 1:  # each process read its own shard
        dist.all_reduce(counts)
    unreadable, cpu_decoded = counts.int().tolist()
    common.print0(f"device cache filled: {len(dataset)} images ({cpu_decoded} decoded on the CPU, {unreadable} "
                  "unreadable ones replaced by the next readable image)")
    data.check_unreadable(cfg, unreadable, len(dataset), "the device cache read")
    return DeviceBatches(dataset, device, cache)
