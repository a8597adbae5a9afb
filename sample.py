"""
sample.py: sample a trained SiT checkpoint for evaluation (PNGs + one ADM-format .npz) or as a preview grid.

  torchrun --nproc_per_node=8 sample.py --ckpt runs/repa/checkpoints/0400000.pt --protocol repa
      (= --num-samples 50000 --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7: REPA's headline FID)
  -> runs/repa/samples/0400000-ema-repa-sde250-cfg1.8-g0.0-0.7-seed0/000000.png ... and, beside the folder,
     runs/repa/samples/0400000-ema-repa-sde250-cfg1.8-g0.0-0.7-seed0.npz       (arr_0: uint8 (N, H, W, 3))
  python sample.py --ckpt runs/toy-vanilla/checkpoints/0001000.pt --num-samples 100 --mode ode --num-steps 50
  python sample.py --ckpt runs/toy-vanilla --grid 4 --cfg-scale 4    # newest checkpoint, one column per class
  python sample.py --ckpt pretrained/last.pt --model SiT-XL/2 --vae DIR ...            # REPA / HASTE release
  python sample.py --ckpt pretrained/SiT-XL-2-256.pt --model SiT-XL/2 --sit-convention --protocol sit  # SiT's own

--protocol NAME sets every sampling flag to the evaluation behind a published number (PROTOCOLS below: repa,
repa-nocfg, haste, reg, sit, carflow); flags given as well override it and are listed as overrides in the log.

Checkpoints of this repo know their method, model and dataset (config inside), so they need no extra flags;
EMA weights unless --weights model. Released state dicts (raw, or a dict with 'ema') need --model and use
ImageNet's latent layout (4x32x32, 1000 classes, sd-vae-ft-ema) unless --data-path names a prepared dataset.

The default is the protocol behind REPA's, HASTE's and REG's published FIDs (their generate.py): the network and
the VAE decoder in fp32 (TF32 on CUDA), pixels clamp(-1, 1) -> (x + 1) * 127.5 -> TRUNCATED to uint8.
Opt-ins that change numbers: --round (round to nearest, DiT's conversion: truncation is ~0.5 grey levels darker on
average) and --bf16 (bf16 autocast for the network and the decoder: faster on GPUs, pixels move slightly). Both
are part of the output folder's name, so samples of different protocols never mix.
Reruns with the same settings resume: indices whose PNG exists are skipped (PNGs are written atomically).
The output depends on (checkpoint, settings, --seed, --batch-size), not on the number of processes.
"""
# As a library (evaluate.py and lab.py use it): load_model(ckpt, weights=..., data_path=...) -> Loaded(model, meta,
# weights, what); add_sampler_flags(parser) and resolve_sampler_flags(args) give another tool these sampler flags and
# protocols; sample_for_evaluation(args, rank, world, device) writes the samples; draw_inputs(indices, seed, ...)
# gives the noise and labels of given sample indices.
import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import sit

# released ImageNet checkpoints (REPA, HASTE, SiT) carry no dataset.json: the layout they were trained on
IMAGENET = dict(resolution=256, autoencoder='stabilityai/sd-vae-ft-ema', latent_scale=sit.VAE_SCALE,
                latent_channels=4, latent_size=32, num_classes=1000)

# -----------------------------------------------------------------------------
# Evaluation protocols by name: every sampling flag of the evaluation behind a published number. The decoder
# (sd-vae-ft-ema) and the latent scale come with the checkpoint's dataset, not from here. Each entry's source (the
# official script, file and line, or the paper) is in docs/reproducing.md. A value UNPUBLISHED must be given.
UNPUBLISHED = 'unpublished'
# what all of them share: REPA's generate.py as its README runs it: 50K samples, uniform random labels, EMA
# weights, fp32 network and decoder, truncated pixels, SDE with 250 Euler-Maruyama steps, no guidance
_OFFICIAL = dict(weights='ema', num_samples=50_000, class_balanced=False, mode='sde', num_steps=250, heun=False,
                 cfg_scale=1.0, cfg_channels=0, guidance_low=0.0, guidance_high=1.0, cls_cfg_scale=None, round=False,
                 bf16=False)
PROTOCOLS = {
    'repa': dict(_OFFICIAL, cfg_scale=1.8, guidance_high=0.7),          # REPA SiT-XL/2 4M: FID 1.42
    'repa-nocfg': dict(_OFFICIAL),  # the no-CFG tables: REPA's (SiT-XL/2 7.9 at 400K), HASTE's and REG's rows
    'haste': dict(_OFFICIAL, cfg_scale=1.65, guidance_high=0.72),       # HASTE SiT-XL/2 2.5M
    # REG SiT-XL/2 4M: FID 1.36; both scales set (REG's generate.py would default the token's to 1.5)
    'reg': dict(_OFFICIAL, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_high=0.85),
    # SiT-XL/2 7M: FID 2.06: SiT's Euler SDE (= REPA's), CFG on the first 3 channels, no interval, pixels rounded.
    # Not --sit-convention: that is a property of SiT's released weights (pass it for SiT-XL-2-256.pt), not of the
    # protocol; our checkpoints, trained in REPA's direction, take the same protocol without it.
    'sit': dict(_OFFICIAL, cfg_scale=1.5, cfg_channels=3, round=True),
    # CAR-Flow SiT-XL/2: FID 1.68 with "the Heun SDE solver with 250 NFEs" of SiT's code: --num-steps N makes 2N - 1
    # evaluations, so N = 125 (249), the nearest below. The scale is not published (required); the rest is SiT's
    # sample_ddp.py as for 'sit' (3 CFG channels, rounding): an assumption (--cfg-channels 0 --no-round for REPA's)
    'carflow': dict(_OFFICIAL, heun=True, num_steps=125, cfg_scale=UNPUBLISHED, cfg_channels=3, round=True),
}
DEFAULTS = dict(_OFFICIAL, num_steps=None)  # without --protocol; num_steps: 250 (sde) / 50 (ode), see resolve


# -----------------------------------------------------------------------------
# Sampler flags: sample.py's command line, also evaluate.py's (add_sampler_flags + resolve_sampler_flags)


def add_sampler_flags(p, own=True):
    """sample.py's flags, in its --help order. own=False (evaluate.py's parser) leaves out what is sample.py's own:
    --ckpt (evaluate.py takes run folders), --num-samples (evaluate.py's, default 10K), --grid and --classes.
    The flags a --protocol sets default to SUPPRESS, so an absent one leaves no attribute: resolve_sampler_flags
    then knows exactly which were given (and fills in the rest)."""
    unset = argparse.SUPPRESS
    if own:
        p.add_argument('--ckpt', required=True, help='a checkpoint of this repo (or a run folder: its newest), '
                                                     'or a released state dict')
    p.add_argument('--protocol', choices=list(PROTOCOLS), help='set every sampling flag to a published evaluation '
                   '(see PROTOCOLS in sample.py / the README); flags given as well override it')
    p.add_argument('--weights', default=unset, choices=['ema', 'model'],
                   help='which weights of a training checkpoint')
    p.add_argument('--model', help='SiT-XL/2, ...: required for released state dicts (ours store it)')
    p.add_argument('--data-path', help="prepared dataset whose dataset.json gives the latent layout (fallback)")
    p.add_argument('--sit-convention', action='store_true', help='weights trained in the original SiT time direction')
    p.add_argument('--vae', help="the dataset's VAE from elsewhere (a folder, weights file or hub name) instead of "
                                 "the autoencoder dataset.json names")
    if own:
        p.add_argument('--num-samples', type=int, default=unset)
    p.add_argument('--batch-size', type=int, default=64, help='per process; part of the SDE noise seed')
    p.add_argument('--mode', default=unset, choices=['sde', 'ode'])
    p.add_argument('--num-steps', type=int, default=unset, help="default 250 (sde) / 50 (ode); with --mode sde, "
                   "SiT's --num-sampling-steps (the same grid)")
    p.add_argument('--heun', action=argparse.BooleanOptionalAction, default=unset,
                   help="Heun steps: REPA's ODE Heun with --mode ode, the original SiT repository's Heun SDE with "
                   "--mode sde (2N - 1 network evaluations for --num-steps N; CAR-Flow's '250 NFEs': N = 125, 249)")
    p.add_argument('--cfg-scale', type=float, default=unset, help='classifier-free guidance scale, >= 1 (1: none)')
    p.add_argument('--cfg-channels', type=int, default=unset, metavar='K', help="guide only the first K latent "
                   "channels, the others conditional (SiT's and DiT's forward_with_cfg: 3; --protocol sit); 0: all "
                   "(REPA)")
    p.add_argument('--guidance-low', type=float, default=unset, help='CFG only while low <= t <= high (t=1 noise)')
    p.add_argument('--guidance-high', type=float, default=unset)
    # default --cfg-scale, deliberately: REG's generate.py defaults its --cls-cfg-scale to 1.5 whatever
    # --cfg-scale is (its published runs set both, as --protocol reg does)
    p.add_argument('--cls-cfg-scale', type=float, default=unset, help="models with a class token (REG): the token's "
                   "guidance scale (default: --cfg-scale, where REG's generate.py defaults to 1.5; <= 0: its "
                   "conditional velocity only)")
    p.add_argument('--class-balanced', action=argparse.BooleanOptionalAction, default=unset,
                   help='exactly N/num_classes per class (shuffled)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--sample-dir', help='default: RUN/samples for RUN/checkpoints/X.pt, else samples/ beside --ckpt')
    if own:
        p.add_argument('--grid', type=int, default=0, metavar='N', help='write a preview grid of N samples per class')
        p.add_argument('--classes', help='comma-separated class ids for --grid (default: the first min(10, K))')
    p.add_argument('--log-every', type=int, default=10, help='progress line every N batches')
    p.add_argument('--round', action=argparse.BooleanOptionalAction, default=unset,
                   help='round pixels to nearest (default: truncate, as REPA)')
    p.add_argument('--bf16', action=argparse.BooleanOptionalAction, default=unset,
                   help='bf16 autocast for network and decoder (default: fp32)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (CUDA)')


def resolve_sampler_flags(args):
    """After parsing with add_sampler_flags: every protocol setting the command line did not give comes from
    --protocol, else from DEFAULTS; args.overrides lists the flags given on top of a protocol (they override it);
    then the values are checked, in one line each."""
    given = [k for k in _OFFICIAL if hasattr(args, k)]
    proto = PROTOCOLS.get(args.protocol, {})
    for k in _OFFICIAL:
        if k not in given:
            setattr(args, k, proto.get(k, DEFAULTS[k]))
    flag = lambda k: '--' + k.replace('_', '-')
    missing = [flag(k) for k in _OFFICIAL if getattr(args, k) == UNPUBLISHED]
    if missing:
        sit.fail(f"--protocol {args.protocol} needs {' and '.join(missing)}: the paper does not publish it "
                 f"(choose it on a 10K-sample sweep)")
    args.overrides = sorted(flag(k) for k in given if proto and proto[k] not in (UNPUBLISHED, getattr(args, k)))
    if args.num_steps is None:
        args.num_steps = 250 if args.mode == 'sde' else 50
    if args.num_samples < 1 or args.batch_size < 1 or args.seed < 0 or args.num_steps < 1:
        sit.fail('--num-samples, --batch-size and --num-steps must be positive and --seed non-negative')
    if args.cfg_scale < 1:  # as REPA's and SiT's scripts (an assert); REG's would silently not guide
        sit.fail(f'--cfg-scale {args.cfg_scale}: scales below 1 are not guidance here (the official samplers guide '
                 f'only above 1, and REPA\'s and SiT\'s refuse them); use a scale >= 1 (1: no guidance)')
    if args.cfg_channels < 0:
        sit.fail(f'--cfg-channels {args.cfg_channels}: give a number of leading latent channels, or 0 for all')
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampler_flags(p)
    return resolve_sampler_flags(p.parse_args(argv))


def num_evaluations(num_steps, heun=False):
    """Network evaluations per sample of sit.sample, for the ODE and the SDE alike: num_steps, or 2 * num_steps - 1
    with Heun steps (REPA's ODE Heun skips the last correction; the SDE's last step is a single mean step). A
    guided evaluation runs both CFG halves as one doubled batch and counts once, as the papers count NFEs."""
    return 2 * num_steps - 1 if heun else num_steps


def folder_name(args, ckpt_stem, tag, joint):
    """The output folder's name (the .npz is FOLDER.npz): the checkpoint, its weights, the protocol and every
    setting that changes the samples, so runs made under different settings never mix. joint: the model carries a
    class token (REG), whose guidance scale then matters."""
    mode = ('sdeheun' if args.mode == 'sde' else 'heun') if args.heun else args.mode
    return (f"{ckpt_stem}-{tag}-" + (f'{args.protocol}-' if args.protocol else '') +
            f"{mode}{args.num_steps}-cfg{args.cfg_scale}-g{args.guidance_low}-{args.guidance_high}-seed{args.seed}" +
            (f'-cfgch{args.cfg_channels}' if args.cfg_channels else '') +
            (f'-balanced{args.num_samples}' if args.class_balanced else '') +
            ('-sitconv' if args.sit_convention else '') +
            (f'-clscfg{args.cls_cfg_scale}' if joint and args.cls_cfg_scale is not None else '') +
            ('-round' if args.round else '') + ('-bf16' if args.bf16 else ''))


def describe_sampler(args):
    """One line for the log: the sampler, its network evaluations per sample, the guidance, the protocol."""
    kind = {('sde', False): 'SDE, Euler-Maruyama', ('sde', True): "SDE, Heun (the original SiT repository's)",
            ('ode', False): 'ODE, Euler', ('ode', True): 'ODE, Heun'}[args.mode, args.heun]
    cfg = ('no guidance' if args.cfg_scale <= 1 else
           f'CFG {args.cfg_scale} on ' + (f'the first {args.cfg_channels} channels' if args.cfg_channels else
                                          'all channels') + f' for {args.guidance_low} <= t <= {args.guidance_high}')
    proto = (f'; protocol {args.protocol}' + (f" (overridden: {', '.join(args.overrides)})" if args.overrides else '')
             if args.protocol else '')
    return (f'sampler: {kind}, {args.num_steps} steps = {num_evaluations(args.num_steps, args.heun)} network '
            f'evaluations per sample; {cfg}{proto}')


# -----------------------------------------------------------------------------
# Model loading: our training checkpoints, or released state dicts


class Loaded(NamedTuple):
    """What load_model returns."""
    model: torch.nn.Module  # on CPU, eval mode, no grad; the sampling network only (no projector, no teacher)
    meta: dict              # the dataset's layout: latent shape, classes, decoder, normalisation (dataset.json)
    weights: str            # 'ema', 'model', or 'raw' (a bare released state dict)
    what: str               # a description for logs: method, model, weights


def flip_time(model):
    """Wrap a model trained in the original SiT convention (t = 0 noise, v = x - eps) to run in ours."""
    class Flipped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.num_classes = model, model.num_classes

        def forward(self, x, t, y, **kw):
            v, aux = self.inner(x, 1 - t, y, **kw)
            return -v, aux
    return Flipped()


def load_model(ckpt, *, weights='ema', model=None, data_path=None, sit_convention=False):
    """A checkpoint's sampling model, for every method: ours (train_*.py, or a copy of one: the model comes from the
    checkpoint's config and model_args) or a released state dict (REPA, HASTE, REG, SiT: model names it, data_path
    gives a layout other than ImageNet's). Projectors train only, so they are left out: a method's own projector
    needs nothing here. sit_convention wraps weights trained with t = 0 as noise (SiT's). -> Loaded."""
    name = model
    ckpt_path, ckpt = ckpt, sit.load_checkpoint(ckpt)
    if isinstance(ckpt, dict) and 'config' in ckpt and 'model_args' in ckpt:  # ours (train_*.py)
        cfg, name, model_args = ckpt['config'], ckpt['config']['model'], dict(ckpt['model_args'])
        if model and model != name:
            sit.fail(f"'{ckpt_path}' holds a {name} model, not {model}; drop --model")
        if not isinstance(ckpt.get(weights), dict):
            sit.fail(f"'{ckpt_path}' has no '{weights}' weights (keys: {sorted(ckpt)})")
        sd, tag = ckpt[weights], weights
        for k in ('z_dims', 'projector_dim', 'encoder_depth'):  # the projectors' arguments: not built for sampling
            model_args.pop(k, None)
        # the training data's dataset.json gives the latent layout and decoder; --data-path if it moved
        data = next((d for d in (cfg.get('data_path'), data_path)
                     if d and os.path.isfile(os.path.join(d, 'dataset.json'))), None)
        if data is None:
            sit.fail(f"the checkpoint's dataset '{cfg.get('data_path')}' has no dataset.json here and --data-path "
                     f"is {'not given' if not data_path else repr(data_path) + ' (no dataset.json)'}; "
                     f"pass --data-path to a prepared dataset with the same latents")
        meta, what = sit.read_dataset_meta(data), f"{cfg.get('method', '?')} {name} ({weights} weights)"
    else:  # a released state dict: REPA / HASTE (raw or {'ema': ...}) or the original SiT's SiT-XL-2-256.pt
        if isinstance(ckpt, dict) and isinstance(ckpt.get(weights), dict):
            sd, tag = ckpt[weights], weights
        elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            sd, tag = ckpt, 'raw'
        else:
            keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            sit.fail(f"'{ckpt_path}' is neither a checkpoint of this repo nor a state dict (found {keys})")
        if not name:
            sit.fail(f"'{ckpt_path}' is a bare state dict (no config inside); pass --model, e.g. --model SiT-XL/2")
        meta = sit.read_dataset_meta(data_path) if data_path else dict(IMAGENET)
        token = sd.get('cls_projectors2.weight')  # REG's class-token path: (D, cls_dim)
        p, c, k = int(name.split('/')[1]), meta['latent_channels'], meta['num_classes']
        w, table = sd.get('final_layer.linear.weight'), sd.get('y_embedder.embedding_table.weight')
        model_args = dict(input_size=meta['latent_size'], in_channels=c, num_classes=k,
                          # SiT / DiT predict (v, sigma): 2C output channels of which the first C are v
                          learn_sigma=w is not None and w.shape[0] == 2 * p * p * c,
                          # a table without the null row means no label dropout: CFG is impossible
                          class_dropout_prob=0.0 if table is not None and table.shape[0] == k else 0.1,
                          cls_dim=0 if token is None else token.shape[1])
        what = f'{name} state dict ({tag})'
    net = sit.build_model(name, **model_args)
    sd = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in sd.items()}  # DDP / compile wrappers
    sd = {k: v for k, v in sd.items() if not k.startswith('projectors.')}
    sit.load_weights(net, sd, f"'{ckpt_path}' does not fit {what} built for {model_args} (check --model, "
                              f"--data-path, --ckpt)")
    c, s = meta['latent_channels'], meta['latent_size']  # the latent grid the dataset stores is the model's
    if (c, s) != (net.in_channels, net.grid * net.patch_size) or meta['num_classes'] != net.num_classes:
        sit.fail(f"dataset latents are {c}x{s}x{s} with {meta['num_classes']} classes but the model expects "
                 f"{net.in_channels}x{net.grid * net.patch_size}x{net.grid * net.patch_size} with "
                 f"{net.num_classes} classes; pass a matching --model / --data-path")
    if sit_convention:  # t -> 1 - t, v -> -v around the network, so our samplers apply unchanged
        net = flip_time(net)
    return Loaded(net.eval().requires_grad_(False), meta, tag, what)


# -----------------------------------------------------------------------------
# Seeds, noise and labels


def draw_inputs(indices, seed, shapes, num_classes):
    """Initial noise [(n, *shape) for each of shapes] and a uniform label per GLOBAL sample index, each from its own
    generator keyed by (seed, index): a sample does not depend on the world size, the batch size or on what was
    generated before (resume). numpy's SeedSequence mixes the key into PCG64's 128-bit state; torch's CPU generator
    would keep only the low 32 bits of a 64-bit seed, so (seed << 32) | index would repeat the noise of seed 0 for
    every seed.
    shapes is sit.noise_shapes(model, ...): the latents' noise is drawn first, so a model that carries more state
    (REG's class token, drawn after) leaves the latent noise of every index as a plain model has it."""
    noise, labels = [[] for _ in shapes], []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        labels.append(int(rng.integers(num_classes)))  # drawn first, also when --class-balanced, so noise is shared
        for out, shape in zip(noise, shapes):
            out.append(rng.standard_normal(shape, dtype=np.float32))
    return [torch.from_numpy(np.stack(n)) for n in noise], torch.tensor(labels)  # [(n, C, h, w), ...], (n,)


def balanced_labels(n, num_classes, seed):
    """--class-balanced: label of global index i is i % K, shuffled by a permutation fixed by (seed, n)."""
    return torch.from_numpy(np.arange(n) % num_classes)[np.random.default_rng([seed, n]).permutation(n)]  # (n,)


def seed_batch(seed, start):
    """The SDE's own noise is drawn inside sit's SDE samplers from the global RNG, batch-wise, so it is
    seeded per batch from (seed, index of the batch's first sample): batches are fixed ranges of global indices
    (start = k * batch_size), hence the result is independent of the world size and of resume."""
    torch.manual_seed(int(np.random.SeedSequence([seed, start, 1]).generate_state(1)[0]))


def generate(net, noise, y, meta, vae, args):
    """Noise (a list, see draw_inputs) and labels -> uint8 images (n, 3, H, W) on CPU: sampler, then decoder."""
    noise = [n.to(y.device) for n in noise]
    with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        x = sit.sample(net, noise, y, mode=args.mode, num_steps=args.num_steps, heun=args.heun,
                       cfg_scale=args.cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                       cls_cfg_scale=args.cls_cfg_scale, cfg_channels=args.cfg_channels)  # (n, C, h, w)
        return sit.decode_latents(x, meta, vae, round=args.round)


def save_png(img, path):
    """uint8 (3, H, W) -> PNG via tmp + rename: a file that exists is complete (what resume relies on)."""
    from PIL import Image
    tmp = f'{path}.{os.getpid()}.tmp'
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format='PNG')
    os.replace(tmp, path)


# -----------------------------------------------------------------------------

def sampling_protocol(args):
    """Every setting that changes the samples (besides the checkpoint and their number): what an evaluation
    record stores and keys on, so records of different protocols never mix. --batch-size is in: it seeds the SDE
    noise (seed_batch). --compile is not (same computation; see the padding note in sample_for_evaluation)."""
    return dict(mode=args.mode, heun=args.heun, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                guidance_low=args.guidance_low, guidance_high=args.guidance_high, cls_cfg_scale=args.cls_cfg_scale,
                cfg_channels=args.cfg_channels, class_balanced=args.class_balanced, seed=args.seed,
                batch_size=args.batch_size, round=args.round, bf16=args.bf16, weights=args.weights,
                sit_convention=args.sit_convention, vae=args.vae, protocol=args.protocol,
                overrides=args.overrides)


SHARED = '--ckpt and the sample folder must be on a file system all nodes share'  # every rank reads / writes them


def newest_checkpoint(path):
    """--ckpt RUN_FOLDER means its newest checkpoint (rank 0 decides for the whole job: see load_sampler)."""
    if not os.path.isdir(path):
        return path
    return sit.latest_checkpoint(path) or sit.fail(f"no checkpoints in '{path}/checkpoints'")


class Sampler(NamedTuple):
    """What load_sampler returns: everything sampling a checkpoint needs, on the device."""
    net: torch.nn.Module    # the model, compiled under --compile
    model: torch.nn.Module  # the model itself
    meta: dict              # the dataset's layout
    vae: object             # its decoder (None for the toy set's identity)
    shapes: list            # sit.noise_shapes: the latents, then any state the model carries (REG's class token)
    num_classes: int
    sample_dir: str         # where the output folder goes
    name: str               # the output folder's name (folder_name)
    log: object             # print on rank 0, silent elsewhere


def load_sampler(args, rank, world, device):
    """The checkpoint's model (compiled under --compile), its decoder and the output folder's name, on device.
    Every rank of the job calls it: rank 0 resolves a run folder to its newest checkpoint for all of them, and
    every node must see the same file (else one line per node, not some ranks stopping while others wait)."""
    args.ckpt = sit.decide_for_all(lambda: newest_checkpoint(args.ckpt))
    sit.same_view({'--ckpt': f"'{args.ckpt}', {sit.file_view(args.ckpt)}"}, SHARED)
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, meta, tag, what = load_model(args.ckpt, weights=args.weights, model=args.model, data_path=args.data_path,
                                        sit_convention=args.sit_convention)
    table = getattr(model, 'inner', model).y_embedder.embedding_table  # inside flip_time's wrapper, if any
    if args.cfg_scale != 1.0 and table.num_embeddings == model.num_classes:  # no null row: never dropped a label
        sit.fail(f'{what} was trained without label dropout (no null class): CFG is impossible, use --cfg-scale 1')
    model.to(device)
    # static shapes: one graph per batch shape (B, 2B inside the CFG interval, and a --grid's), never a dynamic one
    net = torch.compile(model, dynamic=False) if args.compile else model
    vae = sit.load_autoencoder(meta, device, path=args.vae)  # None for the toy set's identity "autoencoder"
    shape = (meta['latent_channels'], meta['latent_size'], meta['latent_size'])
    shapes = sit.noise_shapes(model, shape)  # the latents, then any state the model carries (REG's class token)
    K = meta['num_classes']

    ckpt_dir = os.path.dirname(os.path.abspath(args.ckpt))
    run_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == 'checkpoints' else ckpt_dir
    sample_dir = args.sample_dir or os.path.join(run_dir, 'samples')
    name = folder_name(args, os.path.splitext(os.path.basename(args.ckpt))[0], tag, len(shapes) > 1)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"{what}: {sum(p.numel() for p in model.parameters()):,} parameters; latents {shape}, {K} classes, "
        f"{world} process(es) on {device.type}")
    log(describe_sampler(args))
    return Sampler(net, model, meta, vae, shapes, K, sample_dir, name, log)


def write_grid(args, rank, world, device):
    """--grid N: N samples per class, one column per class, written by rank 0 -> the PNG's path (rank 0)."""
    s = load_sampler(args, rank, world, device)
    K = s.num_classes
    ids = args.classes.split(',') if args.classes else [str(c) for c in range(min(K, 10))]
    classes = [int(c) for c in ids if c.strip().isdigit()]
    if len(classes) != len(ids) or not all(c < K for c in classes):
        sit.fail(f'--classes must be ids in 0..{K - 1}, got {args.classes}')
    if rank != 0:
        return None
    n = args.grid * len(classes)
    z, _ = draw_inputs(range(n), args.seed, s.shapes, K)                          # [(n, C, h, w), ...]
    y = torch.tensor(classes).repeat(args.grid)                                 # image i -> column i % len(classes)
    seed_batch(args.seed, 0)
    images = generate(s.net, z, y.to(device), s.meta, s.vae, args)
    os.makedirs(s.sample_dir, exist_ok=True)
    path = os.path.join(s.sample_dir, f"{s.name}-grid{args.grid}-classes{'_'.join(map(str, classes))}.png")
    sit.save_grid(images, path, len(classes))
    names = s.meta.get('class_names') or [str(c) for c in range(K)]
    print(f'grid -> {path}\ncolumns: ' + ', '.join(f'{c} ({names[c]})' for c in classes))
    return path


def sample_for_evaluation(args, rank, world, device, stop=None, write_npz=True):
    """args.num_samples samples of args.ckpt as PNGs in SAMPLE_DIR/NAME/ (resuming from those on disk) and, with
    write_npz, all of them in SAMPLE_DIR/NAME.npz. The process group (if any) is the caller's; every rank calls
    this. stop: the caller's sit.StopFlag (one is made if None). -> (folder, complete): complete is False when a
    stop signal ended the loop (the finished PNGs are kept) and agreed by all ranks."""
    net, model, meta, vae, shapes, K, sample_dir, name, log = load_sampler(args, rank, world, device)  # a Sampler

    # -------------------------------------------------------------------------
    # Evaluation run: batches are fixed ranges of global indices [s, s + B), handed out round-robin
    folder = os.path.join(sample_dir, name)
    N, B = args.num_samples, args.batch_size
    png = lambda i: os.path.join(folder, f'{i:06d}.png')
    balanced = balanced_labels(N, K, args.seed) if args.class_balanced else None
    pending = [None]
    if rank == 0:  # one rank lists, all follow: ranks looking at the folder at different times could disagree
        os.makedirs(folder, exist_ok=True)
        pending = [[s for s in range(0, N, B) if not all(os.path.exists(png(i)) for i in range(s, min(s + B, N)))]]
    if world > 1:
        dist.broadcast_object_list(pending, src=0)
    pending = pending[0]
    sit.same_view({f"'{folder}'": 'a folder' if os.path.isdir(folder) else None}, SHARED)  # rank 0 just made it
    log(f"{folder}: {len(pending)} of {-(-N // B)} batches of <= {B} samples to generate")
    mine = pending[rank::world]
    stop = stop or sit.StopFlag()  # SIGTERM / SIGUSR1 / Ctrl-C: finish the batch at hand (its PNGs are kept)
    # PNG encoding (zlib, which releases the GIL) runs in threads while the next batch samples; at most two
    # batches of images wait, and all are on disk before the .npz is assembled or the function returns
    writer, writes = ThreadPoolExecutor(4), []
    t0 = time.time()
    for b, s in enumerate(mine):
        idx = range(s, min(s + B, N))                                           # the last batch is trimmed
        # under --compile the short last batch is padded to B with copies of its first sample (sliced off below),
        # so the model sees only the shapes B and 2B (CFG): two graphs, no recompiles. The padding changes the
        # SDE noise draws of that one batch (randn of B rows), as compiled kernels' rounding changes pixels anyway
        pad = B - len(idx) if args.compile else 0
        z, y = draw_inputs(idx, args.seed, shapes, K)                           # [(n, C, h, w), ...], (n,)
        if balanced is not None:
            y = balanced[s:idx.stop]
        if pad:
            z, y = [torch.cat([n, n[:1].expand(pad, *n.shape[1:])]) for n in z], torch.cat([y, y[:1].expand(pad)])
        seed_batch(args.seed, s)
        images = generate(net, z, y.to(device), meta, vae, args)[:len(idx)]    # uint8 (n, 3, H, W) on CPU
        while len(writes) > 2 * B:  # back-pressure: never more than two batches of images in memory
            writes.pop(0).result()
        for i, img in zip(idx, images):
            if not os.path.exists(png(i)):  # a partly done batch is regenerated whole; keep what is on disk
                writes.append(writer.submit(save_png, img, png(i)))
        if (b + 1) % args.log_every == 0 or b + 1 == len(mine):
            dt = time.time() - t0
            log(f'batch {b + 1}/{len(mine)} (rank 0) | {(b + 1) * B * world / dt:.1f} img/s (all ranks) | '
                f'eta {sit.format_time(dt / (b + 1) * (len(mine) - b - 1))}')
        if stop.requested:
            break
    for w in writes:  # raises a failed write's error here
        w.result()
    writer.shutdown()

    # -------------------------------------------------------------------------
    # All PNGs -> one .npz beside the folder (ADM evaluator format: arr_0, uint8 (N, H, W, 3))
    if stop():  # every rank gets here: the agreed flag doubles as the barrier
        log('stopped by signal; the finished PNGs are kept: rerun the same command to continue')
        return folder, False
    if rank == 0:
        from PIL import Image
        missing = [i for i in range(N) if not os.path.exists(png(i))]
        if missing:
            sit.fail(f'{len(missing)} samples are missing (e.g. {png(missing[0])}); rerun the same command to finish')
        if write_npz:
            w, h = Image.open(png(0)).size
            arr = np.empty((N, h, w, 3), dtype=np.uint8)                        # filled in place: no second copy
            for i in range(N):
                arr[i] = np.asarray(Image.open(png(i)).convert('RGB'))
            npz = folder + '.npz'
            with open(npz + '.tmp', 'wb') as f:
                np.savez(f, arr_0=arr)
            os.replace(npz + '.tmp', npz)
            log(f'{npz}: arr_0 {arr.dtype} {arr.shape}')
    return folder, True


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = sit.setup_distributed()
    if args.grid:
        out = write_grid(args, rank, world, device)
    else:
        out, _ = sample_for_evaluation(args, rank, world, device)
    if world > 1:  # no barrier: the other ranks need not wait (and time out) while rank 0 writes the .npz
        dist.destroy_process_group()
    return out


if __name__ == '__main__':
    main()
