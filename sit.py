"""
sit.py: the one shared module. It reads top to bottom in two parts.

The research part, what a method may change: the SiT backbone and the modules the methods add to it (REPA's
projectors, REG's class token, CAR-Flow's shift networks); the flow (label dropout, latents, the samplers); the
prepared dataset; the frozen teacher (DINOv2, or the toy teacher) and its cache.
Below the banner, the plumbing every script needs and no method changes: several nodes, run folders, checkpoints,
signals, config and logging; then pixels and the VAE.
The training scripts, sample.py, prepare.py, evaluate.py, lab.py and benchmark.py import it; fid.py stands alone.

The convention (REPA's, used by every script in this repo):
  x_t = (1 - t) * x + t * eps        t ~ U(0, 1); t = 0 is data, t = 1 is noise
  v   = eps - x                      the network predicts this velocity; loss = mean (v_pred - v)^2
  z   = (mean + std * randn - m) / s * k   latents drawn from stored encoder moments, normalised as dataset.json
                                     says (SD-VAE: m = 0, s = 1, k = 0.18215; see latent_norm)
  labels: num_classes is the null class used for classifier-free guidance
The original SiT repo runs time the other way (t = 0 noise, v = x - eps); sample.py's flip_time converts.
"""
import atexit
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Errors a user can fix: one line, never a traceback

class Failure(SystemExit):
    """What fail() raises. Uncaught, it ends the process: each node's first process prints `error: LINE`, the
    others exit 1 silently (under torchrun every rank usually hits the same problem). Code that must first tell
    the other ranks catches it and reads .line (decide_for_all, open_run)."""

    def __init__(self, line):
        self.line = line
        super().__init__(f'error: {line}' if int(os.environ.get('LOCAL_RANK', 0)) == 0 else 1)


def fail(msg):
    """One clear line instead of a traceback, for problems a user can fix (see Failure)."""
    raise Failure(msg)


def load_weights(model, sd, what):
    """Strict load_state_dict, but one readable line naming the mismatched keys instead of a multi-line error."""
    ref = model.state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    shape = [f'{k} {tuple(sd[k].shape)}!={tuple(ref[k].shape)}' for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or shape:
        fail(f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
             f"(e.g. {unexpected[:3]}), {len(shape)} of wrong shape (e.g. {shape[:2]})")
    model.load_state_dict(sd, strict=True)


# -----------------------------------------------------------------------------
# SiT backbone (DiT architecture; parameter names follow DiT / SiT / REPA so released checkpoints load)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not 0..999 as in DiT) -> 256 sinusoidal frequencies -> MLP, as SiT and REPA."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]                               # (N, 128)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)           # (N, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Table of num_classes (+1 null row when trained with label dropout). The model never drops labels
    itself: the training scripts drop them once, in the open (REPA's --legacy dropped them twice)."""

    def __init__(self, num_classes, hidden_size, class_dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_logits=False):
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (N, H, T, d)
        logits = None
        if return_logits:  # HASTE aligns the pre-softmax logits; only the blocks that are asked pay for them
            with torch.autocast(x.device.type, enabled=False):  # in fp32 also under bf16 autocast
                logits = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, H, T, T)
            x = logits.softmax(dim=-1).to(v.dtype) @ v                        # (N, H, T, d)
        else:
            x = F.scaled_dot_product_attention(q, k, v)                       # (N, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(N, T, D)), logits


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class SiTBlock(nn.Module):
    """adaLN-Zero block: c modulates (shift, scale, gate) of attention and MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, return_logits=False):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h, logits = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), return_logits)
        x = x + gate_msa.unsqueeze(1) * h
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, logits


class FinalLayer(nn.Module):
    """adaLN shift/scale, then a linear map per token. With cls_dim (REG), token 0 is the class token: it shares the
    norm and modulation and has its own head, linear_cls (REG's name)."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_dim=0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        if cls_dim:
            self.linear_cls = nn.Linear(hidden_size, cls_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)                       # (N, [1 +] T, D)
        if not hasattr(self, 'linear_cls'):
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])               # (N, T, p*p*C), (N, cls_dim)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                        # (N, T, D)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos position embedding (MAE / DiT layout: first half from the column index, second from the row)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing='ij')
    def emb(pos):
        out = pos.reshape(-1, 1) * omega[None]                                # (T, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)             # (T, D/2)
    return torch.cat([emb(cols), emb(rows)], dim=1).float()                  # (T, D)


# --- REPA's projectors: an MLP per token on the hidden states after block encoder_depth (SiT(z_dims=...))

def build_mlp(dim, projector_dim, z_dim):
    """REPA's projector: D -> 2048 -> 2048 -> z_dim with SiLU between (keys projectors.0.{0,2,4})."""
    return nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


# --- REG's class token: SiT(cls_dim=...) prepends it at position 0 (cls_projectors2, wg_norm in; FinalLayer's
# linear_cls out). While sampling it travels with the latents in one state:

class JointState(nn.Module):
    """The samplers integrate one tensor per sample, so REG's latents and class token travel packed as
    (N, C*H*W + cls_dim): every sampler operation (Euler and Heun steps, the SDE's score from velocity, its
    noise, the last mean step) is per element, which is exactly how REG's sampler treats the token. Inside the
    guidance interval both CFG halves see the same token state; the latents are guided with cfg_scale and the token
    with cls_cfg_scale (<= 0: the token's conditional velocity only), as REG's sampler does."""

    def __init__(self, model, latent_shape, cls_cfg_scale):
        super().__init__()
        self.model, self.shape, self.num_classes = model, tuple(latent_shape), model.num_classes
        self.n, self.cls_cfg_scale, self.scales = math.prod(latent_shape), cls_cfg_scale, {}

    def forward(self, s, t, y):
        v, aux = self.model(s[:, :self.n].reshape(-1, *self.shape), t, y, cls=s[:, self.n:])
        return torch.cat([v.flatten(1), aux['cls'].to(v.dtype)], dim=1), aux   # (N, C*H*W + cls_dim)

    def guidance_scale(self, cfg_scale, device):
        """Per-element scales of the packed state, built once per sampling run (not at every network call)."""
        if (cfg_scale, device) not in self.scales:
            token = self.cls_cfg_scale if self.cls_cfg_scale > 0 else 1.0
            self.scales[cfg_scale, device] = torch.cat([torch.full((self.n,), float(cfg_scale)),
                                                        torch.full((self.model.cls_dim,), float(token))]).to(device)
        return self.scales[cfg_scale, device]                                # (C*H*W + cls_dim,)


# --- CAR-Flow's shift networks: SiT(shifts=...) carries mu0 (shift_source) and mu1 (shift_target); the network
# works on shifted coordinates and every sampler on ordinary ones

class ShiftNet(nn.Module):
    """CAR-Flow's condition-aware shift: class label -> a latent-shaped shift (C, S, S). A label embedding (its own
    table, with the null class), a linear map to a width x S/4 x S/4 grid, two (2x nearest upsample, 3x3 conv,
    SiLU) stages and a 3x3 output conv, zero-initialised so training starts as plain flow matching. At width 128,
    about 1.5M parameters at 4x32x32: both nets 0.44% of SiT-XL/2 (the paper's: under 0.6% extra). The toy preset
    scales the width to that budget of SiT-T/2 (12: 0.59%)."""

    def __init__(self, num_classes, channels, size, emb_dim=128, width=128):
        super().__init__()
        if size % 4:
            fail(f'CAR-Flow shift networks need a latent size divisible by 4, got {size}')
        self.width, self.grid = width, size // 4
        self.embed = nn.Embedding(num_classes + 1, emb_dim)
        self.fc = nn.Linear(emb_dim, width * self.grid ** 2)
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(2)])
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y):
        # fp32 also under bf16 autocast: the shifts are added to fp32 latents, the nets are tiny, and CPU bf16 convs
        # are slow
        with torch.autocast(y.device.type, enabled=False):
            h = self.fc(self.embed(y)).view(-1, self.width, self.grid, self.grid)  # (N, W, S/4, S/4)
            for conv in self.convs:
                h = F.silu(conv(F.interpolate(h, scale_factor=2.0, mode='nearest')))  # ... -> (N, W, S, S)
            return self.out(h)                                                 # (N, C, S, S)


def unshifted_velocity(model, x, t, y, shifts=None, **kw):
    """CAR-Flow in ordinary coordinates. The network learns v(z_t) on the shifted path z_t = (1 - t)(x + mu1) +
    t (eps + mu0) = x_t + mu_t with mu_t = (1 - t) mu1 + t mu0; so v(x_t + mu_t, t, y) - (mu0 - mu1) is the ordinary
    velocity E[eps - x | x_t], which every sampler, the SDE's score and CFG (each half of the batch with its own
    class's shifts) take as they are. Euler steps on it are exactly the paper's sampler: start at eps + mu0,
    integrate, subtract mu1. shifts: model.shifts(y) computed beforehand (ShiftsOnce)."""
    mu0, mu1 = model.shifts(y) if shifts is None else shifts                   # (N, C, H, W) each, or 0.0
    t_ = t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)                         # (N, 1, 1, 1)
    v, aux = model(x + (1 - t_) * mu1 + t_ * mu0, t, y, shifted=True, **kw)
    return v - (mu0 - mu1), aux


class ShiftsOnce(nn.Module):
    """CAR-Flow while sampling: the shifts depend on the labels only, so they are computed once per label batch
    (with and without the CFG half), not at every step. One ShiftsOnce serves one sit.sample call, whose network
    calls see two label tensors only, y (n) and [y, null] (2n): the cache is keyed by batch length and never
    compares labels (torch.equal would be a host sync at every call). Same numbers, fewer shift-net calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.cache = model, model.num_classes, {}

    def forward(self, x, t, y, **kw):
        if len(y) not in self.cache:
            self.cache[len(y)] = self.model.shifts(y)
        return unshifted_velocity(self.model, x, t, y, shifts=self.cache[len(y)], **kw)


class SiT(nn.Module):
    """
    model(x, t, y) -> (v, aux): v is the velocity (N, C, H, W); aux is a dict that holds only what was asked:
      return_zs=True     aux['zs'] = [projector(h)] for each REPA projector, h = tokens after block encoder_depth
      attn_blocks=(i,..) aux['attn'] = [pre-softmax logits (N, heads, T, T) of block i, ...] (0-based)
    Returning a tuple always (as REPA) means code written as `model(x, t, y)[0]` ports over unchanged.
    cls_dim > 0 adds REG's class token: model(x, t, y, cls=token) with token (N, cls_dim) prepended at position 0
    (Linear -> LayerNorm, REG's names cls_projectors2 / wg_norm; pos_embed gets a zero row 0); the projectors see all
    1 + T tokens and aux['cls'] is the token's velocity (N, cls_dim).
    shifts='source' | 'target' | 'joint' adds CAR-Flow's shift networks (shift_source: mu0, shift_target: mu1;
    shift_width: their channels);
    model(x, t, y) then works in ordinary coordinates (see unshifted_velocity) and model(z, t, y, shifted=True)
    is the network on shifted coordinates, which CAR-Flow's loss trains.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False,
                 z_dims=(), projector_dim=2048, encoder_depth=8, cls_dim=0, shifts='', shift_width=128):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.hidden_size = hidden_size  # the tokens' width, for modules a method adds (its projector's input)
        # learn_sigma only so DiT/SiT checkpoints (8 output channels) load; the velocity is the first C channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.encoder_depth = encoder_depth
        self.grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.cls_dim = cls_dim
        if cls_dim:
            self.cls_projectors2 = nn.Linear(cls_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)               # with affine, as REG
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cls_dim > 0) + self.grid ** 2, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cls_dim)
        self.initialize_weights()
        if shifts not in ('', 'source', 'target', 'joint'):
            fail(f"CAR-Flow shifts {shifts!r}: use source, target or joint")
        self.has_shifts = bool(shifts)
        if shifts in ('source', 'joint'):  # built after the DiT initialisation, which would overwrite their zero init
            self.shift_source = ShiftNet(num_classes, in_channels, input_size, shift_width, shift_width)
        if shifts in ('target', 'joint'):
            self.shift_target = ShiftNet(num_classes, in_channels, input_size, shift_width, shift_width)

    def initialize_weights(self):  # DiT's initialisation, with adaLN-Zero
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        # the patch rows; REG's class-token row 0 stays zero
        self.pos_embed.data[0, -self.grid ** 2:] = sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                self.final_layer.linear]
        for layer in zero + ([self.final_layer.linear_cls] if self.cls_dim else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        p, c, g = self.patch_size, self.out_channels, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(x.shape[0], c, g * p, g * p)

    def shifts(self, y):
        """CAR-Flow's (mu0, mu1) for labels y: (N, C, H, W) each; 0.0 for a side that is not shifted."""
        return (self.shift_source(y) if hasattr(self, 'shift_source') else 0.0,
                self.shift_target(y) if hasattr(self, 'shift_target') else 0.0)

    def forward(self, x, t, y, cls=None, return_zs=False, attn_blocks=(), shifted=False):
        if self.has_shifts and not shifted:
            return unshifted_velocity(self, x, t, y, cls=cls, return_zs=return_zs, attn_blocks=attn_blocks)
        h = self.x_embedder(x)                                               # (N, T, D)
        if self.cls_dim:
            if cls is None:
                fail('this model has a class-token path (REG): call it as model(x, t, y, cls=token), or sample it '
                     'with sit.sample, which draws the token')
            h = torch.cat([self.wg_norm(self.cls_projectors2(cls))[:, None], h], dim=1)  # (N, 1 + T, D)
        h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, D)
        aux = {}
        if attn_blocks:
            aux['attn'] = [None] * len(attn_blocks)
        for i, block in enumerate(self.blocks):
            h, logits = block(h, c, return_logits=i in attn_blocks)
            if logits is not None:
                aux['attn'][attn_blocks.index(i)] = logits                  # (N, H, T, T)
            if return_zs and i + 1 == self.encoder_depth:                    # encoder_depth is 1-based, as REPA
                aux['zs'] = [proj(h) for proj in self.projectors]           # [(N, [1 +] T, z_dim)]
        v, v_cls = self.final_layer(h, c)
        if v_cls is not None:
            aux['cls'] = v_cls                                               # (N, cls_dim)
        v = self.unpatchify(v)                                               # (N, out_channels, H, W)
        return v[:, :self.in_channels], aux


# name -> (depth, width, heads). T is ours: a tiny size for the toy data and the tests.
SIZES = {'T': (6, 128, 4), 'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}


def _make(depth, hidden_size, num_heads, patch_size):
    def build(**kwargs):
        return SiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)
    return build


# patch 1 is for f16 latents (16x16 at 256 px), as REPA-E's and LightningDiT's */1 models
SiT_models = {f'SiT-{s}/{p}': _make(*SIZES[s], p) for s in SIZES for p in (1, 2, 4, 8)}


def model_depth(name):
    """Number of blocks of a model name such as 'SiT-XL/2'."""
    if name not in SiT_models:
        fail(f"unknown model '{name}'; choose one of {', '.join(SiT_models)}")
    return SIZES[name[4:].split('/')[0]][0]


def build_model(name, **kwargs):
    if name not in SiT_models:
        fail(f"unknown model '{name}'; choose one of {', '.join(SiT_models)}")
    if kwargs.get('input_size', 32) % int(name.split('/')[1]):
        fail(f"latent size {kwargs['input_size']} is not divisible by the patch size of {name}")
    depth = model_depth(name)
    if kwargs.get('z_dims') and not 1 <= kwargs.get('encoder_depth', 8) <= depth:
        fail(f"encoder_depth {kwargs.get('encoder_depth', 8)} is outside {name}'s blocks 1..{depth}; "
             f"pass --encoder-depth")
    return SiT_models[name](**kwargs)


# only train_haste.py parses block lists; here because moving it would push the repa -> haste diff past 60 lines
def parse_blocks(spec, depth, flag, count=None):
    """'4,5,6,7' -> (4, 5, 6, 7): 0-based block indices below depth (and `count` of them), or one line naming flag.
    Negative ones count from the end, as in Python: '-2,-1' is the last two blocks of any depth."""
    try:
        blocks = tuple(int(b) for b in spec.split(','))
    except ValueError:
        blocks = ()
    if not blocks or not all(-depth <= b < depth for b in blocks) or count not in (None, len(blocks)):
        fail(f"{flag} {spec!r}: expected {count or 'some'} comma-separated block indices in 0..{depth - 1} (or "
             f"-{depth}..-1 from the end)")
    return tuple(b % depth for b in blocks)


# -----------------------------------------------------------------------------
# The flow: label dropout, latents, samplers (REPA's names and arguments; t runs from 1 (noise) to 0 (data))

def drop_labels(y, p, num_classes):
    """Classifier-free guidance training: each label becomes the null class (id num_classes) with probability p."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, num_classes, y)


@functools.lru_cache(maxsize=None)
def _channel_stats(mean, std, device):
    """Built once per device: rebuilding them per micro-batch would be two blocking host-to-device copies."""
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))  # read only


def latent_norm(meta, device='cpu'):
    """dataset.json's latent normalisation as (m, s, k): the network sees z' = (z - m) / s * k, and decoding
    inverts it, z = z' / k * s + m. prepare.py writes one of two forms:
      scalar       latent_scale k, latent_shift m, s = 1: SD-VAE (k = 0.18215, m = 0); SD3 / FLUX VAEs (their
                   scaling_factor and shift_factor, diffusers' (z - shift_factor) * scaling_factor)
      per channel  latent_mean m, latent_std s (C numbers each), then latent_scale k: ReaLS's mean_std.json (k = 1),
                   a config's latents_mean / latents_std (k = scaling_factor, as diffusers' SDXL pipeline), or
                   statistics prepare.py computed over the dataset (k = 1, as LightningDiT)
    Datasets prepared before these forms hold latent_scale only: m = 0, s = 1, bit-identical to z * scale."""
    if 'latent_mean' in meta:
        m, s = _channel_stats(tuple(meta['latent_mean']), tuple(meta['latent_std']), torch.device(device))
        return m, s, meta['latent_scale']                                    # (1, C, 1, 1), (1, C, 1, 1), float
    return meta.get('latent_shift', 0.0), 1.0, meta['latent_scale']


def sample_latents(moments, meta):
    """z = mean + std * randn, drawn afresh every step from the stored encoder moments, normalised as dataset.json
    records (latent_norm; decode_latents inverts it)."""
    mean, std = moments.chunk(2, dim=1)                                      # (N, C, h, w) each
    m, s, k = latent_norm(meta, moments.device)
    return (mean + std * torch.randn_like(mean) - m) / s * k


def guided_velocity(model, x, t, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, guide=None,
                    cfg_channels=0):
    """v(x, t | y), classifier-free guided only while guidance_low <= t <= guidance_high and cfg_scale > 1: the
    official samplers' rule (REPA's, REG's and SiT's guide only above 1; REPA's and SiT's scripts refuse scales
    below 1, and so does sample.py, in one line). Outside the interval (or at scale <= 1)
    only the conditional half runs: no doubled batch. `guide` overrides the interval test with a decision the
    caller already made (Heun's second evaluation, see euler_sampler). cfg_channels = k > 0 guides the first k
    channels only and gives the others the conditional velocity, as SiT's and DiT's forward_with_cfg do (k = 3 of
    SD-VAE's 4 channels, which SiT's published guided FIDs used); 0 guides all channels (REPA, HASTE, REG)."""
    t_vec = torch.full((x.shape[0],), float(t), device=x.device)
    if guide is None:
        guide = guidance_low <= t <= guidance_high
    if cfg_scale > 1.0 and guide:
        y_null = torch.full_like(y, model.num_classes)
        v = model(torch.cat([x, x]), torch.cat([t_vec, t_vec]), torch.cat([y, y_null]))[0].float()
        v_cond, v_uncond = v.chunk(2)
        # a joint state may guide its parts with their own scales (REG's class token: JointState)
        scale = model.guidance_scale(cfg_scale, v.device) if hasattr(model, 'guidance_scale') else cfg_scale
        v = v_uncond + scale * (v_cond - v_uncond)
        if cfg_channels:
            v = torch.cat([v[:, :cfg_channels], v_cond[:, cfg_channels:]], dim=1)
        return v
    return model(x, t_vec, y)[0].float()


@torch.no_grad()
def euler_sampler(model, latents, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, cfg_channels=0):
    """Probability-flow ODE, Euler (or Heun, as REPA: no correction on the last step), t uniform 1 -> 0.
    Network evaluations per sample: num_steps (Euler), 2 * num_steps - 1 (Heun)."""
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    x = latents.float()                                                      # (N, C, H, W)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        guide = guidance_low <= t_cur <= guidance_high
        d_cur = guided_velocity(model, x, t_cur, y, cfg_scale, guide=guide, cfg_channels=cfg_channels)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            # REPA decides the guidance interval once per step, at t_cur, for both evaluations (its code defines
            # the published numbers); deciding again at t_next would differ by ~1e-3 at the interval's edge
            d_next = guided_velocity(model, x_next, t_next, y, cfg_scale, guide=guide, cfg_channels=cfg_channels)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


def score_from_velocity(v, x, t):
    """Linear path: E[eps | x_t] = (1 - t) v + x_t, so the score -E[eps]/t = -((1 - t) v + x) / t."""
    return -((1 - t) * v + x) / t


@torch.no_grad()
def euler_maruyama_sampler(model, latents, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                           t_last=0.04, cfg_channels=0):
    """Reverse SDE as REPA: diffusion w(t) = 2t, drift v - w/2 * score, t linear 1 -> t_last over num_steps
    points, then one deterministic (mean) step t_last -> 0. num_steps network evaluations per sample.
    This is also the original SiT repository's SDE sampler with its defaults (Euler steps, diffusion form 'sigma'
    with norm 1: w = 2 sigma_t, last step 'Mean' of size 0.04, grid linspace(0, 0.96, num_steps) in its time
    direction), so num_steps means its --num-sampling-steps (tests/test_sit.py checks it step for step)."""
    ts = torch.linspace(1.0, t_last, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = latents.float()
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur                                                  # < 0
        v = guided_velocity(model, x, t_cur, y, cfg_scale, guidance_low, guidance_high, cfg_channels=cfg_channels)
        w = 2 * t_cur
        drift = v - 0.5 * w * score_from_velocity(v, x, t_cur)
        x = x + drift * dt
        if i < len(ts) - 2:  # the last step returns the mean: no noise
            x = x + math.sqrt(w * abs(dt)) * torch.randn_like(x)
    return x


@torch.no_grad()
def heun_sde_sampler(model, latents, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                     t_last=0.04, cfg_channels=0):
    """The original SiT repository's SDE sampler with Heun steps (its `SDE --sampling-method Heun`; the sampler
    CAR-Flow reports), in our time direction: the SDE, the grid and the last step of euler_maruyama_sampler, so
    num_steps is SiT's --num-sampling-steps. Each of the num_steps - 1 steps first adds its noise at the step's
    start, xhat = x + sqrt(w(t_cur) |dt|) eps, then takes a Heun step of the drift from xhat, evaluated at
    (xhat, t_cur) and at the Euler prediction (xhat + dt d0, t_next). The last step t_last -> 0 is the mean step.
    Network evaluations per sample: 2 (num_steps - 1) + 1 = 2 num_steps - 1. SiT has no guidance interval; with
    one, both evaluations of a step follow the decision at t_cur, as euler_sampler's Heun does."""
    def drift(x, t, guide):  # v - w/2 * score with w(t) = 2t
        v = guided_velocity(model, x, t, y, cfg_scale, guide=guide, cfg_channels=cfg_channels)
        return v - t * score_from_velocity(v, x, t)

    ts = torch.linspace(1.0, t_last, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = latents.float()
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt, guide = t_next - t_cur, guidance_low <= t_cur <= guidance_high  # dt < 0
        if i == len(ts) - 2:  # the last step returns the mean: one evaluation, no noise
            return x + dt * drift(x, t_cur, guide)
        x = x + math.sqrt(2 * t_cur * abs(dt)) * torch.randn_like(x)       # xhat: SiT draws the noise first
        d0 = drift(x, t_cur, guide)
        d1 = drift(x + dt * d0, t_next, guide)
        x = x + dt * 0.5 * (d0 + d1)


def noise_shapes(model, latent_shape):
    """Per-sample shapes of what the samplers integrate from t = 1: the latents, then the state a model carries
    along (REG's class token). sample.py and the training previews draw Gaussian noise of these shapes, in order."""
    return [tuple(latent_shape)] + ([(model.cls_dim,)] if getattr(model, 'cls_dim', 0) else [])


def sample(model, noise, y, mode='sde', num_steps=250, heun=False, cfg_scale=1.0, guidance_low=0.0,
           guidance_high=1.0, cls_cfg_scale=None, cfg_channels=0):
    """The one sampling entry point of sample.py and the training previews, for every model of this repo: the SDE
    with Euler-Maruyama steps (REPA's evaluation sampler, which is also SiT's default SDE) or with Heun steps (SiT's
    `--sampling-method Heun`), or the ODE (Euler, or Heun): num_steps network calls per sample, 2 * num_steps - 1
    with Heun steps. noise: the latents' noise (N, C, H, W) at t = 1, or a list with one noise tensor per entry of
    noise_shapes(model, ...) (REG: latents, then class token, integrated jointly; cls_cfg_scale defaults to
    cfg_scale). cfg_channels: see guided_velocity. Returns the latents at t = 0."""
    kw = dict(num_steps=num_steps, cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
              cfg_channels=cfg_channels)
    if mode not in ('sde', 'ode'):
        fail(f"unknown sampling mode {mode!r}; use 'sde' or 'ode'")
    noise = list(noise) if isinstance(noise, (list, tuple)) else [noise]
    if len(noise) != len(noise_shapes(model, noise[0].shape[1:])):
        fail(f'the model integrates {len(noise_shapes(model, noise[0].shape[1:]))} noise tensors per sample, got '
             f'{len(noise)}; draw them with sit.noise_shapes')
    if cfg_channels and not (len(noise) == 1 and 0 < cfg_channels <= noise[0].shape[1]):
        fail(f'cfg_channels={cfg_channels}: guiding some channels only needs 1..{noise[0].shape[1]} latent '
             f'channels and a model without a class token (SiT\'s rule is for plain latents); use 0 (all channels)')
    net, x = ShiftsOnce(model) if getattr(model, 'has_shifts', False) else model, noise[0]
    if len(noise) == 2:
        net = JointState(model, x.shape[1:], cfg_scale if cls_cfg_scale is None else cls_cfg_scale)
        x = torch.cat([x.flatten(1), noise[1]], dim=1)                     # (N, C*H*W + cls_dim)
    if mode == 'sde':
        x = (heun_sde_sampler if heun else euler_maruyama_sampler)(net, x, y, **kw)
    else:
        x = euler_sampler(net, x, y, heun=heun, **kw)
    return x[:, :math.prod(noise[0].shape[1:])].reshape(noise[0].shape) if len(noise) == 2 else x


# -----------------------------------------------------------------------------
# Prepared dataset: a folder of memory-mapped .npy arrays + dataset.json (written by prepare.py)
#   images.npy   uint8   (N, 3, R, R)   what the teacher sees (REPA-style methods)
#   moments.npy  float   (N, 2C, h, w)  encoder mean and std, concatenated on dim 1
#   labels.npy   int64   (N,)
#   dataset.json {format, resolution, autoencoder, latent_scale, latent_channels, latent_size, num_classes, count,
#                 [latent_shift | latent_mean, latent_std], latent_norm_from, ...}   (normalisation: see latent_norm)

DATASET_FORMAT = 1


def read_dataset_meta(path):
    meta_path = os.path.join(path, 'dataset.json')
    if not os.path.isdir(path):
        make = (f'python prepare.py toy --out {path}' if 'toy' in os.path.basename(os.path.normpath(path)) else
                f'torchrun --nproc_per_node=8 prepare.py imagenet --src IMAGENET/train --out {path}')
        fail(f"dataset folder '{path}' does not exist; create it with `{make}` or pass --data-path")
    if not os.path.isfile(meta_path):
        fail(f"'{path}' is not a prepared dataset (no dataset.json); build it with prepare.py")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get('format') != DATASET_FORMAT:
        fail(f"'{path}' has dataset format {meta.get('format')}, this code reads {DATASET_FORMAT}; re-run prepare.py")
    c, keys = meta.get('latent_channels'), ('latent_mean', 'latent_std')
    numbers = lambda v: isinstance(v, list) and len(v) == c and all(isinstance(x, (int, float)) for x in v)
    if any(k in meta for k in keys) and not (all(numbers(meta.get(k)) for k in keys) and min(meta['latent_std']) > 0):
        fail(f"'{meta_path}': latent_mean and latent_std must be lists of latent_channels ({c}) numbers, the std "
             f"positive; re-run prepare.py")
    return meta


class PreparedDataset(torch.utils.data.Dataset):
    """Yields (moments, label) or, with images=True, (images, moments, label). Checks the folder first."""

    def __init__(self, path, images=False):
        self.meta = meta = read_dataset_meta(path)
        n, c, s, r = meta['count'], meta['latent_channels'], meta['latent_size'], meta['resolution']
        expect = {'moments': (n, 2 * c, s, s), 'labels': (n,)}
        if images:
            expect['images'] = (n, 3, r, r)
        self.arrays = {}
        for name, shape in expect.items():
            f = os.path.join(path, f'{name}.npy')
            if not os.path.isfile(f):
                fail(f"'{f}' is missing; the dataset is incomplete, re-run prepare.py")
            try:
                a = np.load(f, mmap_mode='r')
            except ValueError as e:  # a truncated file: "mmap length is greater than file size", ...
                fail(f"'{f}' is truncated or corrupt ({e}); re-run prepare.py")
            if a.shape != shape:
                fail(f"'{f}' has shape {a.shape} but dataset.json says {shape}; re-run prepare.py")
            self.arrays[name] = a
        self.images = images

    def __len__(self):
        return self.meta['count']

    def __getitem__(self, i):
        m = torch.from_numpy(np.array(self.arrays['moments'][i], dtype=np.float32))
        y = int(self.arrays['labels'][i])
        if self.images:
            return torch.from_numpy(np.array(self.arrays['images'][i])), m, y
        return m, y


# -----------------------------------------------------------------------------
# The frozen teacher: DINOv2 (timm's port of facebookresearch/dinov2, as REPA uses it) or the toy teacher, and the
# cache of its outputs

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm.data's IMAGENET_DEFAULT_*
# no-register variants, as in REPA; ViT-B/14 is the papers' default
DINOV2 = {
    'dinov2-s': 'vit_small_patch14_dinov2.lvd142m',
    'dinov2-b': 'vit_base_patch14_dinov2.lvd142m',
    'dinov2-l': 'vit_large_patch14_dinov2.lvd142m',
    'dinov2-g': 'vit_giant_patch14_dinov2.lvd142m',
}
DINOV2_DEPTH = {'dinov2-s': 12, 'dinov2-b': 12, 'dinov2-l': 24, 'dinov2-g': 40}  # blocks, known before any download


class Teacher(nn.Module):
    """Wraps a timm ViT (DINOv2, or the toy teacher): raw 0..255 images in, final-norm tokens (and optional attention
    logits) out."""

    def __init__(self, vit, grid, fp16=False):
        super().__init__()
        self.vit = vit
        self.grid = grid
        self.fp16 = fp16
        self.resolution = 14 * grid
        self.dim = vit.embed_dim
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images):
        # REPA's DINOv2 preprocessing: scale to 0..1, ImageNet-normalize, bicubic-resize the whole image (no crop)
        x = images.float() / 255.
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(self.resolution, self.resolution), mode='bicubic', align_corners=False)

    def check_grid(self):
        # one patch token per SiT token only works if the ViT patchifies 14*grid px with 14 px patches
        pe = self.vit.patch_embed
        if not (isinstance(self.grid, int) and self.grid > 0) or tuple(pe.patch_size) != (14, 14) \
                or tuple(pe.grid_size) != (self.grid, self.grid):
            fail(f"teacher mismatch: expected 14 px patches on a {self.grid}x{self.grid} grid "
                 f"({self.resolution} px), but the ViT has {tuple(pe.patch_size)} px patches on a "
                 f"{tuple(pe.grid_size)} grid; build it with load_teacher(..., grid={self.grid})")

    @torch.no_grad()
    def forward(self, images, attn_blocks=()):
        self.check_grid()
        vit, logits, hooks = self.vit, {}, []

        def make_hook(i):
            attn = vit.blocks[i].attn
            def hook(module, args, qkv):
                # reuse the block's own qkv projection output (no second matmul): split heads, q/k norms, scale
                N, L, _ = qkv.shape                                                 # (N, 1+T, 3D)
                q, k, _ = qkv.reshape(N, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = attn.q_norm(q).float(), attn.k_norm(k).float()               # (N, H, 1+T, d) each
                with torch.autocast(q.device.type, enabled=False):  # fp32 logits, also under the fp16 forward
                    logits[i] = (q @ k.transpose(-2, -1)) * attn.scale               # (N, H, 1+T, 1+T)
            return hook

        # only the asked blocks pay for the extra q k^T
        for i in dict.fromkeys(attn_blocks):
            hooks.append(vit.blocks[i].attn.qkv.register_forward_hook(make_hook(i)))
        try:
            x = self.preprocess(images)                                             # (N, 3, 14g, 14g)
            # fp16 as the official code (its 10-bit mantissa keeps targets closer to fp32 than bf16's 7); frozen and
            # without grad, so no loss scaler. enabled=False also shields it from an enclosing bf16 autocast.
            with torch.autocast(x.device.type, dtype=torch.float16, enabled=self.fp16):
                x = vit.forward_features(x).float()                                 # (N, 1+T, D)
        finally:
            for h in hooks:
                h.remove()
        out = dict(patch=x[:, vit.num_prefix_tokens:], cls=x[:, 0])                 # (N, T, D), (N, D)
        if attn_blocks:
            out['attn'] = [logits[i] for i in attn_blocks]
        return out


def _warn_random(what):
    print(f"\n{'!' * 78}\n!! WARNING: {what} has RANDOM weights. Aligning to a random teacher"
          f"\n!! is a mechanics check only; it will NOT speed up training.\n{'!' * 78}\n",
          file=sys.stderr, flush=True)


# The toy teacher: a small timm ViT that `prepare.py toy --teacher` trains on the toy set and saves beside it as
# teacher.safetensors + teacher.json. 14 px patches on 14 * grid px like DINOv2, so Teacher (preprocessing, tokens,
# logit hook) runs it exactly as it runs DINOv2; 4 heads, as SiT-T, so HASTE pairs every student head with one.
TOY_TEACHER = dict(embed_dim=128, depth=4, num_heads=4)


def build_toy_vit(grid, arch=None):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=14 * grid, patch_size=14, num_classes=0, **(arch or TOY_TEACHER))


def toy_teacher_config(weights, data_path):
    """-> (weights file, its config): weights None -> DATA_PATH/teacher.safetensors, PATH -> that file (its
    config is PATH with .json). Reads only the small .json, so flags can be checked before anything is built."""
    path = weights or os.path.join(data_path or 'data/toy', 'teacher.safetensors')
    config = os.path.splitext(path)[0] + '.json'
    if not (os.path.isfile(path) and os.path.isfile(config)):
        fail(f"toy teacher '{path}' (with its .json) not found; make it with `python prepare.py toy --out "
             f"{os.path.dirname(path) or '.'} --teacher`, or pass --enc-ckpt random for a random one")
    with open(config) as f:
        return path, json.load(f)


# only train_haste.py asks; here because it reads the teacher tables above (and moving it would push the repa ->
# haste diff past 60 lines)
def teacher_depth(name, weights=None, data_path=None):
    """Blocks of the teacher load_teacher would build, without building or fetching it (flag checks first)."""
    if name == 'toy':
        return TOY_TEACHER['depth'] if weights == 'random' else toy_teacher_config(weights, data_path)[1]['vit']['depth']
    if name not in DINOV2:
        fail(f"--enc {name!r}: unknown teacher; valid names: {', '.join(DINOV2)}, toy")
    return DINOV2_DEPTH[name]


def load_toy_teacher(weights, grid, data_path):
    """weights: None -> DATA_PATH/teacher.safetensors, PATH -> that file (its config is PATH with .json), 'random'."""
    if weights == 'random':
        _warn_random('the toy teacher')
        return build_toy_vit(grid)
    path, cfg = toy_teacher_config(weights, data_path)
    if cfg['grid'] != grid:
        fail(f"toy teacher '{path}' was trained for a {cfg['grid']}x{cfg['grid']} token grid but the model has "
             f"{grid}x{grid}; use --model SiT-*/2 on the data it was trained on, or train one for this data")
    from safetensors.torch import load_file
    vit = build_toy_vit(grid, cfg['vit'])
    try:
        sd = load_file(path)
    except Exception as e:  # truncated, or not a safetensors file
        fail(f"cannot read toy teacher '{path}' ({type(e).__name__}); delete it and teacher.json and make it again")
    load_weights(vit, sd, f"toy teacher '{path}'")
    return vit


def file_sha1(path):
    """SHA-1 (hex) of a file's bytes, read in 16 MB chunks."""
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            h.update(chunk)
    return h.hexdigest()


def teacher_id(name, weights=None, data_path=None):
    """The teacher as a teacher cache records it: its name and its weights' content (SHA-1 of the file), so a cache
    is never read for another teacher. Hub weights are named by their timm tag."""
    if weights == 'random':
        fail("--enc-ckpt random: a random teacher differs in every process and cannot be cached; drop --enc-cache")
    path = toy_teacher_config(weights, data_path)[0] if name == 'toy' else weights
    if path is None:
        return f'{name} (timm hub: {DINOV2.get(name, name)})'
    if not os.path.isfile(path):
        fail(f"teacher weights not found: {path}")
    return f'{name} ({os.path.basename(path)}, sha1 {file_sha1(path)[:12]})'


def image_keys(images):
    """uint8 images (N, 3, R, R) -> the SHA-1 of each image's bytes: what finds an image's row in a teacher cache."""
    return [hashlib.sha1(x.tobytes()).digest() for x in images.cpu().numpy()]


class TeacherCache:
    """A frozen teacher's outputs on a prepared dataset's images, computed once by prepare.py teacher-cache, read
    instead of running the ViT. Exact where the images are the dataset's own, unaugmented (the toy set: our training
    scripts never augment): each image's row is found by the SHA-1 of its bytes, so any batch, order, sampler or
    world size finds the same outputs the live teacher gives, to float rounding (it ran in other batches).
    Called as Teacher is: cache(images, attn_blocks) -> dict(patch, cls[, attn]); attn only for the blocks it holds.
    Folder: cache.json (the teacher, its weights' SHA-1, grid, precision, blocks), keys.npy (N, 20) uint8, patch.npy
    (N, T, D), cls.npy (N, D), attn.npy (N, len(blocks), heads, 1 + T, 1 + T), all float32 in images.npy's order."""

    def __init__(self, folder, teacher, grid, fp16, device):
        path = os.path.join(folder, 'cache.json')
        if not os.path.isfile(path):
            fail(f"--enc-cache {folder}: no teacher cache there (no cache.json); make it with `python prepare.py "
                 f"teacher-cache --data DATA --enc NAME [--enc-ckpt PATH] --out {folder}`")
        with open(path) as f:
            meta = json.load(f)
        want = dict(teacher=teacher, grid=grid, fp16=fp16)
        diff = [f'{k} {meta.get(k)!r} (this run: {v!r})' for k, v in want.items() if meta.get(k) != v]
        if diff:
            fail(f"--enc-cache {folder} was made for another teacher: {', '.join(diff)}; make one for this run with "
                 f"prepare.py teacher-cache, or drop --enc-cache")
        self.device, self.blocks, self.dim, self.grid = device, meta['attn_blocks'], meta['dim'], grid
        self.arrays = {k: np.load(os.path.join(folder, f'{k}.npy'), mmap_mode='r') for k in ('patch', 'cls', 'attn')}
        keys = np.load(os.path.join(folder, 'keys.npy'))
        self.rows = {k.tobytes(): i for i, k in enumerate(keys)}
        self.folder = folder

    def __call__(self, images, attn_blocks=()):
        rows = [self.rows.get(k) for k in image_keys(images)]
        if None in rows:
            fail(f"an image of this batch is not in the teacher cache {self.folder} (another dataset, or augmented "
                 f"images); make the cache from this --data-path, or drop --enc-cache")
        missing = [b for b in attn_blocks if b not in self.blocks]
        if missing:
            fail(f"the teacher cache {self.folder} holds the attention logits of blocks {self.blocks}, not {missing}; "
                 f"make it with --attn-blocks covering them, or drop --enc-cache")
        rows = np.array(rows)
        get = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        out = dict(patch=get(self.arrays['patch'][rows]), cls=get(self.arrays['cls'][rows]))   # (N, T, D), (N, D)
        if attn_blocks:
            out['attn'] = [get(self.arrays['attn'][rows, self.blocks.index(b)]) for b in attn_blocks]  # [(N, H, 1+T, 1+T)]
        return out


def _build_teacher(name, weights, grid, device, fp16, data_path):
    if name == 'toy':
        return Teacher(load_toy_teacher(weights, grid, data_path), grid, fp16).to(device).eval().requires_grad_(False)
    if name not in DINOV2:
        fail(f"--enc {name!r}: unknown teacher; valid names: {', '.join(DINOV2)}, toy")
    import timm
    arch = DINOV2[name]
    # 14 px of teacher input per SiT token: SiT-*/2 on 32x32 latents has a 16x16 grid -> 224 px, so the
    # teacher's patch tokens line up one-to-one with SiT's tokens (timm resamples the 37x37 pos-embed)
    kw = dict(img_size=14 * grid, num_classes=0)
    if weights == 'random':
        _warn_random(f'DINOv2 teacher {arch}')
        vit = timm.create_model(arch, pretrained=False, **kw)
    elif weights is not None:
        if not os.path.isfile(weights):
            fail(f"teacher weights not found: {weights}")
        # timm converts both its own safetensors and the original facebookresearch .pth
        vit = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kw)
    else:
        try:
            vit = timm.create_model(arch, pretrained=True, **kw)
        except Exception as e:  # offline, no huggingface_hub, proxy, ... all mean the same to the user
            why = (str(e).strip().splitlines() or [''])[0][:120].strip()
            fail(f"could not download teacher {arch} ({type(e).__name__}: {why}); run where huggingface.co "
                 f"is reachable, or get model.safetensors elsewhere (`pip install huggingface_hub && hf "
                 f"download timm/{arch}`) and pass --enc-ckpt PATH")
    return Teacher(vit, grid, fp16).to(device).eval().requires_grad_(False)


def load_teacher(name='dinov2-b', weights=None, grid=16, device='cpu', fp16=False, data_path=None, cache=None):
    """weights: None -> timm hub download (the toy teacher: DATA_PATH/teacher.safetensors), PATH -> local
    checkpoint, 'random' -> random init (mechanics only).
    fp16: run the forward under fp16 autocast (the training scripts do when they train in mixed precision).
    cache: a folder of this teacher's outputs on the dataset's images (prepare.py teacher-cache): read instead of
    running the ViT, which is then not built (TeacherCache)."""
    if cache:
        return TeacherCache(cache, teacher_id(name, weights, data_path), grid, fp16, device)
    # built without drawing from the global RNG, so the student the script builds next starts from the same weights
    # whichever teacher (or teacher cache) it aligns to
    with torch.random.fork_rng(devices=[]):
        return _build_teacher(name, weights, grid, device, fp16, data_path)


# =============================================================================
# INFRASTRUCTURE: everything below runs the research part above on one CPU or many GPU nodes (processes, run
# folders, checkpoints, signals, config, logging) and turns latents into pixels. Trying a method needs no change here.
# =============================================================================


# -----------------------------------------------------------------------------
# Several nodes: one decision for the whole job, and every node sees the same files

SHARED = 'the run folder (--out) and --data-path must be on a file system all nodes share'


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def where_am_i():
    """'node N (rank R, host H)': torchrun's GROUP_RANK is the node's index."""
    return f"node {os.environ.get('GROUP_RANK', '?')} (rank {get_rank()}, host {socket.gethostname()})"


def decide_for_all(fn):
    """Rank 0 runs fn (a decision from the files it sees; a small picklable result) and every rank returns that
    result; where fn ends in fail(), every rank stops with the same line (one per node). Ranks that each looked at
    the file system themselves could decide differently: another node, a lagging network file system."""
    if not dist.is_initialized():
        return fn()
    out = [None, None]
    if get_rank() == 0:
        try:
            out[0] = fn()
        except Failure as e:  # deferred: the others hear of it first, then every rank stops with this line
            out[1] = e.line
    dist.broadcast_object_list(out, src=0)
    if out[1] is not None:
        fail(out[1])
    return out[0]


def agree(problem):
    """Every rank's verdict (None, or one line) -> the same outcome on every rank: go on, or stop with the first
    rank's line (one per node), instead of some ranks exiting while the others wait in the next collective."""
    if dist.is_initialized():
        got = [None] * get_world_size()
        dist.all_gather_object(got, problem)
        problem = next((p for p in got if p), None)
    if problem:
        fail(problem)


def file_view(path):
    """What this node sees at path, to compare with other nodes: None, or a file's size and (under 1 MB) sha1."""
    if not os.path.isfile(path):
        return None
    size = os.path.getsize(path)
    if size >= 2 ** 20:
        return f'{size} bytes'
    with open(path, 'rb') as f:
        return f'{size} bytes (sha1 {hashlib.sha1(f.read()).hexdigest()[:12]})'


def data_view(path):
    """A prepared dataset as this node sees it: dataset.json's bytes, the arrays' sizes."""
    return {f"'{os.path.join(path, f)}'": file_view(os.path.join(path, f))
            for f in ('dataset.json', 'labels.npy', 'moments.npy', 'images.npy')}


def _describe(v):
    if v is None:
        return 'nothing'
    if isinstance(v, list):  # a listing of (name, size)
        return f'{len(v)} file(s), the last {v[-1][0]}' if v else 'no files'
    return str(v)[:80]


def _config_diff(old, new, run_keys):
    return ', '.join(f'{k} ({old.get(k)} -> {v})' for k, v in new.items() if k not in run_keys and old.get(k) != v)


def same_view(views, fix):
    """Several nodes coordinate through files: every rank must see what rank 0 sees. views: {label: this rank's
    view} (file_view, a short string, a listing of (name, size), or the config dict). The first difference stops
    every rank with one line per node, naming the node, what it sees and what rank 0 sees, and `fix`. Without a
    process group there is nothing to compare."""
    if not dist.is_initialized():
        return
    got = [None] * get_world_size()
    dist.all_gather_object(got, (where_am_i(), views))
    ref = got[0][1]
    for who, view in got[1:]:
        for label, v in view.items():
            if v == ref.get(label):
                continue
            if isinstance(v, dict):
                fail(f'{who} was started with other flags than rank 0 ({_config_diff(ref[label], v, ())}); start '
                     f'every node with the same command')
            fail(f'{who} sees {_describe(v)} at {label}, rank 0 sees {_describe(ref[label])}; {fix}')


# -----------------------------------------------------------------------------
# Training plumbing shared by every train_*.py: distributed set-up, precision, resume, checkpoints, signals,
# config and logging. Nothing here is method-specific; the scripts keep their loop, their loss and their data.


def leave_group():
    """Destroy the process group, if any. Registered to run at exit, an exit by fail() included: exiting with the
    group alive after a collective makes about one exit in four abort with `terminate called without an active
    exception` (its threads are still running)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python script.py` runs as one process, no group."""
    if 'RANK' not in os.environ:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        return 0, 1, device
    cuda = torch.cuda.is_available()
    device = torch.device('cuda', int(os.environ['LOCAL_RANK'])) if cuda else torch.device('cpu')
    if cuda:  # device_id: NCCL connects now, and barriers know their GPU (else a warning, and a guess)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        dist.init_process_group('gloo')
    atexit.register(leave_group)
    return dist.get_rank(), dist.get_world_size(), device


def use_bf16(precision, device):
    """--precision: 'auto' is bf16 autocast on CUDA and fp32 on CPU; 'bf16' and 'fp32' force one everywhere
    (bf16 on a CPU runs the GPU code path, slowly: that is how the tests exercise it)."""
    if precision not in ('auto', 'bf16', 'fp32'):
        fail(f"--precision {precision!r}: use auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    return precision == 'bf16' or (precision == 'auto' and device.type == 'cuda')


def micro_batch_size(global_batch, world, grad_accum):
    """Per-rank batch of one forward/backward: global_batch = micro_batch * world * grad_accum."""
    if grad_accum < 1 or global_batch % (world * grad_accum):
        fail(f"global batch {global_batch} does not split into {world} rank(s) x {grad_accum} accumulation "
             f"step(s); pass --global-batch or --grad-accum")
    return global_batch // (world * grad_accum)


def grad_sync(net, enabled):
    """DDP all-reduces gradients during backward; with gradient accumulation only the last micro-batch of an
    optimizer step needs to (no_sync accumulates locally). A no-op without DDP."""
    return contextlib.nullcontext() if enabled or not hasattr(net, 'no_sync') else net.no_sync()


def all_mean(x):
    """Mean of a tensor over ranks (identity without a process group)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# -----------------------------------------------------------------------------
# Checkpoints and run folders: atomic writes, one resume decision for the whole job, exact RNG replay


def _pickle_refusal(e):
    """What torch.load(weights_only=True) refused, in a few words, or None if e is not such a refusal. Every refusal
    of torch's weights-only unpickler is a pickle.UnpicklingError starting 'Weights only load failed'; the forms
    its text takes are listed in docs/reproducing.md (Provenance)."""
    import pickle
    import re
    msg = str(e)
    if not isinstance(e, pickle.UnpicklingError) or 'Weights only load failed' not in msg:
        return None
    for pattern, what in ((r'GLOBAL (\S+?)\.? (?:was not an allowed|whose module)', 'a pickled Python object ({})'),
                          (r'reduce for unrecognized function (.+?)(?: which belongs|$)', 'a pickled call of {}'),
                          (r'(?:create new object|only build).* but got (.+)$', 'a pickled object built from {}')):
        found = re.search(pattern, msg, re.M)
        if found:
            return what.format(found.group(1).strip())
    if 'must be imported to load' in msg:
        return 'pickled torch objects (nested tensors or DTensors) that this repo never saves'
    op = re.search(r'Unsupported operand (\d+)', msg)
    if op:  # a byte that is no pickle opcode at all: a corrupt file, not a hostile one
        import pickletools
        code = next((o.name for o in pickletools.opcodes if ord(o.code) == int(op.group(1))), None)
        return code and f'pickle opcode {code}, outside the tensors-only subset'
    return 'pickled data beyond tensors and plain containers'


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist; pass the path to a .pt file (or a run folder to resume)")
    import argparse
    import warnings
    torch.serialization.add_safe_globals([argparse.Namespace])  # REPA's last.pt stores its args (plain values)
    try:
        with warnings.catch_warnings():  # a pickle of another protocol: torch warns before it refuses in one line
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # not torch's message: it suggests weights_only=False, which runs arbitrary pickles
        refused = _pickle_refusal(e)
        if refused:
            fail(f"checkpoint '{path}' holds pickled code or objects, not only tensors and plain containers: "
                 f"{refused}; it will not be loaded, since unpickling it could run code; pass a checkpoint written "
                 "by this repo's training scripts, or re-save only its tensors (a state dict)")
        fail(f"cannot read checkpoint '{path}': not a PyTorch checkpoint, or a truncated or corrupt one "
             f"({type(e).__name__})")


def latest_checkpoint(run_dir):
    d = os.path.join(run_dir, 'checkpoints')
    files = sorted(f for f in os.listdir(d) if f.endswith('.pt')) if os.path.isdir(d) else []
    return os.path.join(d, files[-1]) if files else None


def write_json(path, obj):
    """Atomic: a kill mid-write leaves the previous file (or none), never a truncated one."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def writable_or_fail(folder):
    """Probe with a real file: permission bits say nothing for root, and read-only mounts only show on write."""
    d = folder
    while not os.path.isdir(d):  # the nearest existing ancestor is where the folder would be created
        d = os.path.dirname(os.path.abspath(d))
    for sub in (d, os.path.join(d, 'checkpoints')) if d == folder else (d,):
        if not os.path.isdir(sub):
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=sub):
                pass
        except OSError as e:
            fail(f"cannot write to '{sub}' ({e.strerror}); make it writable or pass --out to a writable folder")


def _decide_run(cfg, run_keys):
    """open_run's decision, from the files this process sees."""
    run_dir = cfg['out'].format(**cfg)
    path = None
    if cfg['resume']:
        path = latest_checkpoint(cfg['resume']) if os.path.isdir(cfg['resume']) else cfg['resume']
        if path is None:
            fail(f"no checkpoints in '{cfg['resume']}/checkpoints'; pass a checkpoint file or drop --resume")
        if os.path.isdir(cfg['resume']):
            run_dir = cfg['resume']
        elif os.path.basename(os.path.dirname(os.path.abspath(path))) == 'checkpoints':  # RUN/checkpoints/X.pt
            run_dir = os.path.dirname(os.path.dirname(path)) or '.'
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        path = latest_checkpoint(run_dir)
        if path is None:  # a run that stopped before its first checkpoint, or not a run folder at all
            if not os.path.isfile(os.path.join(run_dir, 'config.json')):
                fail(f"--out '{run_dir}' exists and is not a run folder of this repo; pass --out NEW_FOLDER")
            with open(os.path.join(run_dir, 'config.json')) as f:
                diff = _config_diff(json.load(f), cfg, run_keys)
            if diff:
                fail(f"'{run_dir}' holds a run with other settings ({diff}); pass --out NEW_FOLDER for a new run")
    writable_or_fail(run_dir)  # before the checkpoint is mapped (mmap): a refused run holds no file open
    ckpt = None
    if path is not None:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get('config'), dict) or 'method' not in ckpt['config']:
            fail(f"'{path}' is not a training checkpoint of this repo")
        if ckpt['config']['method'] != cfg['method']:
            got = ckpt['config']['method']
            fail(f"'{path}' is a {got} checkpoint, not {cfg['method']}; resume it with train_{got}.py")
        diff = _config_diff(ckpt['config'], cfg, run_keys)
        if diff and cfg['resume']:
            fail(f'resume would change {diff}; pass the flags of the original run')
        if diff:
            fail(f"'{run_dir}' already holds a run with other settings ({diff}); continue it with its own flags "
                 f"(--resume {run_dir}), or pass --out NEW_FOLDER for a new run")
        ckpt['path'] = path
    return run_dir, ckpt


def open_run(cfg, run_keys):
    """-> (run folder, checkpoint dict or None), checked before anything is written.
    --resume FILE|FOLDER continues that checkpoint (a folder: its newest); new checkpoints go to the folder it lives
    in, wherever that folder has moved. Without --resume, an --out folder that already holds a run of the same
    config continues it (what a requeued job needs: rerun the same command); another config is refused, and so is a
    folder that is not a run folder. Keys not in run_keys change the math and must equal the checkpoint's.
    Under torchrun rank 0 makes this decision for the job (run folder, checkpoint, step); every rank then checks
    that it was started with the same flags and that its node sees the same run folder, checkpoints and dataset as
    rank 0's, and loads exactly that checkpoint, or every rank stops with one line per node (see same_view)."""
    ckpt = {}

    def decide():
        run_dir, ckpt['rank0'] = _decide_run(cfg, run_keys)
        return run_dir, ckpt['rank0'] and ckpt['rank0']['path'], ckpt['rank0'] and ckpt['rank0']['step']
    run_dir, path, step = decide_for_all(decide)
    if get_world_size() == 1:
        return run_dir, ckpt['rank0']
    ckpts = os.path.join(run_dir, 'checkpoints')
    same_view({'the command line': cfg,
               f"'{ckpts}'": sorted((f, os.path.getsize(os.path.join(ckpts, f))) for f in os.listdir(ckpts)
                                    if f.endswith('.pt')) if os.path.isdir(ckpts) else None,
               f"'{os.path.join(run_dir, 'config.json')}'": file_view(os.path.join(run_dir, 'config.json')),
               **data_view(cfg['data_path'])}, SHARED)
    problem = None
    if get_rank() == 0:
        ckpt = ckpt['rank0']
    elif path is not None:  # exactly rank 0's file, which this node sees as rank 0 does
        try:
            ckpt = load_checkpoint(path)
        except Failure as e:  # deferred: agree() below stops every rank with it, not this rank alone
            ckpt, problem = None, e.line
        if problem is None and ckpt.get('step') != step:
            problem = f"'{path}' holds step {ckpt.get('step')} here but step {step} on rank 0"
        if ckpt is not None:
            ckpt['path'] = path
    else:
        ckpt = None
    agree(problem and f'{where_am_i()}: {problem}; {SHARED}')
    return run_dir, ckpt


def create_run_dir(run_dir, cfg, script, model, step):
    """Rank 0: RUN/checkpoints/, RUN/config.json (atomic), a copy of the exact script that produced the run; on
    resume, drop metrics logged after the resumed step (a killed run replays them) and stale temporary files.
    Warns when the disk has room for fewer than two more checkpoints."""
    if get_rank() == 0:
        os.makedirs(os.path.join(run_dir, 'checkpoints'), exist_ok=True)
        writable_or_fail(run_dir)
        write_json(os.path.join(run_dir, 'config.json'), cfg)
        shutil.copy(os.path.abspath(script), run_dir)
        for f in glob.glob(os.path.join(run_dir, 'checkpoints', '*.tmp')):  # a write that was killed
            os.remove(f)
        metrics = os.path.join(run_dir, 'metrics.jsonl')
        if os.path.isfile(metrics):
            with open(metrics) as f:
                keep = [line for line in f if json.loads(line)['step'] <= step]
            with open(metrics + '.tmp', 'w') as f:
                f.writelines(keep)
            os.replace(metrics + '.tmp', metrics)
        need = 2 * 4 * 4 * sum(p.numel() for p in model.parameters())  # model + EMA + AdamW's two moments, fp32
        free = shutil.disk_usage(run_dir).free
        if free < need:
            print(f"warning: '{run_dir}' has {free / 2**30:.1f} GiB free, less than two checkpoints "
                  f"({need / 2**30:.1f} GiB)", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.barrier()


def rng_state(device):
    state = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)


def restore(ckpt, model, ema, opt, device, log):
    """Weights, EMA, optimizer and this rank's RNG from a training checkpoint; returns its step."""
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    # load_state_dict copies the saved groups' implementation flags too: a checkpoint of a CPU run (fused=False)
    # would turn a GPU run's fused AdamW off for good. They are this run's choice, not the checkpoint's.
    impl = [{k: g[k] for k in ('fused', 'foreach', 'capturable') if k in g} for g in opt.param_groups]
    opt.load_state_dict(ckpt['opt'])
    for group, kv in zip(opt.param_groups, impl):
        group.update(kv)
    for state in opt.state.values():  # CPU state would stay a view of the memory-mapped checkpoint file: copy it
        state.update({k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.device.type == 'cpu'})
    step, rank, world = ckpt['step'], get_rank(), get_world_size()
    if len(ckpt['rng']) == world:
        set_rng_state(ckpt['rng'][rank], device)
    else:  # another world size cannot replay the same noise; the data order still continues
        log(f"warning: checkpoint has {len(ckpt['rng'])} rank RNG states, this run {world}: resume is not bitwise")
        torch.manual_seed(ckpt['config']['seed'] * world + rank + step)
    log(f"resumed from {ckpt['path']} at step {step}")
    return step


def save_checkpoint(path, obj):
    """Atomic and durable: written to PATH.tmp, flushed to disk, renamed over PATH, and the rename flushed too, so
    neither a killed process nor a power loss leaves a truncated checkpoint. A failed write (disk full, read-only)
    removes the partial file and ends in one line; earlier checkpoints are untouched."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch's zip writer wraps the OSError of a full disk in a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        err = e if isinstance(e, OSError) else e.__context__
        if not isinstance(err, OSError):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        prev = [f for f in sorted(os.listdir(folder)) if f.endswith('.pt') and f != os.path.basename(path)]
        fail(f"could not write checkpoint '{path}' ({err.strerror or err}); the partial file is removed and "
             + (f"the previous checkpoint '{os.path.join(folder, prev[-1])}' is intact" if prev else
                'there is no earlier checkpoint') + '; free space or fix the folder, then rerun the same command')


def save_training_state(run_dir, step, log, device, keep=0, **state):
    """RUN/checkpoints/<step>.pt: `state` (model, ema, opt, config, model_args, ...) plus step and every rank's
    RNG state, so a resumed run replays the same noise. Every rank must call it (the RNG states are gathered).
    keep > 0 deletes all but the newest `keep` checkpoints once the new one is safely on disk."""
    rngs = [rng_state(device)]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state(device))
    if get_rank() == 0:
        path = os.path.join(run_dir, 'checkpoints', f'{step:07d}.pt')
        save_checkpoint(path, dict(step=step, rng=rngs, **{k: v.state_dict() if hasattr(v, 'state_dict') else v
                                                          for k, v in state.items()}))
        log(f'checkpoint -> {path}')
        old = sorted(glob.glob(os.path.join(run_dir, 'checkpoints', '*.pt')))[:-keep] if keep > 0 else []
        for f in old:
            os.remove(f)
    if dist.is_initialized():  # no rank runs ahead (or exits) while rank 0 writes
        dist.barrier()


# -----------------------------------------------------------------------------
# Signals, config and logging


class StopFlag:
    """A stop request at the next step boundary: SIGTERM (preemption), SIGUSR1 (Slurm's --signal) or a first Ctrl-C
    (SIGINT) set it; the loop then saves and exits 0. A second Ctrl-C a second or more later exits at once, unsaved
    (within a second it is the same press: torchrun forwards a terminal's Ctrl-C to workers that saw it already).
    stop.requested is this process's own flag; the ranks agree through the job's own process group.
      stop()       the agreed flag now: a blocking all-reduce (sample.py, prepare.py: once, at the end)
      stop.poll()  the training loop's check, every step, with no host sync (see poll)"""

    def __init__(self):
        self.requested, self.first_sigint, self.pending = False, None, None
        if dist.is_initialized():
            gpu = dist.get_backend() == 'nccl'
            self.flag = torch.zeros(1, device=torch.cuda.current_device() if gpu else 'cpu')
            self.host = torch.zeros(1, pin_memory=True) if gpu else self.flag
            self.stream, self.event = (torch.cuda.Stream(), torch.cuda.Event()) if gpu else (None, None)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.first_sigint is not None and time.monotonic() - self.first_sigint > 1.0:
                if int(os.environ.get('LOCAL_RANK', 0)) == 0:
                    print('interrupted twice: exiting now, without saving', file=sys.stderr, flush=True)
                raise SystemExit(130)
            self.first_sigint = self.first_sigint or time.monotonic()
        self.requested = True

    def __call__(self):
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self.flag.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def poll(self):
        """Call once per step on every rank; every rank gets the same answer at the same step. Each call reads the
        all-reduce the previous call started (finished long since: a step ago) and starts the next one, so nothing
        waits: under NCCL it runs on a side stream and lands in pinned memory, under gloo in gloo's threads. A
        signal during step k is in the all-reduce started after step k and stops the loop after step k + 1 (at
        worst k + 2, when it lands just after a start)."""
        if not dist.is_initialized():
            return self.requested
        if self.pending is not None:
            if self.event is not None:
                self.event.synchronize()  # recorded a step ago: already complete, no wait
            else:
                self.pending.wait()
            if self.host.item():  # pinned host memory (or a CPU tensor): no device sync
                return True
        if self.stream is not None:
            with torch.cuda.stream(self.stream):  # the training stream never waits for it
                self.flag.fill_(float(self.requested))
                dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)  # enqueued; only the side stream waits for it
                self.host.copy_(self.flag, non_blocking=True)
                self.event.record()
            self.pending = True
        else:
            self.flag.fill_(float(self.requested))
            self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        return False


def parse_config(defaults, presets, argv, doc, source):
    """--key value overrides of a dict of named defaults; --preset NAME applies a named set first. The help text
    of each flag is the comment on its line in the script's config block (`source`)."""
    import argparse
    import re
    with open(source) as f:
        notes = dict(re.findall(r'^\s+(\w+)=.*?#\s*(.+)$', f.read(), re.M))

    def boolean(s):
        if s.lower() not in ('true', 'false'):
            raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")
        return s.lower() == 'true'
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line per node, as fail(), not the usage from every rank; argparse's code 2
            if int(os.environ.get('LOCAL_RANK', 0)) == 0:
                print(f'error: {message} (see --help)', file=sys.stderr, flush=True)
            raise SystemExit(2)
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=sorted(presets), help='; '.join(
        f'{name}: ' + ', '.join(f'{k}={v}' for k, v in kv.items()) for name, kv in presets.items()))
    for k, v in defaults.items():
        if k == 'method':  # fixed by the script, not a flag
            continue
        kind = boolean if isinstance(v, bool) else type(v)
        p.add_argument('--' + k.replace('_', '-'), type=kind, metavar=kind.__name__.upper(),
                       help=f"{notes.get(k, '')} (default: {v if v != '' else 'none'})".replace('%', '%%'))  # argparse formats help with %
    args = p.parse_args(argv)
    cfg = dict(defaults)
    if args.preset:
        cfg.update(presets[args.preset])
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k != 'preset'})
    return cfg


def machine():
    """This machine in a few words, for measurements: the CPU model and cores (or the GPU), torch's version."""
    cpu = platform.processor() or 'CPU'
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    gpu = f', {torch.cuda.device_count()}x {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return f'{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}'


def write_report(path, command, lines):
    """A measurement as markdown for docs/: the command, today's date and this machine, then what it printed."""
    with open(path, 'w') as f:
        f.write(f"`{command}` on {time.strftime('%Y-%m-%d')}, {machine()}:\n\n```\n" + '\n'.join(lines) + '\n```\n')


def format_time(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Logger:
    """log(msg): rank 0 prints to stdout and appends to RUN/log.txt. log.add(...) accumulates scalar tensors on
    the device (no sync per step); log.report(step) averages them over steps and ranks (one all-reduce), prints a
    line with rate and ETA, and appends one JSON object to RUN/metrics.jsonl (and wandb, if on)."""

    def __init__(self, run_dir, rank, cfg, step=0):
        self.rank, self.run_dir, self.cfg, self.wandb = rank, run_dir, cfg, None
        self.sums, self.t0, self.step0 = {}, time.time(), step
        if rank == 0 and cfg['wandb']:
            try:
                import wandb
            except ImportError:
                fail('--wandb needs the wandb package: pip install wandb')
            self.wandb = wandb.init(config=cfg, dir=run_dir, name=os.path.basename(run_dir))

    def __call__(self, msg):
        if self.rank == 0:
            line = f'[{time.strftime("%H:%M:%S")}] {msg}'
            print(line, flush=True)
            with open(os.path.join(self.run_dir, 'log.txt'), 'a') as f:
                f.write(line + '\n')

    def add(self, values, weight=1.0):
        """Add weight * value for each named scalar tensor; `weight` is 1/grad_accum for per-micro-batch terms."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * weight

    def report(self, step):
        """Average what was added since the last report over its optimizer steps and all ranks; log it."""
        keys, n = list(self.sums), step - self.step0
        means = all_mean(torch.stack([self.sums[k] for k in keys]) / n).tolist()
        dt = time.time() - self.t0
        rate = n * self.cfg['global_batch'] / dt
        eta = (self.cfg['max_steps'] - step) * dt / n
        values = dict(zip(keys, means), img_per_s=rate)
        self(f"step {step}/{self.cfg['max_steps']} | " + ' | '.join(f'{k} {v:.4f}' for k, v in zip(keys, means)) +
             f' | {rate:.1f} img/s | eta {format_time(eta)}')
        if self.rank == 0:
            with open(os.path.join(self.run_dir, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps({'step': step, **values}) + '\n')
            if self.wandb is not None:
                self.wandb.log(values, step=step)
        self.sums, self.t0, self.step0 = {}, time.time(), step


# -----------------------------------------------------------------------------
# Pixels: the one uint8 conversion, then the VAE, then decoding and grids

def to_uint8(x, round=False):
    """The repo's one pixel conversion: clamp to [-1, 1], (x + 1) * 127.5, then truncate to uint8 as REPA's,
    HASTE's and REG's generate.py do (the protocol behind their FIDs), or round=True to round to nearest (DiT's;
    truncation makes images half a grey level darker on average)."""
    x = (x.float().clamp(-1, 1) + 1) * 127.5
    return (x.round() if round else x).to(torch.uint8)


# -----------------------------------------------------------------------------
# The VAE: diffusers' AutoencoderKL architecture, own implementation, built from a diffusers config.json. That
# covers SD's kl-f8 (the default), SD3's and FLUX's 16-channel VAEs (no quant convs) and ReaLS (4 channels, f8, a
# diffusers folder). Module and attribute names mirror diffusers' so its diffusion_pytorch_model.safetensors load with
# strict=True; a config asking for anything this code builds differently is refused in one line.

# SD's kl-f8: what a bare weights file and the stabilityai/sd-vae-ft-* names mean (their config.json says the same;
# those names need only their weights file, so hub caches filled by earlier versions of this code keep working)
SD_VAE_CONFIG = {'block_out_channels': [128, 256, 512, 512], 'layers_per_block': 2, 'latent_channels': 4}
SD_VAE_NAMES = ('stabilityai/sd-vae-ft-ema', 'stabilityai/sd-vae-ft-mse')
SD_DEFAULTS = 'SD kl-f8 defaults'  # where such a VAE's config comes from, in messages and dataset.json
VAE_SCALE = 0.18215  # SD's scaling_factor: its latents are scaled by this for training
VAE_FILE = 'diffusion_pytorch_model.safetensors'


def _group_norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class VAEResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # a 1x1 projection only where the channel count changes (absent from the state dict otherwise)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class VAEAttention(nn.Module):
    """Single-head self-attention over all h*w positions, with residual."""

    def __init__(self, c):
        super().__init__()
        self.group_norm = _group_norm(c)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers key: to_out.0 (its to_out.1 is a dropout)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # (N, H*W, C), scale 1/sqrt(C)
        return x + self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)


class VAEMidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(c, c), VAEResnetBlock(c, c)])
        self.attentions = nn.ModuleList([VAEAttention(c)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEResample(nn.Module):
    def __init__(self, c, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))  # (N, C, 2H, 2W)
        # SD pads right/bottom only before the stride-2 conv; a symmetric pad would shift the grid
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, C, H/2, W/2)


class VAEBlock(nn.Module):
    """n resnets, then an optional resample stored as `downsamplers.0` / `upsamplers.0` (diffusers names)."""

    def __init__(self, cin, cout, n, resample=None):  # resample: None | 'down' | 'up'
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout) for i in range(n)])
        self.resample = resample
        if resample:
            setattr(self, resample + 'samplers', nn.ModuleList([VAEResample(cout, resample == 'up')]))

    def forward(self, x):
        for block in self.resnets:
            x = block(x)
        return getattr(self, self.resample + 'samplers')[0](x) if self.resample else x


class VAEEncoder(nn.Module):
    """len(ch) blocks of n resnets, each but the last halving the resolution; 2C outputs (mean, logvar of C)."""

    def __init__(self, ch, n, C):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            VAEBlock(ch[max(i - 1, 0)], c, n, 'down' if i < len(ch) - 1 else None) for i, c in enumerate(ch)])
        self.mid_block = VAEMidBlock(ch[-1])
        self.conv_norm_out = _group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * C, 3, padding=1)

    def forward(self, x):  # (N, 3, H, W); shapes below for SD's kl-f8
        x = self.conv_in(x)  # (N, 128, H, W)
        for block in self.down_blocks:
            x = block(x)  # ... -> (N, 512, H/8, W/8)
        x = self.mid_block(x)  # (N, 512, H/8, W/8)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (N, 2C, H/8, W/8)


class VAEDecoder(nn.Module):
    """The encoder mirrored: blocks of n resnets (diffusers: one more than the encoder), each but the last doubling."""

    def __init__(self, ch, n, C):
        super().__init__()
        rch = ch[::-1]  # SD: (512, 512, 256, 128)
        self.conv_in = nn.Conv2d(C, rch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rch[0])
        self.up_blocks = nn.ModuleList([
            VAEBlock(rch[max(i - 1, 0)], c, n, 'up' if i < len(ch) - 1 else None) for i, c in enumerate(rch)])
        self.conv_norm_out = _group_norm(rch[-1])
        self.conv_out = nn.Conv2d(rch[-1], 3, 3, padding=1)

    def forward(self, z):  # (N, C, h, w); shapes below for SD's kl-f8
        x = self.mid_block(self.conv_in(z))  # (N, 512, h, w)
        for block in self.up_blocks:
            x = block(x)  # ... -> (N, 128, 8h, 8w)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (N, 3, 8h, 8w)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL from its config fields; the defaults are SD's kl-f8. SD3 and FLUX VAEs: 16 latent
    channels and neither 1x1 conv (use_quant_conv, use_post_quant_conv false). Training and sampling only decode;
    prepare.py encodes (vae_encode_moments)."""

    def __init__(self, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 use_quant_conv=True, use_post_quant_conv=True):
        super().__init__()
        C = self.latent_channels = latent_channels
        self.factor = 2 ** (len(block_out_channels) - 1)  # one 2x resampling between consecutive blocks
        self.encoder = VAEEncoder(block_out_channels, layers_per_block, C)
        self.decoder = VAEDecoder(block_out_channels, layers_per_block + 1, C)
        self.quant_conv = nn.Conv2d(2 * C, 2 * C, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(C, C, 1) if use_post_quant_conv else None
        # where load_vae found it: its config.json fields, the folder (ReaLS's mean_std.json), and a name for messages;
        # prepare.py reads the normalisation the VAE ships from them (its encoder half is prepare.py's too)
        self.config, self.folder, self.source = {}, None, SD_DEFAULTS

    def decode(self, z):
        """Unscaled latent z (N, C, h, w) -> image (N, 3, f*h, f*w), roughly in [-1, 1]."""
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))


def _vae_arch(cfg, where):
    """A diffusers AutoencoderKL config -> our constructor's arguments. Keys that only change the numbers diffusers
    uses elsewhere (sample_size, force_upcast, the normalisation) are prepare.py's (shipped_norm) or not needed."""
    if not isinstance(cfg, dict) or not all(k in cfg for k in SD_VAE_CONFIG):
        fail(f"VAE: {where} lacks {', '.join(k for k in SD_VAE_CONFIG if k not in (cfg or {}))}: not a diffusers "
             f"AutoencoderKL config.json")
    n = len(cfg['block_out_channels'])
    want = {'_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3, 'act_fn': 'silu',
            'norm_num_groups': 32, 'mid_block_add_attention': True,
            'down_block_types': ['DownEncoderBlock2D'] * n, 'up_block_types': ['UpDecoderBlock2D'] * n}
    bad = [f'{k}={cfg[k]}' for k, v in want.items()
           if k in cfg and (list(cfg[k]) if isinstance(v, list) else cfg[k]) != v]
    if bad:
        fail(f"VAE: {where} asks for {', '.join(bad)}; this repo builds AutoencoderKL with plain DownEncoderBlock2D / "
             f"UpDecoderBlock2D blocks, silu, 32 norm groups and mid-block attention only")
    return dict(block_out_channels=list(cfg['block_out_channels']), layers_per_block=cfg['layers_per_block'],
                latent_channels=cfg['latent_channels'], use_quant_conv=cfg.get('use_quant_conv', True),
                use_post_quant_conv=cfg.get('use_post_quant_conv', True))


def _read_config(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"VAE: cannot read {path} ({type(e).__name__}: {str(e)[:80]})")


def _hub_file(repo, sub, filename, fix):
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        fail(f"VAE: huggingface_hub is not installed, cannot fetch '{repo}': `pip install huggingface_hub`, or {fix}")
    try:
        return hf_hub_download(repo_id=repo, filename=filename, subfolder=sub)
    except Exception as e:  # offline, unknown repo, missing file, auth: all end the same way for the user
        msg = (str(e).strip().splitlines() or [''])[0][:160]
        fail(f"VAE: could not get {filename} from Hugging Face repo '{repo}' ({type(e).__name__}: {msg}); {fix}")


def _resolve_vae(name):
    """--vae NAME -> (weights file, config dict, folder that may hold mean_std.json or None, where the config is):
      a file                SD kl-f8 weights (.safetensors, or a torch state dict .pt/.bin/.pth): SD_VAE_CONFIG
      a folder              diffusers layout: config.json + diffusion_pytorch_model.safetensors (or .bin)
                            [+ mean_std.json]
      owner/name[/folder]   a Hugging Face repo through the hub cache (folder: where a pipeline repo keeps its VAE,
                            e.g. vae for SD3 and FLUX); the stabilityai/sd-vae-ft-* names fetch only their weights"""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        # diffusers saved pickled .bin weights before safetensors became its default
        weights = next((f for f in (VAE_FILE, VAE_FILE.replace('.safetensors', '.bin'))
                        if os.path.isfile(os.path.join(path, f))), VAE_FILE)
        missing = [f for f in ('config.json', weights) if not os.path.isfile(os.path.join(path, f))]
        if missing:
            fail(f"VAE: folder {path} has no {' and no '.join(missing)}; a diffusers AutoencoderKL folder holds "
                 f"config.json (shape and latent normalisation) and {VAE_FILE} (pass an SD kl-f8 weights file itself)")
        cfg_file = os.path.join(path, 'config.json')
        return os.path.join(path, weights), _read_config(cfg_file), path, cfg_file
    if os.path.isfile(path):
        return path, dict(SD_VAE_CONFIG), None, SD_DEFAULTS
    parts = name.split('/')
    # a repo id is 'owner/name' (+ '/folder'); anything else that does not exist is a mistyped local path
    if (path.endswith(('.safetensors', '.bin', '.pt', '.pth')) or len(parts) not in (2, 3) or not all(parts)
            or name.startswith(('.', '/', '~'))):
        fail(f"VAE: no such file or directory: {path} (pass --vae PATH to a diffusers AutoencoderKL folder, an SD-VAE "
             f"{VAE_FILE}, or a Hugging Face repo owner/name[/folder])")
    repo, sub = '/'.join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    files = [VAE_FILE] if name in SD_VAE_NAMES else ['config.json', VAE_FILE]
    inside = f'{sub}/' if sub else ''
    fix = (f"download where there is internet with `hf download {repo} "
           f"{' '.join(inside + f for f in files)} --local-dir DIR` and pass --vae DIR{'/' + sub if sub else ''}")
    got = [_hub_file(repo, sub, f, fix) for f in files]
    if name in SD_VAE_NAMES:
        return got[-1], dict(SD_VAE_CONFIG), None, SD_DEFAULTS
    return got[-1], _read_config(got[0]), None, f'{name} config.json'


# diffusers' deprecated attention names, still used in the released sd-vae-ft-* files
_OLD_ATTN_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _rename_old_attention_key(k):
    parts = k.split('.')
    if 'attentions' in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTN_NAMES:
        parts[-2] = _OLD_ATTN_NAMES[parts[-2]]
    return '.'.join(parts)


def load_vae(name_or_path='stabilityai/sd-vae-ft-ema', device='cpu'):
    """A VAE (a file, a diffusers folder or a hub name, see _resolve_vae) as our AutoencoderKL: frozen, eval mode,
    on `device`. vae.config and vae.folder keep what the normalisation it ships is read from (prepare.shipped_norm)."""
    file, cfg, folder, where = _resolve_vae(name_or_path)
    vae = AutoencoderKL(**_vae_arch(cfg, where))
    vae.config, vae.folder, vae.source = cfg, folder, where
    if file.endswith('.safetensors'):
        from safetensors.torch import load_file
        sd = load_file(file)
    else:
        sd = torch.load(file, map_location='cpu', weights_only=True)
    sd = {_rename_old_attention_key(k): v for k, v in sd.items()}
    load_weights(vae, sd, f"VAE: {file} is not the diffusers-layout state dict of the autoencoder {where} describes")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def vae_decode_to_uint8(vae, z, batch_size=32, round=False):
    """Unscaled latents (N, C, h, w) -> uint8 images (N, 3, f*h, f*w) on CPU, decoded batch_size at a time, in fp32
    unless the caller runs it under autocast (sample.py --bf16)."""
    device = next(vae.parameters()).device
    return torch.cat([to_uint8(vae.decode(zb.to(device, torch.float32)), round).cpu()  # (B, 3, f*h, f*w)
                      for zb in torch.as_tensor(z).split(batch_size)])


def decode_latents(z, meta, vae=None, round=False):
    """Normalised latents (N, C, h, w) -> uint8 images (N, 3, R, R) on CPU: dataset.json's normalisation inverted
    (latent_norm), then the decoder. Runs in the caller's autocast, if any."""
    m, s, k = latent_norm(meta, z.device)
    x = z.float() / k * s + m                                                # (N, C, h, w), the VAE's own latents
    return to_uint8(x, round).cpu() if vae is None else vae_decode_to_uint8(vae, x, round=round)


def load_autoencoder(meta, device, path=None):
    """The dataset's decoder: None for the toy set's identity, else the VAE dataset.json names (or PATH), which
    must make the dataset's latents: as many channels, the same downsampling."""
    if meta['autoencoder'] == 'identity':
        return None
    name = path or meta['autoencoder']
    vae = load_vae(name, device)
    c, f = meta['latent_channels'], meta['resolution'] // meta['latent_size']
    if (vae.latent_channels, vae.factor) != (c, f):
        fail(f"VAE {name} makes {vae.latent_channels}-channel latents at 1/{vae.factor} of the image size but the "
             f"dataset's are {c}-channel at 1/{f}; pass the VAE the dataset was prepared with (--vae)")
    return vae


def save_grid(images, path, nrow):
    """uint8 (N, 3, H, W) -> one PNG grid with 2 px gaps; tiny images (the toy set) are enlarged (nearest) to
    at least 64 px so the grid is readable."""
    from PIL import Image
    scale = max(1, 64 // max(images.shape[-2:]))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + 2) + 2, nrow * (w + 2) + 2, 3), dtype=np.uint8)
    for i, img in enumerate(images.cpu().numpy().transpose(0, 2, 3, 1)):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    Image.fromarray(grid).save(path)
