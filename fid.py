"""
FID, sFID, Inception Score, precision and recall of generated images, computed as OpenAI's ADM
evaluator does (guided-diffusion/evaluations/evaluator.py, TensorFlow) but in plain PyTorch;
or FD-DINOv2 with --features dinov2, as EDM2 computes it (dgm-eval's protocol, EDM2's torch resize): the CLS
token of DINOv2 ViT-L/14 at 224 px, with the position embedding DINOv2's own (torch.hub) model interpolates.

    python fid.py SAMPLES REF [--json] [--inception-weights PATH]
    python fid.py samples_50k.npz VIRTUAL_imagenet256_labeled.npz
    python fid.py samples/ imagenet_train_pngs/ --features dinov2
    python fid.py samples.npz data/toy/fd_ref.npz --features toy     # the toy FD (prepare.py toy --fd makes both)

SAMPLES and REF are each an .npz with arr_0 = uint8 images (N, H, W, 3); an .npz with precomputed
mu/sigma (+ mu_s/sigma_s for sFID), e.g. ADM's VIRTUAL_imagenet256_labeled.npz, which has images too
(as in ADM, stored statistics give FID/sFID and the images give precision/recall); or a folder of
PNGs (recursive, sorted). REF's features are cached beside it as REF.<features>.stats.npz, keyed on
its size/mtime, the feature type and the weights. The Inception weights (pytorch-fid's port of TF's
inception-2015-12-05) are fetched by torch.hub; offline, pass --inception-weights PATH.

The toy FD (--features toy) is the Frechet distance on the pooled features of ToyNet, a small CNN that
`prepare.py toy --fd` trains to name the shape and the colour of toy images separately (an architecture, objective
and seed of its own: it does not reward alignment with the toy teacher by construction), next to fd_ref.npz, a
held-out toy set drawn with another seed; its weights are read from fd.safetensors beside REF (or --toy-weights).
"""

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

INCEPTION_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
DINOV2_MODEL = 'vit_large_patch14_dinov2.lvd142m'
# precomputed statistics an npz may carry, per feature type, as (mean, covariance) key pairs
STATS_KEYS = {'inception': [('mu', 'sigma'), ('mu_s', 'sigma_s')], 'dinov2': [('mu_dinov2', 'sigma_dinov2')],
              'toy': [('mu_toy', 'sigma_toy')]}
# bump a feature type's version when its pipeline changes, so its old caches are not served (per type: a
# DINOv2 change must not throw away hours of cached Inception statistics).
# dinov2 2: DINOv2's own position-embedding interpolation instead of timm's load-time resampling
CACHE_VERSION = {'inception': 1, 'dinov2': 2, 'toy': 1}
DINOV2_SIZE = 224  # EDM2 and dgm-eval resize every image to 224x224 for DINOv2 (16x16 patches of 14 px)

# -----------------------------------------------------------------------------
# Inception-v3 of TF's inception-2015-12-05 graph (the network behind published FIDs).
# Module names follow torchvision, so pytorch-fid's pt_inception weights load strictly; the
# blocks behave like pytorch-fid's FIDInception* (i.e. like the TF graph), not like torchvision.

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's batch-norm epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

C = BasicConv2d

def avg_pool3(x):  # TF's SAME avg-pool averages real pixels only; torchvision's counts the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

class InceptionA(nn.Module):  # Mixed_5b/5c/5d (TF mixed, mixed_1, mixed_2), 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1, self.branch_pool = C(cin, 64, 1), C(cin, pool_features, 1)
        self.branch5x5_1, self.branch5x5_2 = C(cin, 48, 1), C(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = C(cin, 64, 1), C(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = C(96, 96, 3, padding=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool3(x))], 1)

class InceptionB(nn.Module):  # Mixed_6a (TF mixed_3), 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = C(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = C(cin, 64, 1), C(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = C(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

class InceptionC(nn.Module):  # Mixed_6b..6e (TF mixed_4..mixed_7), 17x17
    def __init__(self, cin, c7):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1, self.branch_pool = C(cin, 192, 1), C(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = C(cin, c7, 1), C(c7, c7, **h), C(c7, 192, **v)
        self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3 = C(cin, c7, 1), C(c7, c7, **v), C(c7, c7, **h)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = C(c7, c7, **v), C(c7, 192, **h)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool3(x))], 1)

class InceptionD(nn.Module):  # Mixed_7a (TF mixed_8), 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = C(cin, 192, 1), C(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = C(cin, 192, 1), C(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = C(192, 192, (7, 1), padding=(3, 0)), C(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

class InceptionE(nn.Module):  # Mixed_7b/7c (TF mixed_9, mixed_10), 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        h, v = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.max_pool = max_pool  # the TF graph's last block max-pools here, a quirk FID inherited
        self.branch1x1, self.branch_pool = C(cin, 320, 1), C(cin, 192, 1)
        self.branch3x3_1, self.branch3x3_2a, self.branch3x3_2b = C(cin, 384, 1), C(384, 384, **h), C(384, 384, **v)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = C(cin, 448, 1), C(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = C(384, 384, **h), C(384, 384, **v)

    def forward(self, x):
        y = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(y), self.branch3x3_2b(y)], 1)
        y = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(y), self.branch3x3dbl_3b(y)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)

class InceptionV3(nn.Module):
    """forward(x): x (N, 3, 299, 299) already resized and scaled to [-1, 1] (inception_preprocess)
    -> pool3 (N, 2048) for FID/IS/precision/recall and spatial (N, 2023) for sFID.
    fc (TF's 1008-way softmax/logits) is only used through its weight, for IS."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = C(3, 32, 3, stride=2), C(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = C(32, 64, 3, padding=1), C(64, 80, 1)
        self.Conv2d_4a_3x3 = C(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a, self.Mixed_6b, self.Mixed_6c = InceptionB(288), InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, False), InceptionE(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)  # (N, 768, 17, 17) from Mixed_6a on
        # sFID's TF tensor 'mixed_6/conv' is Mixed_6d's 1x1 branch after BN+ReLU; re-running that one
        # 1x1 conv (~1% of the FLOPs) is simpler than a hook and keeps the blocks pure
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # (N, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 2023), flattened NHWC as in TF
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # (N, 2048, 8, 8) at the end
        return x.mean((2, 3)), spatial  # pool3 (N, 2048), spatial (N, 2023)

# -----------------------------------------------------------------------------
# Preprocessing and feature networks

def tf1_resize(x, size):
    """Bilinear resize as TF1's legacy resize_bilinear(align_corners=False) inside the ADM/TTUR
    Inception graph: source coordinate = dst * in/out, with NO half-pixel offset, so it differs from
    F.interpolate (half-pixel centres) by a sub-pixel shift. x (N, C, H, W) float. Same float32 ops in
    the same order as TF's kernel: bit-identical to tf.compat.v1.image.resize_bilinear in our checks."""
    for dim, n_out in ((3, size[1]), (2, size[0])):  # TF lerps along x first, then along y
        n_in = x.shape[dim]
        scale = torch.tensor(np.float32(n_in) / np.float32(n_out), device=x.device)  # float32 as in TF
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale  # (n_out,)
        lo = src.floor()
        w = (src - lo).to(x.dtype).view([-1 if d == dim else 1 for d in range(4)])
        lo = lo.long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)  # the border pixel repeats
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        x = a + (b - a) * w
    return x

def inception_preprocess(x):  # (N, 3, H, W) floats in 0..255 -> (N, 3, 299, 299) in [-1, 1)
    return (tf1_resize(x, (299, 299)) - 128) / 128  # the TF graph's Sub(128), Mul(1/128)

def dinov2_preprocess(x):  # (N, 3, H, W) floats in 0..255 -> (N, 3, 224, 224) ImageNet-normalised
    # EDM2's DINOv2 detector in its 'torch' resize mode (its default): float32 bicubic resize with antialiasing
    # straight to 224x224 (no crop, no clamp, no rounding back to uint8), then /255 and ImageNet mean/std. Its
    # 'pil' mode (dgm-eval's PIL bicubic on uint8, rounded) is the slow reference it says gives almost the same
    # numbers; we do not follow it. As there: the CLS token after the final norm, float32, then float64 statistics.
    x = F.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode='bicubic', antialias=True) / 255
    mean, std = x.new_tensor([0.485, 0.456, 0.406]), x.new_tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

def dinov2_pos_embed(pos_embed, grid, num_prefix=1, offset=0.1):
    """pos_embed (1, num_prefix + M*M, D), trained on an M x M patch grid -> (1, num_prefix + grid*grid, D),
    the embedding DINOv2's own ViT (the torch.hub dinov2_vit*14 behind published FD-DINOv2) adds to a grid x grid
    input, by its rule for the models without registers, which is not timm's: bicubic WITHOUT antialiasing, and a
    scale factor of (grid + offset) / M rather than an output size. The offset (its interpolate_offset, 0.1) was
    meant only to keep the output size from rounding down to grid - 1, but F.interpolate also places its samples by
    the scale factor it is given: at (i + 0.5) * M / (grid + 0.1) - 0.5, not (i + 0.5) * M / grid - 0.5. The
    prefix (class token) rows pass unchanged. timm's load-time resampling (exact size, antialiased) differs by 2-4%
    relative on smooth 37x37 embeddings, and by 80% on white noise. (The hub's models with registers use offset 0
    and antialiasing, which is timm's rule: load_dinov2 keeps timm's embedding for them.)"""
    M = math.isqrt(pos_embed.shape[1] - num_prefix)
    if grid == M:  # at its native size DINOv2 adds the trained embedding as it is
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix].float(), pos_embed[:, num_prefix:].float()  # fp32, as DINOv2
    D = patch.shape[-1]
    patch = patch.reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
    s = (grid + offset) / M  # a Python float, as DINOv2 passes it
    patch = F.interpolate(patch, scale_factor=(s, s), mode='bicubic', antialias=False)  # (1, D, grid, grid)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, D)  # row-major patch order, as the tokens
    return torch.cat([prefix, patch], 1).to(pos_embed.dtype)  # (1, num_prefix + grid*grid, D)

def state_dict_mismatch(net, sd):
    """'' if sd has exactly net's parameter names and shapes, else one line naming the differences."""
    own, shape = net.state_dict(), lambda t: tuple(getattr(t, 'shape', ()))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k} {shape(sd[k])} for {shape(v)}' for k, v in own.items() if k in sd and shape(sd[k]) != shape(v)]
    parts = [f'{len(ks)} {what} (e.g. {ks[:2]})' for ks, what in
             ((missing, 'missing keys'), (unexpected, 'unexpected'), (shapes, 'of wrong shape')) if ks]
    return ', '.join(parts)

def load_inception(weights=None):
    """weights: a local pt_inception-2015-12-05-6726825d.pth, or None for torch.hub's cached download."""
    if weights and not os.path.isfile(weights):
        raise SystemExit(f'fid.py: --inception-weights {weights}: no such file')
    # torch.hub's checkpoint cache (shared with pytorch-fid); not load_state_dict_from_url, which
    # announces downloads on stdout and would corrupt --json output
    path = weights or os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(INCEPTION_URL))
    fix = f'get {INCEPTION_URL} and pass --inception-weights PATH'
    try:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, path, progress=True)  # progress bar on stderr
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # offline, wrong or corrupt file: one line, no traceback
        why = (str(e).strip().splitlines() or [''])[0][:100]
        raise SystemExit(f'fid.py: cannot load Inception weights from {weights or "the internet"} '
                         f'({type(e).__name__}: {why}); {fix}')
    net = InceptionV3()  # strict: a wrong file must fail here, not give plausible-looking FIDs
    # load_state_dict's own error is many lines; its first says only that something differs
    why = state_dict_mismatch(net, sd) if isinstance(sd, dict) else f'a {type(sd).__name__}, not a state dict'
    if why:
        raise SystemExit(f'fid.py: cannot load Inception weights from {path}: {why}; {fix}')
    net.load_state_dict(sd)
    return net.eval().requires_grad_(False)

def load_dinov2(model=DINOV2_MODEL, weights=None):
    """DINOv2 via timm, giving the numbers of DINOv2's own torch.hub model (what EDM2 and dgm-eval run) on
    DINOV2_SIZE px inputs; net(x) is the CLS token after the final norm, (N, D). weights: None = timm's hub
    download/cache, a local file, or 'random' (tests only). Not sit.load_teacher: FD-DINOv2 follows EDM2's
    preprocessing (antialiased resize to 224, ViT-L) and DINOv2's position embedding; REPA's teacher does not."""
    import timm
    local = weights not in (None, 'random')
    if local and not os.path.isfile(weights):
        raise SystemExit(f'fid.py: --dinov2-weights {weights}: no such file')
    kw = dict(pretrained_cfg_overlay=dict(file=weights)) if local else {}
    hf_log = logging.getLogger('huggingface_hub')  # offline, its retry warnings would bury our message
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        # built at its native size (518 px, a 37x37 grid, for DINOv2) so that the trained embedding arrives
        # untouched: at img_size=224 timm would resample it at load time by its own rule (see dinov2_pos_embed)
        net = timm.create_model(model, pretrained=weights != 'random', num_classes=0, **kw)
    except Exception as e:  # offline, wrong file: one line, no traceback
        raise SystemExit(f'fid.py: cannot load DINOv2 {model} ({type(e).__name__}); get https://huggingface.co/'
                         f'timm/{model}/resolve/main/model.safetensors and pass --dinov2-weights PATH')
    finally:
        hf_log.setLevel(level)
    if not hasattr(net, 'set_input_size'):
        raise SystemExit(f'fid.py: timm {timm.__version__} cannot resize a ViT; FD-DINOv2 needs timm >= 1.0.9 '
                         f'(pip install -U timm)')
    # the hub model interpolates its embedding inside every forward; ours always sees DINOV2_SIZE px, so once
    # here gives the same (1, prefix + 16*16, D) embedding. Registers (no_embed_class) carry no position.
    grid = DINOV2_SIZE // net.patch_embed.patch_size[0]
    pos = dinov2_pos_embed(net.pos_embed.detach(), grid, 0 if net.no_embed_class else net.num_prefix_tokens)
    net.set_input_size(img_size=DINOV2_SIZE)  # resizes the patch grid, and the embedding by timm's rule ...
    if not getattr(net, 'num_reg_tokens', 0):  # ... which, but for the models with registers, DINOv2's replaces
        with torch.no_grad():
            net.pos_embed.copy_(pos)
    return net.eval().requires_grad_(False)

class ToyNet(nn.Module):
    """The toy FD's feature network (ours): net(x), x (N, 3, R, R) in 0..255 -> pooled features (N, 4 * width).
    Five 3x3 convolutions with GroupNorm (an image's features never depend on its batch), two of stride 2, then a
    global mean; shape_head and colour_head are only used in training (prepare.py toy --fd)."""

    def __init__(self, width=16, classes=10, resolution=16):
        super().__init__()
        self.resolution = resolution
        chans = [3, width, 2 * width, 2 * width, 4 * width, 4 * width]
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 3, stride=1 + (i in (1, 3)), padding=1),
                                                  nn.GroupNorm(8, b), nn.ReLU())
                                    for i, (a, b) in enumerate(zip(chans, chans[1:]))])
        self.shape_head, self.colour_head = nn.Linear(4 * width, classes), nn.Linear(4 * width, classes)

    def forward(self, x):  # (N, 3, R, R) in 0..255
        return self.body(x / 127.5 - 1).mean((2, 3))  # (N, 4 * width)

def load_toy(weights):
    """ToyNet from fd.safetensors and its config fd.json (same name), as prepare.py toy --fd writes them."""
    config = os.path.splitext(weights)[0] + '.json'
    if not (os.path.isfile(weights) and os.path.isfile(config)):
        raise SystemExit(f'fid.py: toy FD network {weights} (with its .json) not found; make it with '
                         f'`python prepare.py toy --out DATA --fd` and pass --toy-weights DATA/fd.safetensors')
    from safetensors.torch import load_file
    with open(config) as f:
        cfg = json.load(f)
    net = ToyNet(cfg['width'], cfg['classes'], cfg['resolution'])
    sd = load_file(weights)
    why = state_dict_mismatch(net, sd)
    if why:
        raise SystemExit(f'fid.py: cannot load the toy FD network from {weights}: {why}')
    net.load_state_dict(sd)
    return net.eval().requires_grad_(False)

@contextlib.contextmanager
def exact_fp32(device_type):
    # features in true fp32 like the reference numbers: TF32 matmuls/convs or bf16 autocast would perturb them
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

# -----------------------------------------------------------------------------
# Image inputs: .npz (arr_0 uint8 NHWC, streamed) or a folder of PNGs

def _npy_header(f):  # -> (shape, fortran_order, dtype); np.savez writes npy format 1.0 or 2.0
    version = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)

def _npz_batches(path, shape, bs):
    # stream arr_0 out of the zip: 50K images at 512px are ~40 GB, more than RAM
    with zipfile.ZipFile(path) as zf, zf.open('arr_0.npy') as f:
        if _npy_header(f)[1]:  # Fortran order can't be read image by image: load it whole
            arr = np.load(path)['arr_0']
            yield from (arr[i:i + bs] for i in range(0, len(arr), bs))
            return
        row = int(np.prod(shape[1:]))
        for i in range(0, shape[0], bs):
            b = min(bs, shape[0] - i)
            buf = f.read(b * row)
            if len(buf) != b * row:
                raise SystemExit(f'fid.py: {path}: arr_0 is truncated (image {i + len(buf) // row} of {shape[0]})')
            yield np.frombuffer(buf, np.uint8).reshape(b, *shape[1:]).copy()  # copy: writable for torch

def _list_pngs(path):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith('.png'))

def _read_png(f):
    try:
        with Image.open(f) as im:
            return np.asarray(im.convert('RGB'))  # (H, W, 3) uint8; grey/alpha/palette PNGs become RGB
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise SystemExit(f'fid.py: {f}: cannot read it as an image ({type(e).__name__}); re-save or remove it')

def _image_size(f):  # (width, height) from the file's header, without decoding the image
    with open(f, 'rb') as fh:
        head = fh.read(24)
    if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':  # the PNG signature, then IHDR: width, height
        return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    try:  # not a PNG inside: PIL reads other formats' headers (and decodes them in _read_png)
        with Image.open(f) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise SystemExit(f'fid.py: {f}: cannot read it as an image ({type(e).__name__}); re-save or remove it')

def _check_sizes(files):  # every image's header, so that one stray size fails before any features run
    first = _image_size(files[0])
    for f in files[1:]:
        size = _image_size(f)
        if size != first:
            raise SystemExit(f'fid.py: {f}: size {size[0]}x{size[1]} differs from {files[0]} ({first[0]}x{first[1]}); '
                             f'resize all images to one size')

def _stored_stats(path, names):
    """An npz's precomputed (mu, sigma) pairs of STATS_KEYS as float64, each checked from its npy header first
    (no pickle is ever loaded): mu (D,) and sigma (D, D), numeric. Half a pair, or a malformed one, is refused:
    used with images, it would mix stored and computed statistics."""
    with zipfile.ZipFile(path) as zf:
        for mu, sigma in (pair for pairs in STATS_KEYS.values() for pair in pairs):
            heads = {}
            for k in (mu, sigma):
                if k in names:
                    try:
                        with zf.open(k + '.npy') as f:
                            shape, _, dtype = _npy_header(f)
                        heads[k] = f'{k} {dtype} {tuple(shape)}', dtype.kind in 'iuf', tuple(shape)
                    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
                        heads[k] = f'{k} (unreadable)', False, None
            if not heads:
                continue
            if not (len(heads) == 2 and heads[mu][1] and heads[sigma][1] and len(heads[mu][2]) == 1
                    and heads[mu][2][0] > 0 and heads[sigma][2] == heads[mu][2] * 2):
                has = ', '.join([heads[k][0] for k in heads] + [f'no {k}' for k in (mu, sigma) if k not in heads])
                raise SystemExit(f'fid.py: {path}: statistics {mu}/{sigma} need numeric arrays of shapes (D,) and '
                                 f'(D, D); it has {has}; save them as np.savez(path, {mu}=mu, {sigma}=sigma)')
    with np.load(path) as z:  # numeric arrays, as checked: no pickle
        return {k: z[k].astype(np.float64) for pairs in STATS_KEYS.values() for p in pairs for k in p if k in names}

def _png_batches(files, bs):
    shape0 = None
    with ThreadPoolExecutor(4) as ex:  # PIL decodes without the GIL
        for i in range(0, len(files), bs):
            imgs = list(ex.map(_read_png, files[i:i + bs]))
            shape0 = shape0 or imgs[0].shape  # every image must match the first one
            for f, im in zip(files[i:i + bs], imgs):
                if im.shape != shape0:
                    raise SystemExit(f'fid.py: {f}: size {im.shape[1]}x{im.shape[0]} differs from {files[0]}; '
                                     f'resize all images to one size')
            yield np.stack(imgs)  # (B, H, W, 3)

def open_input(path, need_images=False):
    """Validate SAMPLES or REF without loading it. -> (n_images, batches, stats): batches(bs) yields
    uint8 (B, H, W, 3) arrays; stats holds an npz's precomputed mu/sigma-style arrays (float64).
    n_images is 0 for a statistics-only npz."""
    if not os.path.exists(path):
        raise SystemExit(f'fid.py: {path}: no such file or directory')
    if os.path.isdir(path):
        files = _list_pngs(path)
        if not files:
            raise SystemExit(f'fid.py: {path}: folder has no .png images')
        _read_png(files[0])  # a folder of non-images fails here, before any features run
        _check_sizes(files)
        return len(files), lambda bs: _png_batches(files, bs), {}
    if not zipfile.is_zipfile(path):
        raise SystemExit(f'fid.py: {path}: not an .npz file; pass an .npz with arr_0 or a folder of PNGs')
    with np.load(path) as z:
        names = z.files
    stats = _stored_stats(path, names)
    if 'arr_0' not in names:
        if stats and not need_images:
            return 0, None, stats
        raise SystemExit(f'fid.py: {path}: no arr_0 in the npz (keys: {", ".join(names) or "none"}); save images '
                         f'as np.savez(path, arr_0=uint8_nhwc) or statistics as mu/sigma')
    with zipfile.ZipFile(path) as zf, zf.open('arr_0.npy') as f:
        shape, _, dtype = _npy_header(f)
    if dtype != np.uint8:
        raise SystemExit(f'fid.py: {path}: arr_0 has dtype {dtype}, expected uint8 in 0..255; for floats in '
                         f'[0, 1] save (x * 255).round().clip(0, 255).astype(np.uint8)')
    if len(shape) != 4 or shape[-1] != 3:
        raise SystemExit(f'fid.py: {path}: arr_0 has shape {tuple(shape)}, expected NHWC (N, H, W, 3) RGB; '
                         f'for NCHW save x.transpose(0, 2, 3, 1)')
    return shape[0], lambda bs: _npz_batches(path, shape, bs), stats

def load_images(path):  # all images of an input as one uint8 (N, H, W, 3) array (small sets, tests)
    return np.concatenate(list(open_input(path, need_images=True)[1](256)))

@torch.no_grad()
def compute_features(path, net, kind='inception', batch_size=64, device='cpu'):
    """Run the images at `path` through `net`. -> dict of float32 arrays:
    inception: pool (N, 2048), spatial (N, 2023); dinov2: dinov2 (N, D); toy: toy (N, D)."""
    n, batches, _ = open_input(path, need_images=True)
    device = torch.device(device)
    net, out, done, t0, last = net.to(device), {}, 0, time.time(), None
    with exact_fp32(device.type):
        for batch in batches(batch_size):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()  # (B, 3, H, W) in 0..255
            if kind == 'inception':  # channels_last: ~1.5x faster convs on CPU, same numbers
                x = inception_preprocess(x).contiguous(memory_format=torch.channels_last)  # (B, 3, 299, 299)
                feats = dict(zip(('pool', 'spatial'), net(x)))
            elif kind == 'toy':  # toy images as they are: no resize
                if x.shape[-1] != net.resolution or x.shape[-2] != net.resolution:
                    raise SystemExit(f'fid.py: {path}: images are {x.shape[-1]}x{x.shape[-2]} but the toy FD '
                                     f'network was trained on {net.resolution}x{net.resolution} toy images')
                feats = {'toy': net(x)}  # (B, D)
            else:
                feats = {'dinov2': net(dinov2_preprocess(x))}  # (B, D)
            for k, v in feats.items():
                out.setdefault(k, []).append(v.float().cpu().numpy())
            done, now = done + len(batch), time.time()
            if now - (last or t0) >= 2 or (last and done == n):  # a progress line only for long runs
                last, rate = now, done / (now - t0)
                print(f'\r{path}: {done}/{n} images, {rate:.1f} img/s, ETA {(n - done) / rate:.0f}s ',
                      end='', file=sys.stderr, flush=True)
    if last:
        print(file=sys.stderr)
    return {k: np.concatenate(v) for k, v in out.items()}

# -----------------------------------------------------------------------------
# Metrics

def gaussian_stats(feats):  # (N, D) -> mean (D,), covariance (D, D), float64 as ADM's np.cov
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), by eigenvalues rather than ADM's scipy sqrtm with an
    eps retry: for any factor S1 = L L^T, S1 S2 has the nonzero eigenvalues of L^T S2 L, which is
    symmetric PSD, so tr sqrt(S1 S2) = sum sqrt(eigvalsh(L^T S2 L)). L comes from a pivoted Cholesky:
    cheap and rank-revealing, (D, r) for a rank-r S1. Real and finite on singular covariances with no
    eps, equal to sqrtm to ~1e-13 relative on well-conditioned ones, and ~10x faster at 2048-d."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    U, piv, rank, _ = scipy.linalg.lapack.dpstrf(sigma1)  # S1[piv][:, piv] = U^T U, U upper triangular
    L = np.zeros((len(sigma1), rank))
    L[piv - 1] = np.triu(U)[:rank].T  # (D, rank), S1 = L L^T
    ev = np.linalg.eigvalsh(L.T @ sigma2 @ L)  # (rank,) the nonzero eigenvalues of S1 S2
    tr_covmean = np.sqrt(ev.clip(min=0)).sum()  # clip: rounding can make a zero eigenvalue -1e-17
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per contiguous split, averaged over splits. As in ADM the splits have
    a fixed size, 5000 (so 10 splits at the standard 50K); logits = pool3 @ fc.weight^T, no bias."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)  # (N, K)
    scores = []
    for part in logp.split(split_size):
        log_py = torch.logsumexp(part, 0) - np.log(len(part))  # log of the split's marginal p(y), (K,)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))

def precision_recall(ref, samples, k=3, batch=1024, device='cpu'):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator: each point's
    ball has the squared distance to its k-th nearest neighbour (self excluded) as radius; precision =
    fraction of samples inside some reference ball, recall = fraction of references inside some
    sample ball. Rows go in batches: 50K x 10K never needs more than batch x 50K floats."""
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)  # (R, D)
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)  # (S, D)

    def sqdist(a, b):  # (A, D), (B, D) -> (A, B) squared Euclidean distances
        return (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None]).clamp(min=0)

    def radii(x):  # column 0 of each sorted row is the point itself, so take the (k+1)-th smallest
        return torch.cat([sqdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)])

    def inside(x, y, r):  # fraction of x within r of some y
        hits = [(sqdist(x[i:i + batch], y) <= r[None]).any(1) for i in range(0, len(x), batch)]
        return torch.cat(hits).double().mean().item()

    with exact_fp32(torch.device(device).type):
        return inside(samples, ref, radii(ref)), inside(ref, samples, radii(samples))

# -----------------------------------------------------------------------------
# Evaluation, with REF's statistics cached beside it as REF.<features>.stats.npz

def _fingerprint(path):  # identity of a file, or of every PNG in a folder
    files = _list_pngs(path) if os.path.isdir(path) else [path]
    return [(os.path.relpath(f, path), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]

def _load_cache(path, key):
    with contextlib.suppress(OSError, KeyError, ValueError, zipfile.BadZipFile), np.load(path) as z:
        if str(z['key']) == key:
            return {k: z[k] for k in z.files if k != 'key'}
    return None

def _save_cache(path, key, stats):
    try:
        with open(path + '.tmp', 'wb') as f:
            np.savez(f, key=key, **stats)
        os.replace(path + '.tmp', path)  # atomic: a killed run leaves no half-written cache
    except OSError as e:
        print(f'fid.py: warning: cannot write the cache {path}: {e}', file=sys.stderr)

def check_input(path, kind):
    """Everything about an input that can fail before features run. -> (n_images, its stored STATS_KEYS[kind])"""
    n, _, pre = open_input(path)
    pre = {k: v for k, v in pre.items() if any(k in pair for pair in STATS_KEYS[kind])}
    if n == 0 and not pre:
        raise SystemExit(f'fid.py: {path}: has no images (arr_0) and no {kind} statistics ({"/".join(STATS_KEYS[kind][0])})')
    if n == 1:
        raise SystemExit(f'fid.py: {path}: has {n} image; need at least 2 to estimate a covariance')
    return n, pre

def input_statistics(path, kind, get_net, batch_size=64, device='cpu', model_id=None, cache=False):
    """One input's statistics: n, the (mu, sigma) pairs of STATS_KEYS[kind] and, for Inception on
    images, pool (N, 2048) features for IS and precision/recall."""
    n, pre = check_input(path, kind)
    if n == 0:
        return dict(pre, n=0)
    cache_file = path.rstrip('/\\') + f'.{kind}.stats.npz'
    key = hashlib.sha1(repr((CACHE_VERSION[kind], kind, model_id, _fingerprint(path))).encode()).hexdigest()
    stats = _load_cache(cache_file, key) if cache else None
    if stats is None:
        f = compute_features(path, get_net(), kind, batch_size, device)
        if kind == 'inception':
            stats = dict(pool=f['pool'])
            stats['mu'], stats['sigma'] = gaussian_stats(f['pool'])
            stats['mu_s'], stats['sigma_s'] = gaussian_stats(f['spatial'])
        else:
            stats = dict(zip(STATS_KEYS[kind][0], gaussian_stats(f[kind])))  # dinov2 or toy
        if cache:
            _save_cache(cache_file, key, stats)
    dim = max(len(stats[mu]) for mu, _ in STATS_KEYS[kind])
    if n < dim:
        print(f'fid.py: WARNING: {path}: only {n} images for {dim}-d features: the covariance is rank-deficient '
              f'and the distance biased high; use 10K+ images (50K is standard)', file=sys.stderr)
    stats.update(pre)  # as ADM: statistics stored in the npz win over those computed from its images
    return dict(stats, n=n)

def weights_id(weights, default):  # what the cache key knows of the weights
    if weights in (None, 'random') or not os.path.isfile(weights):
        return weights or default
    return os.path.abspath(weights), os.stat(weights).st_size, os.stat(weights).st_mtime_ns

def evaluate(samples, ref, features='inception', inception_weights=None, dinov2_model=DINOV2_MODEL,
             dinov2_weights=None, batch_size=64, device=None, cache=True, toy_weights=None):
    """All metrics of SAMPLES against REF as a dict; None where the inputs don't allow one (see notes)."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if features == 'inception':
        model_id, load = weights_id(inception_weights, INCEPTION_URL), lambda: load_inception(inception_weights)
    elif features == 'toy':  # default: the network prepare.py toy --fd wrote beside its reference set
        toy_weights = toy_weights or os.path.join(os.path.dirname(ref), 'fd.safetensors')
        model_id, load = weights_id(toy_weights, 'toy'), lambda: load_toy(toy_weights)
    else:
        model_id, load = (dinov2_model, weights_id(dinov2_weights, 'hub')), lambda: load_dinov2(dinov2_model, dinov2_weights)
    for path in (samples, ref):  # a bad REF must fail now, not after an hour of SAMPLES' features
        check_input(path, features)
    get_net = functools.cache(load)  # loaded once, and only if some input needs features
    kw = dict(batch_size=batch_size, device=device, model_id=model_id)
    s = input_statistics(samples, features, get_net, **kw)
    r = input_statistics(ref, features, get_net, cache=cache and dinov2_weights != 'random', **kw)
    res, notes = dict(num_samples=s['n'], num_ref=r['n']), []

    def fd(mu, sigma, name):
        if not all(k in d for d in (s, r) for k in (mu, sigma)):
            notes.append(f'{name} needs {mu}/{sigma} or images on both sides')
            return None
        if s[mu].shape != r[mu].shape or s[sigma].shape != r[sigma].shape:
            raise SystemExit(f"fid.py: {name}: the samples' {mu}/{sigma} have shapes {s[mu].shape}/{s[sigma].shape}, "
                             f"the reference's {r[mu].shape}/{r[sigma].shape}; were they made by another network?")
        return frechet_distance(s[mu], s[sigma], r[mu], r[sigma])

    if features == 'dinov2':
        res['fd_dinov2'] = fd('mu_dinov2', 'sigma_dinov2', 'FD-DINOv2')
        return dict(res, notes=notes)
    if features == 'toy':
        res['fd_toy'] = fd('mu_toy', 'sigma_toy', 'toy FD')
        return dict(res, notes=notes)
    res.update(fid=fd('mu', 'sigma', 'FID'), sfid=fd('mu_s', 'sigma_s', 'sFID'),
               inception_score=None, precision=None, recall=None)
    if 'pool' not in s:
        notes.append('IS and precision/recall need the sample images (SAMPLES has statistics only)')
    else:  # IS needs only the samples
        w = get_net().fc.weight.to(device)  # (1008, 2048); ADM's IS uses no bias
        with exact_fp32(torch.device(device).type):
            res['inception_score'] = inception_score((torch.from_numpy(s['pool']).to(device) @ w.T).cpu())
        if 'pool' not in r:
            notes.append('precision/recall need the reference images (REF has statistics only)')
        elif min(s['n'], r['n']) <= 3:
            notes.append('precision/recall need at least 4 images on each side (k=3 neighbours)')
        else:
            res['precision'], res['recall'] = precision_recall(r['pool'], s['pool'], device=device)
    return dict(res, notes=notes)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('samples', help='generated images: .npz (arr_0 uint8 NHWC, or mu/sigma) or a folder of PNGs')
    p.add_argument('ref', help='reference images or statistics, same formats')
    p.add_argument('--features', choices=['inception', 'dinov2', 'toy'], default='inception',
                   help='inception: FID, sFID, IS, precision, recall (ADM); dinov2: FD-DINOv2 (EDM2); toy: toy FD')
    p.add_argument('--inception-weights', metavar='PATH', help='local pt_inception-2015-12-05-6726825d.pth')
    p.add_argument('--dinov2-model', default=DINOV2_MODEL, help='timm DINOv2 model name')
    p.add_argument('--dinov2-weights', metavar='PATH', help="local weights for --dinov2-model ('random': tests only)")
    p.add_argument('--toy-weights', metavar='PATH', help='the toy FD network (default: fd.safetensors beside REF)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--device', help='default: cuda if available, else cpu')
    p.add_argument('--no-cache', action='store_true', help="don't read or write REF.<features>.stats.npz")
    p.add_argument('--json', action='store_true', help='print one JSON object instead of text')
    a = p.parse_args(argv)
    res = evaluate(a.samples, a.ref, a.features, a.inception_weights, a.dinov2_model, a.dinov2_weights,
                   a.batch_size, a.device, cache=not a.no_cache, toy_weights=a.toy_weights)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"samples: {res['num_samples'] or 'statistics'}, reference: {res['num_ref'] or 'statistics'}")
    names = dict(inception_score='Inception Score', fid='FID', sfid='sFID', precision='Precision',
                 recall='Recall', fd_dinov2='FD-DINOv2', fd_toy='toy FD')
    for key, name in names.items():
        if key in res:
            print(f'{name}: ' + ('n/a' if res[key] is None else f'{res[key]:.4f}'))
    for note in res['notes']:
        print(f'note: {note}')

if __name__ == '__main__':
    main()
