"""
prepare.py: turn images into a prepared dataset (the folder layout sit.PreparedDataset reads).

  python prepare.py toy --out data/toy            # built-in procedural toy set, no download, seconds on a CPU

The toy set has 10 classes, each one shape in one colour (red circle, green square, ...), drawn with Pillow
at a random position, size and rotation on a dark background; deterministic from --seed. Its autoencoder is
`identity`: the latents are the pixels scaled to [-1, 1] (std 0, scale 1), so training runs unchanged on
3x16x16 "latents". 16 px by default (--resolution 32 works too, but needs far more steps than the demo's 1000 on a
CPU).

  python prepare.py toy --out data/toy --teacher --fd   # also the toy teacher and the toy FD (CPU minutes)

--teacher trains the toy teacher that REPA, HASTE and REG's --preset toy align with (a small ViT, teacher.safetensors
+ teacher.json in OUT); --fd trains the toy FD's feature network (fd.safetensors + fd.json, for fid.py --features toy)
and draws its held-out reference set fd_ref.npz. Each is trained once; delete its files to train it again.

  torchrun --nproc_per_node=8 prepare.py imagenet --src IMAGENET/train --out data/imagenet256
  python prepare.py imagenet --src IMAGENET/train --out data/in100 --classes 100 --limit 300   # a quick subset
  python prepare.py repa --src REPA_DATA_DIR --out data/imagenet256   # convert REPA's images/ + vae-sd/ folders
  python prepare.py teacher-cache --data data/toy --enc dinov2-s --enc-ckpt PATH   # -> data/toy/cache-dinov2-s

`imagenet` reads any ImageFolder: one sub-folder per class (sorted names -> labels 0..K-1, names kept as
class_names), image files (.jpeg/.jpg/.png/...; other files are ignored) sorted by name within a class. Each image
gets the ADM center crop (center_crop_arr; grayscale, CMYK, RGBA, palette images are converted to RGB) and is
stored as uint8 (N, 3, 256, 256) together with its VAE encoder moments cat[mean, std] float32: (N, 8, 32, 32) for
SD-VAE, (N, 32, 32, 32) for SD3 / FLUX VAEs. --vae names the VAE (hub id, an SD-VAE weights file, or a diffusers
folder with config.json); --autoencoder the decoder recorded in dataset.json (default: the --vae VAE; sd-vae-ft-ema
and -ft-mse share the encoder). --classes K | syn1,syn2,... and --limit N (per class) make subsets; --resolution
(a multiple of the VAE's downsampling) other sizes. Full ImageNet train with SD-VAE: ~252 GB of images.npy + 42 GB
of moments.npy.

Latent normalisation (dataset.json; training, previews and sample.py use it through sit.latent_norm):
--latent-norm vae (default) records what the VAE ships: mean_std.json beside its weights (ReaLS: (z - mean) / std),
else the config's latents_mean / latents_std with scaling_factor, else scaling_factor and shift_factor (SD-VAE:
0.18215, no shift; SD3 / FLUX: both). --latent-norm dataset computes a per-channel mean and std over the whole
prepared set instead (VA-VAE / REPA-E style), exactly: of the latents training draws (mean + std * eps), from the
stored moments, in float64 (channel_stats).
`repa` copies REPA's already-encoded folder (its moments are cat[mean, std] too) in one process, not resumable.

Unreadable files: before anything is allocated, every file is read once by PIL (JPEGs in draft mode: every byte is
entropy-decoded, so truncated files fail, without a full decode), spread over ranks and workers. A file
that fails stops the run with one line naming it; with --skip-bad each one gets one line, is listed in
OUT/bad_files.txt and is left out of the index (count excludes it). Checking first keeps the index fixed from the
start, which is what lets the ranks write in place and a restart resume.

Sharding and resume: the index is cut into chunks of --chunk-size images, dealt out over ranks. After a chunk is
flushed to images.npy / moments.npy, its rank records it in OUT/progress_rank{r}.json; a restarted run (any number
of ranks, same arguments) skips every recorded chunk. OUT/prepare_state.json pins the file list and settings.
dataset.json is written last, by rank 0, once every chunk is recorded: until then the reader refuses the folder.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import sit

# -----------------------------------------------------------------------------
# Writing the prepared format


def open_arrays(out, count, resolution, latent_channels, latent_size, moments_dtype):
    """Memory-mapped .npy files of the final size; filled in place, so a dataset never has to fit in RAM."""
    os.makedirs(out, exist_ok=True)
    shapes = {'images': ((count, 3, resolution, resolution), np.uint8),
              'moments': ((count, 2 * latent_channels, latent_size, latent_size), moments_dtype),
              'labels': ((count,), np.int64)}
    return {k: np.lib.format.open_memmap(os.path.join(out, f'{k}.npy'), mode='w+', dtype=d, shape=s)
            for k, (s, d) in shapes.items()}


def write_meta(out, **meta):
    """dataset.json is written last: its presence marks a finished dataset."""
    sit.write_json(os.path.join(out, 'dataset.json'), {'format': sit.DATASET_FORMAT, **meta})


# -----------------------------------------------------------------------------
# The toy set

TOY_CLASSES = [('circle', 'red', (230, 40, 40)), ('square', 'green', (40, 200, 60)),
               ('triangle', 'blue', (50, 90, 240)), ('cross', 'yellow', (240, 210, 30)),
               ('ring', 'magenta', (220, 60, 220)), ('diamond', 'cyan', (40, 220, 230)),
               ('star', 'orange', (250, 140, 20)), ('bar', 'white', (245, 245, 245)),
               ('heart', 'purple', (150, 70, 230)), ('plus', 'lime', (140, 240, 100))]


def _polygon(n, radius, angle, center, inner=None):
    """Vertices of a regular n-gon (or an n-point star when inner radius is given)."""
    pts = []
    for i in range(n * (2 if inner else 1)):
        r = inner if inner and i % 2 else radius
        a = angle + 2 * math.pi * i / (n * (2 if inner else 1))
        pts.append((center[0] + r * math.cos(a), center[1] + r * math.sin(a)))
    return pts


def _rotated(pts, angle, center):
    c, s = math.cos(angle), math.sin(angle)
    return [(center[0] + c * x - s * y, center[1] + s * x + c * y) for x, y in pts]


TOY_BACKGROUNDS = ('plain', 'textured')


def draw_toy(label, rng, resolution=16, supersample=4, colour=None, background='plain'):
    """One toy image, uint8 (3, R, R): the shape of class `label`, in the colour of class `colour` (default: its
    own). Drawn 4x larger and downsampled for smooth edges. background: 'plain' (one dark colour) or 'textured'
    (smooth clutter of random colours up to half the shapes' brightness: the harder variant, where the shape must be
    told apart from its surroundings and the background itself is something to learn)."""
    from PIL import Image, ImageDraw
    shape = TOY_CLASSES[label][0]
    colour = TOY_CLASSES[label if colour is None else colour][2]
    size = resolution * supersample
    bg = tuple(int(v) for v in rng.integers(10, 45, size=3))
    img = Image.new('RGB', (size, size), bg)
    r = rng.uniform(0.28, 0.40) * size                        # half-extent of the shape
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    a = rng.uniform(0, 2 * math.pi)
    col = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
    # textured: the shape is drawn into a mask, pasted over the clutter after (a ring's hole shows the clutter)
    canvas, fill, hole = (img, col, bg) if background == 'plain' else (Image.new('L', (size, size), 0), 255, 0)
    d = ImageDraw.Draw(canvas)
    w = r * 0.35                                              # stroke / arm half-width
    if shape == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == 'ring':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=hole)
    elif shape == 'square':
        d.polygon(_polygon(4, r * 1.1, a, (cx, cy)), fill=fill)
    elif shape == 'diamond':
        d.polygon(_rotated([(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)], a, (cx, cy)), fill=fill)
    elif shape == 'triangle':
        d.polygon(_polygon(3, r * 1.15, a, (cx, cy)), fill=fill)
    elif shape == 'star':
        d.polygon(_polygon(5, r * 1.15, a, (cx, cy), inner=r * 0.45), fill=fill)
    elif shape == 'bar':
        d.polygon(_rotated([(-r, -w), (r, -w), (r, w), (-r, w)], a, (cx, cy)), fill=fill)
    elif shape in ('cross', 'plus'):
        turn = a if shape == 'cross' else 0.0                  # plus stays upright, cross rotates freely
        for arm in (0.0, math.pi / 2):
            d.polygon(_rotated([(-r, -w), (r, -w), (r, w), (-r, w)], turn + arm, (cx, cy)), fill=fill)
    elif shape == 'heart':
        pts = [(16 * math.sin(s) ** 3, -(13 * math.cos(s) - 5 * math.cos(2 * s) - 2 * math.cos(3 * s)
                                         - math.cos(4 * s))) for s in np.linspace(0, 2 * math.pi, 60)]
        d.polygon(_rotated([(x * r / 16, y * r / 16) for x, y in pts], a * 0.3, (cx, cy)), fill=fill)
    if background == 'textured':  # a 4x4 grid of random colours, smoothly interpolated: blobs about R/4 wide
        clutter = rng.integers(0, 120, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(clutter, 'RGB').resize((size, size), Image.BICUBIC)
        img.paste(col, mask=canvas)
    img = img.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(img).transpose(2, 0, 1)                 # (3, R, R)


def prepare_toy(out, per_class=500, resolution=16, seed=0, background='plain'):
    num_classes = len(TOY_CLASSES)
    count = num_classes * per_class
    toy = dict(per_class=per_class, seed=seed, **({} if background == 'plain' else dict(background=background)))
    if os.path.isdir(out) and os.listdir(out):  # never overwrite a folder; the same set again is a no-op
        meta = _read_json(os.path.join(out, 'dataset.json')) or {}
        if meta.get('toy') == toy and meta.get('resolution') == resolution:
            print(f"'{out}' already holds this toy set ({count} images, {resolution}px, seed {seed}, {background} "
                  f"background); nothing to do")
            return
        sit.fail(f"--out '{out}' is not empty and does not hold this toy set; pass another --out, or delete the "
                 f"folder to draw the toy set again")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % num_classes)
    arrays = open_arrays(out, count, resolution, 3, resolution, np.float32)
    for i, y in enumerate(labels):
        img = draw_toy(int(y), rng, resolution, background=background)
        arrays['images'][i] = img
        arrays['moments'][i, :3] = img / 127.5 - 1.0           # identity autoencoder: mean = pixels in [-1, 1]
        arrays['moments'][i, 3:] = 0.0                         # std 0: the latent is exact
    arrays['labels'][:] = labels
    for a in arrays.values():
        a.flush()
    write_meta(out, resolution=resolution, autoencoder='identity', latent_scale=1.0, latent_channels=3,
               latent_size=resolution, num_classes=num_classes, count=count,
               class_names=[f'{c} {s}' for s, c, _ in TOY_CLASSES], toy=toy)
    print(f'wrote {count} toy images ({num_classes} classes, {resolution}px, {background} background) to {out}')


def draw_toy_set(per_class, resolution, seed, colours='own', background='plain'):
    """A toy set in memory: uint8 images (N, 3, R, R), labels (N,) (the shape's class). colours: 'own' (the
    toy set's classes), 'random' (any shape in any class colour; colour labels (N,) returned too) or 'next'
    (class y's shape in class y+1's colour, a set of wrong pairs)."""
    rng = np.random.default_rng(seed)
    n = len(TOY_CLASSES)
    labels = rng.permutation(np.arange(n * per_class) % n)
    paint = rng.integers(0, n, len(labels)) if colours == 'random' else (labels + (colours == 'next')) % n
    images = np.stack([draw_toy(int(y), rng, resolution, colour=int(c), background=background)
                       for y, c in zip(labels, paint)])
    return (images, labels, paint) if colours == 'random' else (images, labels)


def _save_net(net, path, config):
    """Weights as safetensors, then the config json beside them (its presence marks a finished file)."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path + '.tmp')
    os.replace(path + '.tmp', path)
    sit.write_json(os.path.splitext(path)[0] + '.json', config)


def swap_colours(x, g):
    """Each image's RGB channels in a random order: uint8 (N, 3, H, W) -> the same shapes in other colours."""
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(len(x))])  # (N, 3)
    return torch.gather(x, 1, perm[:, :, None, None].expand_as(x))


def train_toy_teacher(images, labels, grid, seed=0, epochs=6, batch_size=128, lr=1e-3, log=print):
    """The toy teacher: a timm ViT (sit.TOY_TEACHER) trained on the toy images, deterministic from `seed`.
    Objective: supervised, on the labels. Labels are what the toy set has (self-supervised objectives such as
    DINOv2's need far longer than the CPU minutes this has), but a toy label is readable from the colour alone,
    which would teach a colour detector. So half the images have their RGB channels swapped (a red circle turns
    green or blue, still a circle): the class must be read from the shape. And the mean of the patch tokens is
    classified by the same head as the class token, so each patch token carries what object it belongs to:
    the patch tokens are what REPA aligns with (a class-token loss alone leaves them close to a random ViT's)."""
    torch.manual_seed(seed)
    vit = sit.build_toy_vit(grid)
    teacher = sit.Teacher(vit, grid)  # its preprocessing: what the training scripts will feed the teacher
    head = torch.nn.Linear(vit.embed_dim, len(TOY_CLASSES))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(np.asarray(images)), torch.from_numpy(np.asarray(labels))
    per_epoch = len(x_all) // batch_size
    total, step, t0 = epochs * per_epoch, 0, time.time()
    vit.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]                                       # (B, 3, R, R) uint8, (B,)
            swap = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(swap[:, None, None, None], swap_colours(x, g), x)
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)           # mirror images are the same shapes
            for group in opt.param_groups:  # 50 warm-up steps, then cosine to 0
                group['lr'] = lr * min(1, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total))
            tokens = vit.forward_features(teacher.preprocess(x))                # (B, 1 + T, D) final norm
            loss = (F.cross_entropy(head(tokens[:, 0]), y) + F.cross_entropy(head(tokens[:, 1:].mean(1)), y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        rate = step * batch_size / (time.time() - t0)
        log(f'toy teacher: epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  {rate:.0f} img/s  '
            f'ETA {sit.format_time((total - step) * batch_size / rate)}')
    return vit.eval()


def train_toy_fd(seed=1, resolution=16, per_class=1000, epochs=4, batch_size=128, lr=2e-3, background='plain',
                 log=print):
    """The toy FD's feature network (fid.ToyNet): trained apart from the teacher (a CNN, another objective and
    seed) so that the metric does not reward alignment with the teacher by construction. On toy images of any
    shape in any class colour, drawn with its own seed, it names the shape and the colour with two heads: the
    toy set's labels would let it read the class off the colour and miss a wrong shape."""
    import fid
    images, shapes, colours = draw_toy_set(per_class, resolution, seed, colours='random', background=background)
    torch.manual_seed(seed)
    net = fid.ToyNet(resolution=resolution)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    x_all, s_all, c_all = (torch.from_numpy(a) for a in (images, shapes, colours))
    per_epoch = len(x_all) // batch_size
    total, step, t0 = epochs * per_epoch, 0, time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            for group in opt.param_groups:
                group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            f = net(x_all[idx].float())                                         # (B, D)
            loss = F.cross_entropy(net.shape_head(f), s_all[idx]) + F.cross_entropy(net.colour_head(f), c_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        rate = step * batch_size / (time.time() - t0)
        log(f'toy FD network: epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  {rate:.0f} img/s  '
            f'ETA {sit.format_time((total - step) * batch_size / rate)}')
    return net.eval()


def prepare_toy_teacher(out, seed=0, **train):
    """OUT/teacher.safetensors + teacher.json, trained on OUT's toy images (SiT-*/2's token grid). train: overrides
    of train_toy_teacher's schedule (tests train a few steps)."""
    path = os.path.join(out, 'teacher.safetensors')
    if os.path.isfile(os.path.join(out, 'teacher.json')):
        print(f"'{path}' exists; delete it (and teacher.json) to train the toy teacher again")
        return
    meta = _read_json(os.path.join(out, 'dataset.json'))
    grid = meta['resolution'] // 2
    t0, cpu0 = time.time(), time.process_time()
    vit = train_toy_teacher(np.load(os.path.join(out, 'images.npy')), np.load(os.path.join(out, 'labels.npy')),
                            grid, seed, **train)
    _save_net(vit, path, dict(vit=sit.TOY_TEACHER, grid=grid, resolution=meta['resolution'], seed=seed,
                              objective='supervised: class token and mean patch token, half the images colour-swapped'))
    print(f'wrote the toy teacher to {path} ({time.time() - t0:.0f} s, {time.process_time() - cpu0:.0f} s CPU)')


def prepare_toy_fd(out, seed=0):
    """OUT/fd.safetensors + fd.json (fid.ToyNet) and OUT/fd_ref.npz, the held-out reference set of the toy FD."""
    path = os.path.join(out, 'fd.safetensors')
    if os.path.isfile(os.path.join(out, 'fd.json')):
        print(f"'{path}' exists; delete it (and fd.json, fd_ref.npz) to train the toy FD network again")
        return
    meta = _read_json(os.path.join(out, 'dataset.json'))
    R, background = meta['resolution'], meta['toy'].get('background', 'plain')
    t0 = time.time()
    # seeds: the toy set draws with `seed`, the FD network with seed + 1, its reference set with seed + 2; all
    # three on the toy set's background
    net = train_toy_fd(seed + 1, R, background=background)
    ref, _ = draw_toy_set(1000, R, seed + 2, background=background)
    with open(os.path.join(out, 'fd_ref.npz.tmp'), 'wb') as f:
        np.savez(f, arr_0=ref.transpose(0, 2, 3, 1))                            # (N, R, R, 3), as fid.py reads
    os.replace(os.path.join(out, 'fd_ref.npz.tmp'), os.path.join(out, 'fd_ref.npz'))
    _save_net(net, path, dict(width=net.shape_head.in_features // 4, classes=len(TOY_CLASSES), resolution=R,
                              seed=seed + 1, ref_seed=seed + 2, background=background))
    print(f'wrote the toy FD network to {path} and its reference set ({len(ref)} images) to '
          f'{os.path.join(out, "fd_ref.npz")} ({time.time() - t0:.0f} s)')


# -----------------------------------------------------------------------------
# The teacher's outputs on a prepared dataset, once (sit.TeacherCache reads them: --enc-cache)

@torch.no_grad()
def prepare_teacher_cache(data, enc, enc_ckpt=None, attn_blocks='-2,-1', patch_size=2, out=None, batch_size=50,
                          log=print):
    """DATA's images through the frozen teacher, as the training scripts run it (fp32 on the CPU), saved for
    sit.TeacherCache: final-norm patch and class tokens, and the attention logits of attn_blocks (HASTE's; '-2,-1':
    the last two). The token grid is SiT-*/patch_size's. -> the cache folder (default DATA/cache-ENC).
    For the toy lab: the toy set is small and never augmented. What it would cost on ImageNet: docs/toy.md."""
    out = out or os.path.join(data, f'cache-{enc}')
    meta = sit.read_dataset_meta(data)
    grid = meta['latent_size'] // patch_size
    teacher_id = sit.teacher_id(enc, enc_ckpt, data)  # the weights' SHA-1; fails on a missing file first
    if os.path.isfile(os.path.join(out, 'cache.json')):
        with open(os.path.join(out, 'cache.json')) as f:
            if json.load(f).get('teacher') == teacher_id:
                log(f'{out}: the teacher cache is there ({teacher_id})')
                return out
        sit.fail(f"--out {out} holds a teacher cache of another teacher; delete it or pass another --out")
    teacher = sit.load_teacher(enc, enc_ckpt, grid=grid, data_path=data)
    blocks = sorted(set(sit.parse_blocks(attn_blocks, len(teacher.vit.blocks), '--attn-blocks')))
    images = np.load(os.path.join(data, 'images.npy'), mmap_mode='r')                  # (N, 3, R, R) uint8
    n, t, heads = len(images), grid * grid, teacher.vit.blocks[0].attn.num_heads
    tmp = out + '.tmp'
    os.makedirs(tmp, exist_ok=True)
    arrays = {k: np.lib.format.open_memmap(os.path.join(tmp, f'{k}.npy'), 'w+', dtype, shape) for k, dtype, shape in (
        ('keys', np.uint8, (n, 20)), ('patch', np.float32, (n, t, teacher.dim)), ('cls', np.float32, (n, teacher.dim)),
        ('attn', np.float32, (n, len(blocks), heads, 1 + t, 1 + t)))}
    t0 = time.time()
    for lo in range(0, n, batch_size):
        x = torch.from_numpy(np.array(images[lo:lo + batch_size]))                     # (B, 3, R, R)
        got = teacher(x, attn_blocks=blocks)
        arrays['keys'][lo:lo + len(x)] = np.frombuffer(b''.join(sit.image_keys(x)), np.uint8).reshape(-1, 20)
        arrays['patch'][lo:lo + len(x)] = got['patch'].numpy()                          # (B, T, D)
        arrays['cls'][lo:lo + len(x)] = got['cls'].numpy()                              # (B, D)
        arrays['attn'][lo:lo + len(x)] = torch.stack(got['attn'], 1).numpy()            # (B, blocks, H, 1+T, 1+T)
        done, dt = lo + len(x), time.time() - t0
        if done == n or (lo // batch_size) % 10 == 0:
            log(f'teacher cache {done}/{n} images | {done / dt:.1f} img/s | eta {sit.format_time(dt / done * (n - done))}')
    for a in arrays.values():
        a.flush()
    sit.write_json(os.path.join(tmp, 'cache.json'), dict(teacher=teacher_id, grid=grid, fp16=False, dim=teacher.dim,
                                                         attn_blocks=blocks, count=n, data=os.path.abspath(data)))
    if os.path.isdir(out):  # a folder without cache.json: an earlier build that did not finish
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f'{out}: {n} images through {teacher_id} ({time.time() - t0:.0f} s), attention logits of blocks {blocks}')
    return out


# -----------------------------------------------------------------------------
# ImageNet (any ImageFolder) -> images + VAE moments, sharded over ranks, resumable

def per_channel(value, C, what, positive=False):
    """One number, or C numbers in any nesting ((C,), (1, C, 1, 1), ...) -> a list of C floats, or one line."""
    try:
        flat = torch.as_tensor(value, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):  # None, a string, ragged lists
        flat = None
    if flat is None or flat.numel() not in (1, C) or not torch.isfinite(flat).all() or (positive and (flat <= 0).any()):
        sit.fail(f"VAE: {what} must be one {'positive ' if positive else ''}number or {C} (one per latent channel), "
             f"got {str(value)[:80]}")
    return flat.expand(C).tolist()


def read_mean_std(path, C):
    """ReaLS's mean_std.json. Its layout is documented nowhere (the ReaLS repository has no code, the folder is on
    Google Drive), so the readings that fit its name are accepted: {"mean": ..., "std": ...} or diffusers' key
    names {"latents_mean": ..., "latents_std": ...}, each one number or one per channel."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        sit.fail(f"VAE: cannot read {path} ({type(e).__name__}: {str(e)[:80]})")
    keys = next((k for k in (('mean', 'std'), ('latents_mean', 'latents_std')) if isinstance(d, dict)
                 and all(x in d for x in k)), None)
    if keys is None:
        sit.fail(f"VAE: {path} holds {sorted(d) if isinstance(d, dict) else type(d).__name__}; expected "
             f'{{"mean": [...], "std": [...]}} with one number or {C} (one per latent channel) each')
    return (per_channel(d[keys[0]], C, f'{path} {keys[0]}'),
            per_channel(d[keys[1]], C, f'{path} {keys[1]}', positive=True))


def shipped_norm(vae):
    """The normalisation a VAE ships, as dataset.json fields (see sit.latent_norm), first found of:
      mean_std.json beside the weights (ReaLS): (z - mean) / std, latent_scale 1. ReaLS does not say how its SiT
        normalised latents; a standardised latent is what the file offers. The config's scaling_factor is not
        applied on top: diffusers writes its default 0.18215 into every config, used or not
      latents_mean / latents_std in config.json: (z - mean) / std * scaling_factor, as diffusers' SDXL pipeline
      scaling_factor and shift_factor: (z - shift_factor) * scaling_factor (SD: no shift; SD3, FLUX: a shift)
    vae: a sit.load_vae result (its config, folder and source say where it came from)."""
    cfg, folder, C, where = vae.config, vae.folder, vae.latent_channels, vae.source
    path = os.path.join(folder, 'mean_std.json') if folder else None
    if path and os.path.isfile(path):
        mean, std = read_mean_std(path, C)
        return {'latent_mean': mean, 'latent_std': std, 'latent_scale': 1.0, 'latent_norm_from': path}
    scale = per_channel(cfg.get('scaling_factor', sit.VAE_SCALE), 1, f'{where} scaling_factor', positive=True)[0]
    if cfg.get('latents_mean') is not None or cfg.get('latents_std') is not None:
        if cfg.get('shift_factor'):
            sit.fail(f"VAE: {where} sets both shift_factor and latents_mean / latents_std; keep one normalisation")
        return {'latent_mean': per_channel(cfg.get('latents_mean'), C, f'{where} latents_mean'),
                'latent_std': per_channel(cfg.get('latents_std'), C, f'{where} latents_std', positive=True),
                'latent_scale': scale, 'latent_norm_from': f'{where}: latents_mean, latents_std, scaling_factor'}
    shift = per_channel(cfg.get('shift_factor') or 0.0, 1, f'{where} shift_factor')[0]
    return {'latent_scale': scale, 'latent_shift': shift, 'latent_norm_from': f'{where}: scaling_factor, shift_factor'}


@torch.no_grad()
def vae_encode_moments(vae, images, batch_size=32):
    """uint8 images (N, 3, H, W) -> float32 moments cat[mean, std] (N, 2C, H/f, W/f) on CPU: the encoder's half of
    sit.AutoencoderKL (diffusers' encode().latent_dist, unscaled)."""
    device = next(vae.parameters()).device
    out = []
    for xb in torch.as_tensor(images).split(batch_size):
        x = xb.to(device, torch.float32) / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        # no autocast: these moments become the training set, computed once; bf16 would keep ~3 digits (cuDNN may
        # still use TF32 convolutions on Ampere+ unless torch.backends.cudnn.allow_tf32 is off, as in REPA's run)
        h = vae.encoder(x)  # (B, 2C, H/f, W/f)
        mean, logvar = (h if vae.quant_conv is None else vae.quant_conv(h)).chunk(2, dim=1)  # (B, C, H/f, W/f)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # clamped as diffusers; the latent is mean + std * eps
        out.append(torch.cat([mean, std], dim=1).float().cpu())  # (B, 2C, H/f, W/f)
    return torch.cat(out)


def center_crop_arr(pil_image, image_size):
    """ADM / DiT / REPA center crop: PIL image -> uint8 (image_size, image_size, 3) RGB array."""
    from PIL import Image
    if pil_image.mode != 'RGB':  # L, RGBA (alpha dropped), CMYK, P, ...
        pil_image = pil_image.convert('RGB')
    # halve with a box filter while at least 2x too large (cheap anti-aliasing), then one bicubic resize
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, 3), min(H, W) == image_size
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


IMAGE_EXTS = ('.jpeg', '.jpg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')


def list_image_folder(src, classes=None, limit=None):
    """The global order: sorted class folders (label = position), files sorted by name within a class.
    classes: None (all), 'K' (the first K folders) or 'syn1,syn2,...'; limit: at most this many files per class."""
    if not os.path.isdir(src):
        sit.fail(f"--src '{src}' is not a folder (expected one sub-folder of images per class, like ImageNet's train/)")
    names = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith('.'))
    if classes and classes.isdigit():
        names = names[:int(classes)]
    elif classes:
        wanted = sorted(set(classes.split(',')))
        missing = [c for c in wanted if c not in names]
        if missing:
            sit.fail(f"--classes: '{src}' has no folder {missing[0]!r} ({len(missing)} of {len(wanted)} not found)")
        names = wanted
    paths, labels = [], []
    for y, name in enumerate(names):
        files = sorted(e.name for e in os.scandir(os.path.join(src, name))
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))[:limit]
        paths += [os.path.join(src, name, f) for f in files]
        labels += [y] * len(files)
    if not paths:
        sit.fail(f"no images found in class sub-folders of '{src}'")
    return paths, labels, names


class ImageFiles(torch.utils.data.Dataset):
    """Decodes in DataLoader workers: (uint8 (3, R, R) ADM crop, None) or, with resolution=None, a check only
    (None, None); a file PIL cannot read gives (None, 'PATH (Error: message)') instead of an exception."""

    def __init__(self, paths, resolution=None):
        self.paths, self.resolution = paths, resolution

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                if self.resolution is None:
                    im.draft(None, (im.width // 8, im.height // 8))  # JPEG: 1/8-scale IDCT; a no-op otherwise
                    im.load()
                    return None, None
                return center_crop_arr(im, self.resolution).transpose(2, 0, 1), None  # (3, R, R) uint8
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
            why = (str(e).replace(f" '{self.paths[i]}'", '').strip().splitlines() or [''])[0][:150]  # path said once
            return None, (self.paths[i], f'{type(e).__name__}: {why}')


def _collate(batch):
    """Stack in the worker (one shared-memory tensor per batch); errors travel as (path, reason)."""
    errors = [e for _, e in batch if e]
    ok = [a for a, _ in batch if a is not None]
    return (torch.from_numpy(np.stack(ok)) if ok and not errors else None), errors  # (B, 3, R, R) uint8


def _loader(paths, resolution, batches, num_workers, pin=False):
    return torch.utils.data.DataLoader(ImageFiles(paths, resolution), batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=_collate, pin_memory=pin)


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _done_chunks(out):
    return {c for f in glob.glob(os.path.join(out, 'progress_rank*.json')) for c in _read_json(f)}


def channel_stats(out, rank=0, world=1, device='cpu', batch=256):
    """--latent-norm dataset: per-channel mean and std of the latents training draws, z = mean + std * eps, over
    every image of the prepared set. Exact rather than estimated from drawn samples: over images and positions,
    E[z] = E[mean] and Var[z] = E[mean^2 + std^2] - E[z]^2, summed in float64. (LightningDiT estimates the same
    from one drawn latent each of 10K images.) Ranks take every world-th batch and add up their sums."""
    moments = np.load(os.path.join(out, 'moments.npy'), mmap_mode='r')
    n, C = len(moments), moments.shape[1] // 2
    sums = torch.zeros(2, C, dtype=torch.float64)
    for lo in range(rank * batch, n, world * batch):
        mean, std = torch.from_numpy(np.array(moments[lo:lo + batch], dtype=np.float64)).chunk(2, dim=1)  # (B, C, h, w)
        sums[0] += mean.sum((0, 2, 3))
        sums[1] += (mean ** 2 + std ** 2).sum((0, 2, 3))
    if dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
    mu, second = sums.cpu() / (n * moments.shape[2] * moments.shape[3])  # (C,) each
    var = second - mu ** 2
    if (var <= 0).any():
        sit.fail(f'latent channel {int((var <= 0).nonzero()[0])} is constant over {out}: it cannot be standardised; '
                 f'use --latent-norm vae')
    return {'latent_mean': mu.tolist(), 'latent_std': var.sqrt().tolist(), 'latent_scale': 1.0,
            'latent_norm_from': f'prepare.py: over all {n} images, sampled latents'}


def prepare_imagenet(args):
    rank, world, device = sit.setup_distributed()
    stop = sit.StopFlag()  # SIGTERM / SIGUSR1 / Ctrl-C: finish the chunk at hand, exit 0; rerun to continue
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)

    out, R, chunk = args.out, args.resolution, args.chunk_size
    # the ranks coordinate through --out (state, progress records, arrays written in place): every node must see
    # the same folder, and rank 0 reads the records for all of them
    shared = '--out must be on a file system all nodes share (and --src hold the same files on every node)'
    sit.same_view({f"'{out}'": sorted((f, sit.file_view(os.path.join(out, f))) for f in os.listdir(out))
                   if os.path.isdir(out) else None}, shared)
    if os.path.isfile(os.path.join(out, 'dataset.json')):
        if rank == 0:
            print(f"'{out}' is already prepared (dataset.json exists); delete the folder to prepare it again")
        return
    vae = sit.load_vae(args.vae, device)  # before the long file check: a wrong --vae fails at once
    shipped = shipped_norm(vae)  # and so does a normalisation file it cannot read
    down, C = vae.factor, vae.latent_channels
    if R % down:
        sit.fail(f'--resolution must be a multiple of {down} (the VAE downsamples {down}x), got {R}')
    paths, labels, names = list_image_folder(args.src, args.classes, args.limit)
    rel = [os.path.relpath(p, args.src) for p in paths]
    # what a resumed run must agree on (batch size, workers and rank count may change)
    key = {'files': hashlib.sha1('\n'.join(rel).encode()).hexdigest(), 'count': len(rel), 'resolution': R,
           'chunk_size': chunk, 'vae': args.vae, 'skip_bad': args.skip_bad}
    sit.same_view({f"the image files under '{args.src}'": f"{key['count']} files (sha1 {key['files'][:12]})"}, shared)
    state_file = os.path.join(out, 'prepare_state.json')
    state = sit.decide_for_all(lambda: _read_json(state_file))
    barrier()  # everyone has read the state before rank 0 may write a new one
    if state is not None and state['key'] != key:
        changed = ', '.join(k for k in key if state['key'].get(k) != key[k])
        sit.fail(f"'{out}' holds an unfinished preparation with other files or settings ({changed}); "
                 f"re-run the same command, or delete the folder to start over")
    if state is None:
        t0 = time.time()
        mine = list(range(rank, len(paths), world))
        batches = [mine[i:i + 64] for i in range(0, len(mine), 64)]
        bad = []
        for _, errors in _loader(paths, None, batches, args.num_workers):
            bad += errors
            if stop.requested:
                break
        if stop():
            if rank == 0:
                print('stopped by signal while checking the files; nothing was written, rerun the same command')
            return
        if dist.is_initialized():
            gathered = [None] * world
            dist.all_gather_object(gathered, bad)
            bad = [e for g in gathered for e in g]
        bad.sort()
        if bad and not args.skip_bad:
            more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
            sit.fail(f'cannot read image {bad[0][0]} ({bad[0][1]}){more}; fix or remove it, '
                     f'or pass --skip-bad to leave it out')
        if len(bad) == len(paths):
            sit.fail(f'none of the {len(paths)} files could be read, e.g. {bad[0][0]} ({bad[0][1]})')
        bad_paths = {p for p, _ in bad}
        bad_rel = [r for p, r in zip(paths, rel) if p in bad_paths]
        if rank == 0:
            print(f'checked {len(paths)} files in {sit.format_time(time.time() - t0)}: {len(bad)} unreadable')
            for p, why in bad:
                print(f'skipping unreadable image {p} ({why})')
            os.makedirs(out, exist_ok=True)
            for f in glob.glob(os.path.join(out, 'progress_rank*.json')):  # left by a run with other settings
                os.remove(f)
            if bad_rel:
                with open(os.path.join(out, 'bad_files.txt'), 'w') as f:
                    f.writelines(r + '\n' for r in bad_rel)
            keep = [i for i, p in enumerate(paths) if p not in bad_paths]
            # float32 moments: 32 KB per image (SD-VAE) next to 192 KB of pixels, and exactly what the encoder gave
            arrays = open_arrays(out, len(keep), R, C, R // down, np.float32)
            arrays['labels'][:] = np.asarray(labels)[keep]
            for a in arrays.values():
                a.flush()
            del arrays
            sit.write_json(state_file, {'key': key, 'bad': bad_rel})  # after the arrays: its presence means they exist
        barrier()
        state = sit.decide_for_all(lambda: _read_json(state_file))  # what rank 0 wrote, not a lagging copy
        sit.same_view({f"'{os.path.join(out, f)}.npy'": sit.file_view(os.path.join(out, f'{f}.npy'))
                       for f in ('images', 'moments', 'labels')}, shared)
    skip = set(state['bad'])
    keep = [p for p, r in zip(paths, rel) if r not in skip]
    count = len(keep)
    nchunks = math.ceil(count / chunk)
    done = sit.decide_for_all(lambda: _done_chunks(out))
    barrier()  # everyone derives the same to-do list before anyone records more chunks
    todo = [c for c in range(nchunks) if c not in done]
    my_chunks = todo[rank::world]
    record_file = os.path.join(out, f'progress_rank{rank}.json')
    record = set(_read_json(record_file) or [])  # keep what this rank number finished in an earlier run
    todo_images = sum(min(chunk, count - c * chunk) for c in todo)
    if rank == 0:
        print(f'{count} images, {nchunks} chunks of {chunk}: {len(todo)} to do ({todo_images} images) on {world} '
              f'rank(s), device {device}', flush=True)

    arrays = {k: np.load(os.path.join(out, f'{k}.npy'), mmap_mode='r+') for k in ('images', 'moments')}
    batches = [list(range(s, min(s + args.batch_size, (c + 1) * chunk, count)))
               for c in my_chunks for s in range(c * chunk, min((c + 1) * chunk, count), args.batch_size)]
    loader = _loader(keep, R, batches, args.num_workers, pin=device.type == 'cuda')
    t0, n = time.time(), 0
    for idx, (x, errors) in zip(batches, loader):
        if errors:  # it passed the check above, so the file changed since
            sit.fail(f'cannot read image {errors[0][0]} ({errors[0][1]})')
        lo, hi = idx[0], idx[-1] + 1
        arrays['images'][lo:hi] = x.numpy()  # (B, 3, R, R) uint8
        arrays['moments'][lo:hi] = vae_encode_moments(vae, x, len(idx)).numpy()  # (B, 2C, R/f, R/f) float32
        n += len(idx)
        if hi == min((lo // chunk + 1) * chunk, count):  # last batch of its chunk
            for a in arrays.values():
                a.flush()  # on disk before the chunk is recorded as done
            record.add(lo // chunk)
            sit.write_json(record_file, sorted(record))
            if rank == 0:  # rank 0's pace times the rank count: the chunks are dealt out evenly
                rate = n * world / (time.time() - t0)
                print(f'~{min(n * world, todo_images)}/{todo_images} images  {rate:.1f} img/s  '
                      f'ETA {sit.format_time(max(todo_images - n * world, 0) / rate)}', flush=True)
            if stop.requested:
                break
    del arrays, loader
    if stop():  # every rank gets here: the agreed flag doubles as the barrier
        if rank == 0:
            print(f'stopped by signal: {len(_done_chunks(out))} of {nchunks} chunks are done; rerun the same command '
                  f'to continue', flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    # every rank takes part in computing the statistics (they add up over ranks); then rank 0 checks and writes
    norm = shipped if args.latent_norm == 'vae' else channel_stats(out, rank, world, device)
    if rank == 0:
        missing = nchunks - len(_done_chunks(out))
        if missing:
            sit.fail(f'{missing} chunk(s) of {out} are not done; re-run the same command to finish them (with '
                     f'several nodes: {shared})')
        write_meta(out, resolution=R, autoencoder=args.autoencoder or args.vae, latent_channels=C,
                   latent_size=R // down, num_classes=len(names), count=count, class_names=names, encoder=args.vae,
                   **norm)
        for f in glob.glob(os.path.join(out, 'progress_rank*.json')) + [state_file]:
            os.remove(f)
        print(f'wrote {count} images ({len(names)} classes, {R}px, {len(skip)} skipped) to {out}')
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# REPA's preprocessed folder (its preprocessing/dataset_tools.py convert + encode) -> the prepared format
#   images/00000/img00000000.png             RGB PNG, already ADM center-cropped
#   images/dataset.json                      {"labels": [["00000/img00000000.png", label], ...]}
#   vae-sd/00000/img-mean-std-00000000.npy   float32 (8, h, w): cat[mean, std] of the SD-VAE encoder, as ours
#   vae-sd/dataset.json                      {"labels": [["00000/img-mean-std-00000000.npy", label], ...]}


class RepaItems(torch.utils.data.Dataset):
    def __init__(self, src, pairs):
        self.src, self.pairs = src, pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        from PIL import Image
        img, feat = self.pairs[i]
        with Image.open(os.path.join(self.src, 'images', img)) as im:
            x = np.ascontiguousarray(np.asarray(im.convert('RGB')).transpose(2, 0, 1))  # (3, R, R) uint8
        m = np.load(os.path.join(self.src, 'vae-sd', feat)).astype(np.float32)  # (8, h, w)
        return torch.from_numpy(x), torch.from_numpy(m)


def prepare_repa(src, out, autoencoder='stabilityai/sd-vae-ft-ema', names_from=None, num_workers=8):
    meta = {d: _read_json(os.path.join(src, d, 'dataset.json')) for d in ('images', 'vae-sd')}
    if not all(m and m.get('labels') for m in meta.values()):
        sit.fail(f"'{src}' is not a REPA data folder: expected images/dataset.json and vae-sd/dataset.json with labels "
                 f"(made by REPA's preprocessing/dataset_tools.py convert and encode)")
    # REPA pairs sorted image and sorted feature names by position; both names carry the same 8-digit index
    image_labels = dict(meta['images']['labels'])
    pairs, labels = [], []
    for feat, y in sorted(meta['vae-sd']['labels']):
        img = feat.replace('img-mean-std-', 'img').replace('.npy', '.png')
        if image_labels.get(img) != y:
            sit.fail(f"'{src}': vae-sd/{feat} (label {y}) has no images/{img} with the same label")
        pairs.append((img, feat))
        labels.append(y)
    if len(pairs) != len(image_labels):
        sit.fail(f"'{src}': {len(image_labels)} images but {len(pairs)} moments files; re-run REPA's encode step")
    names = sorted(e.name for e in os.scandir(names_from) if e.is_dir()) if names_from else None
    num_classes = len(names) if names else max(labels) + 1
    if num_classes <= max(labels):
        sit.fail(f"--class-names '{names_from}' has {num_classes} class folders but the labels go up to {max(labels)}")
    items = RepaItems(src, pairs)
    x, m = items[0]
    R, (C2, h, _) = x.shape[-1], m.shape
    arrays = open_arrays(out, len(pairs), R, C2 // 2, h, np.float32)
    arrays['labels'][:] = labels
    i = 0
    for x, m in torch.utils.data.DataLoader(items, batch_size=256, num_workers=num_workers):
        if (m[:, C2 // 2:] < 0).any():  # a std is never negative: this would be a logvar, which REPA does not store
            sit.fail(f"'{src}/vae-sd' has negative values in the second half of the moments: not cat[mean, std]")
        arrays['images'][i:i + len(x)] = x.numpy()  # (B, 3, R, R) uint8
        arrays['moments'][i:i + len(x)] = m.numpy()  # (B, 8, h, w) float32
        i += len(x)
    for a in arrays.values():
        a.flush()
    write_meta(out, resolution=R, autoencoder=autoencoder, latent_scale=sit.VAE_SCALE, latent_channels=C2 // 2,
               latent_size=h, num_classes=num_classes, count=len(pairs), class_names=names)
    print(f'converted {len(pairs)} images ({num_classes} classes, {R}px) from REPA folder {src} to {out}')


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='source', required=True)
    t = sub.add_parser('toy', help='the built-in procedural toy set')
    t.add_argument('--out', default='data/toy')
    t.add_argument('--per-class', type=int, default=500, help='images per class (10 classes)')
    t.add_argument('--resolution', type=int, default=16)
    t.add_argument('--seed', type=int, default=0)
    t.add_argument('--background', default='plain', choices=TOY_BACKGROUNDS,
                   help="textured: smooth random clutter behind the shapes (the toy lab's harder variant)")
    t.add_argument('--teacher', action='store_true', help='also train the toy teacher (OUT/teacher.safetensors)')
    t.add_argument('--fd', action='store_true', help='also train the toy FD network and draw its reference set')
    i = sub.add_parser('imagenet', help='an ImageFolder (ImageNet train/) -> images + VAE moments; torchrun-able')
    i.add_argument('--src', required=True, help='folder with one sub-folder of images per class')
    i.add_argument('--out', default='data/imagenet256')
    i.add_argument('--vae', default='stabilityai/sd-vae-ft-ema',
                   help='the VAE: hub id owner/name[/folder], an SD-VAE weights file, or a diffusers folder')
    i.add_argument('--autoencoder', help='decoder recorded in dataset.json (default: --vae)')
    i.add_argument('--latent-norm', default='vae', choices=['vae', 'dataset'],
                   help="vae: the normalisation the VAE ships; dataset: per-channel mean/std computed over this set")
    i.add_argument('--resolution', type=int, default=256)
    i.add_argument('--batch-size', type=int, default=32, help='images per VAE forward')
    i.add_argument('--num-workers', type=int, default=8, help='JPEG decoding processes per rank')
    i.add_argument('--chunk-size', type=int, default=1000, help='images per resumable unit of work')
    i.add_argument('--limit', type=int, help='at most N images per class')
    i.add_argument('--classes', help='K (the first K classes) or a comma list of class folder names')
    i.add_argument('--skip-bad', action='store_true', help='leave unreadable files out (listed in bad_files.txt)')
    r = sub.add_parser('repa', help="convert REPA's preprocessed folder (images/ + vae-sd/)")
    r.add_argument('--src', required=True, help='the folder holding images/ and vae-sd/')
    r.add_argument('--out', default='data/imagenet256')
    r.add_argument('--autoencoder', default='stabilityai/sd-vae-ft-ema', help='decoder recorded in dataset.json')
    r.add_argument('--class-names', help='ImageNet train/ folder: its sorted sub-folder names become class_names')
    r.add_argument('--num-workers', type=int, default=8)
    c = sub.add_parser('teacher-cache', help="a teacher's outputs on a prepared dataset, for --enc-cache (toy lab)")
    c.add_argument('--data', default='data/toy', help='the prepared dataset')
    c.add_argument('--enc', default='dinov2-s', help="the teacher, as the training scripts' --enc")
    c.add_argument('--enc-ckpt', help="its weights, as --enc-ckpt (default: the hub; toy: DATA/teacher.safetensors)")
    c.add_argument('--attn-blocks', default='-2,-1', help="teacher blocks whose attention logits HASTE reads "
                   "(negative: from the last)")
    c.add_argument('--patch-size', type=int, default=2, help='of the SiT that aligns to it (the token grid)')
    c.add_argument('--out', help='default: DATA/cache-ENC')
    args = p.parse_args(argv)
    if args.source == 'toy':
        prepare_toy(args.out, args.per_class, args.resolution, args.seed, args.background)
        if args.teacher:
            prepare_toy_teacher(args.out, args.seed)
        if args.fd:
            prepare_toy_fd(args.out, args.seed)
    elif args.source == 'imagenet':
        prepare_imagenet(args)
    elif args.source == 'teacher-cache':
        prepare_teacher_cache(args.data, args.enc, args.enc_ckpt, args.attn_blocks, args.patch_size, args.out)
    else:
        prepare_repa(args.src, args.out, args.autoencoder, args.class_names, args.num_workers)


if __name__ == '__main__':
    main()
