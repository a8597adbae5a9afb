"""
prepare.py: turn images into a prepared dataset (the folder layout sit.PreparedDataset reads).

  python prepare.py toy --out data/toy            # built-in procedural toy set, no download, seconds on a CPU

The toy set has 10 classes, each one shape in one colour (red circle, green square, ...), drawn with Pillow
at a random position, size and rotation on a dark background; deterministic from --seed. Its autoencoder is
`identity`: the latents are the pixels scaled to [-1, 1] (std 0, scale 1), so training runs unchanged on
3x32x32 "latents".
"""
import argparse
import json
import math
import os

import numpy as np

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
    tmp = os.path.join(out, 'dataset.json.tmp')
    with open(tmp, 'w') as f:
        json.dump({'format': sit.DATASET_FORMAT, **meta}, f, indent=1)
    os.replace(tmp, os.path.join(out, 'dataset.json'))


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


def draw_toy(label, rng, resolution=32, supersample=4):
    """One toy image, uint8 (3, R, R). Drawn 4x larger and downsampled for smooth edges."""
    from PIL import Image, ImageDraw
    shape, _, colour = TOY_CLASSES[label]
    size = resolution * supersample
    bg = tuple(int(v) for v in rng.integers(10, 45, size=3))
    img = Image.new('RGB', (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * size                        # half-extent of the shape
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    a = rng.uniform(0, 2 * math.pi)
    col = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
    w = r * 0.35                                              # stroke / arm half-width
    if shape == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == 'ring':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=bg)
    elif shape == 'square':
        d.polygon(_polygon(4, r * 1.1, a, (cx, cy)), fill=col)
    elif shape == 'diamond':
        d.polygon(_rotated([(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)], a, (cx, cy)), fill=col)
    elif shape == 'triangle':
        d.polygon(_polygon(3, r * 1.15, a, (cx, cy)), fill=col)
    elif shape == 'star':
        d.polygon(_polygon(5, r * 1.15, a, (cx, cy), inner=r * 0.45), fill=col)
    elif shape == 'bar':
        d.polygon(_rotated([(-r, -w), (r, -w), (r, w), (-r, w)], a, (cx, cy)), fill=col)
    elif shape in ('cross', 'plus'):
        turn = a if shape == 'cross' else 0.0                  # plus stays upright, cross rotates freely
        for arm in (0.0, math.pi / 2):
            d.polygon(_rotated([(-r, -w), (r, -w), (r, w), (-r, w)], turn + arm, (cx, cy)), fill=col)
    elif shape == 'heart':
        pts = [(16 * math.sin(s) ** 3, -(13 * math.cos(s) - 5 * math.cos(2 * s) - 2 * math.cos(3 * s)
                                         - math.cos(4 * s))) for s in np.linspace(0, 2 * math.pi, 60)]
        d.polygon(_rotated([(x * r / 16, y * r / 16) for x, y in pts], a * 0.3, (cx, cy)), fill=col)
    img = img.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(img).transpose(2, 0, 1)                 # (3, R, R)


def prepare_toy(out, per_class=500, resolution=32, seed=0):
    num_classes = len(TOY_CLASSES)
    count = num_classes * per_class
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % num_classes)
    arrays = open_arrays(out, count, resolution, 3, resolution, np.float32)
    for i, y in enumerate(labels):
        img = draw_toy(int(y), rng, resolution)
        arrays['images'][i] = img
        arrays['moments'][i, :3] = img / 127.5 - 1.0           # identity autoencoder: mean = pixels in [-1, 1]
        arrays['moments'][i, 3:] = 0.0                         # std 0: the latent is exact
    arrays['labels'][:] = labels
    for a in arrays.values():
        a.flush()
    write_meta(out, resolution=resolution, autoencoder='identity', latent_scale=1.0, latent_channels=3,
               latent_size=resolution, num_classes=num_classes, count=count,
               class_names=[f'{c} {s}' for s, c, _ in TOY_CLASSES])
    print(f'wrote {count} toy images ({num_classes} classes, {resolution}px) to {out}')


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='source', required=True)
    t = sub.add_parser('toy', help='the built-in procedural toy set')
    t.add_argument('--out', default='data/toy')
    t.add_argument('--per-class', type=int, default=500, help='images per class (10 classes)')
    t.add_argument('--resolution', type=int, default=32)
    t.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.source == 'toy':
        prepare_toy(args.out, args.per_class, args.resolution, args.seed)


if __name__ == '__main__':
    main()
