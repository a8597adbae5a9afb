# >>> method: what this script trains
"""
train_repa.py: REPA (Yu et al., arXiv 2410.06940) = velocity matching + aligning SiT's hidden tokens after block
`encoder_depth` (through a small MLP projector) with a frozen DINOv2 teacher's patch tokens of the clean image.

  torchrun --nproc_per_node=8 train_repa.py --data-path data/imagenet256         # the paper's SiT-XL/2 run
  torchrun --nproc_per_node=2 train_repa.py --preset toy                         # CPU mechanics check (random teacher)
  ... --enc-ckpt PATH                                                            # local DINOv2 weights (offline)
  ... --resume runs/repa                                                         # continue exactly

Paper numbers (SiT-XL/2, ImageNet 256, 50K samples, SDE 250 steps): FID 7.9 at 400K steps without guidance
(vanilla 17.2); 5.9 at 4M; 1.42 with CFG 1.8 on t <= 0.7.
"""
# <<< method
# Everything that differs between methods sits between `# >>> method` and `# <<< method`; the rest of this file is
# the same in train_repa.py, train_haste.py, train_reg.py and train_carflow.py (compare them with diff).
import copy
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import sit

# -----------------------------------------------------------------------------
# Config: the paper's settings (SiT-XL/2, ImageNet 256). Every key is a flag: --global-batch 128, ...

config = dict(
    data_path='data/imagenet256',  # a folder made by prepare.py
    out='runs/{method}',           # run folder: log, metrics, config, checkpoints, preview grids
    resume='',                     # a checkpoint file, or a run folder (its newest checkpoint)
    model='SiT-XL/2',              # SiT-{S,B,L,XL}/{2,4,8}, or SiT-T/* (tiny, ours: toy data and tests)
    global_batch=256,              # split evenly over ranks
    lr=1e-4,                       # AdamW, constant, betas (0.9, 0.999), eps 1e-8, no weight decay
    grad_clip=1.0,                 # max global grad norm
    ema_decay=0.9999,              # every step, from a copy of the initial model
    label_dropout=0.1,             # classifier-free guidance: p(label -> null class)
    max_steps=400_000,             # optimizer steps
    log_every=100,                 # steps between log lines (loss, grad norm, img/s, ETA)
    ckpt_every=50_000,             # steps between checkpoints (also at the end and on SIGTERM/SIGUSR1)
    sample_every=10_000,           # preview grid from the EMA model (fixed noise and labels), and at the end; 0: never
    preview_cfg=4.0,               # guidance scale of the preview grid only
    vae='',                        # decoder for previews: '' = the dataset's (hub download), or a local file/folder
    seed=0,                        # init and data order; rank r draws noise from seed * world + r
    num_workers=4,                 # data loader processes per rank
    compile=False,                 # torch.compile the model (CUDA)
    wandb=False,                   # also log to Weights & Biases (pip install wandb)
)
presets = {  # --preset toy: the toy set on a laptop CPU in minutes
    'toy': dict(data_path='data/toy', out='runs/toy-{method}', model='SiT-T/2', global_batch=64, lr=2e-3,
                ema_decay=0.99, max_steps=1000, log_every=50, ckpt_every=500, sample_every=500, num_workers=0),
}
# keys that may change when resuming (everything else must match the checkpoint, or resume is not exact)
RUN_KEYS = {'data_path', 'resume', 'max_steps', 'log_every', 'ckpt_every', 'sample_every', 'num_workers',
            'compile', 'wandb', 'vae'}
# >>> method: config
config.update(
    method='repa',
    enc='dinov2-b',                # teacher: DINOv2 ViT-B/14 as the paper; 'dinov2-s', '-l', '-g' by name
    enc_ckpt='',                   # teacher weights: '' = download from the hub, a local file, or 'random'
    encoder_depth=8,               # align the tokens after this block (1-based): 8 for SiT-L/XL, 4 for SiT-B
    projector_dim=2048,            # projector MLP D -> 2048 -> 2048 -> teacher width, SiLU between
    proj_coeff=0.5,                # L = L_v + proj_coeff * L_proj
)
# toy: ViT-S/14 is the smallest DINOv2 and still costs several SiT-T steps per batch on a CPU; random weights,
# since the toy set is a mechanics check (a random teacher cannot speed anything up); a projector sized to SiT-T
presets['toy'].update(enc='dinov2-s', enc_ckpt='random', encoder_depth=2, projector_dim=256)
RUN_KEYS.add('enc_ckpt')
# <<< method

# -----------------------------------------------------------------------------
# The loss

# >>> method: loss
def compute_loss(model, x, y, target, proj_coeff):
    """Velocity matching + REPA alignment. x: clean latents (N, C, H, W); y: labels, already dropped;
    target: the teacher's final-norm patch tokens of the clean images (N, T, D_teacher)."""
    t = torch.rand(x.shape[0], device=x.device)                              # (N,) t ~ U(0, 1)
    eps = torch.randn_like(x)                                                # (N, C, H, W)
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - t_) * x + t_ * eps                                            # t = 0 data, t = 1 noise
    v_pred, aux = model(x_t, t, y, return_zs=True)                           # zs: projected tokens after the tap
    loss_v = ((v_pred.float() - (eps - x)) ** 2).mean(dim=(1, 2, 3))         # (N,) target v = eps - x
    cos = torch.cosine_similarity(aux['zs'][0].float(), target.float(), dim=-1)  # (N, T)
    loss_proj = -cos.mean(dim=1)                                             # (N,) mean over tokens
    return (loss_v + proj_coeff * loss_proj).mean(), {'loss_v': loss_v.mean(), 'proj': loss_proj.mean()}
# <<< method


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = sit.parse_config(config, presets, argv, __doc__, __file__)
    rank, world, device = sit.setup_distributed()
    cuda = device.type == 'cuda'
    if cuda:  # TF32 matmuls; bf16 autocast below; SDPA picks flash / memory-efficient kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg['global_batch'] % world:
        sit.fail(f"global batch {cfg['global_batch']} does not split over {world} ranks; pass --global-batch")
    local_batch = cfg['global_batch'] // world

    # resume: the checkpoint's config wins for everything that changes the math
    ckpt = None
    if cfg['resume']:
        path = sit.latest_checkpoint(cfg['resume']) if os.path.isdir(cfg['resume']) else cfg['resume']
        if path is None:
            sit.fail(f"no checkpoints in '{cfg['resume']}/checkpoints'; pass a checkpoint file or drop --resume")
        ckpt = sit.load_checkpoint(path)
        if not isinstance(ckpt, dict) or ckpt.get('config', {}).get('method') != cfg['method']:
            got = ckpt.get('config', {}).get('method') if isinstance(ckpt, dict) else None
            sit.fail(f"'{path}' is a {got or 'non-training'} checkpoint, not {cfg['method']}; resume it with "
                     f"train_{got}.py" if got else f"'{path}' is not a training checkpoint of this repo")
        diff = {k: (ckpt['config'].get(k), v) for k, v in cfg.items()
                if k not in RUN_KEYS and ckpt['config'].get(k) != v}
        if diff:
            sit.fail('resume would change ' + ', '.join(f'{k} ({a} -> {b})' for k, (a, b) in diff.items()) +
                     '; pass the flags of the original run')
    run_dir = cfg['out'].format(**cfg)
    if rank == 0:
        os.makedirs(os.path.join(run_dir, 'checkpoints'), exist_ok=True)
        with open(os.path.join(run_dir, 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1)
        shutil.copy(os.path.abspath(__file__), run_dir)  # the exact code that produced the run
    if world > 1:
        dist.barrier()
    log = sit.Logger(run_dir, rank, cfg['wandb'], cfg)
    log(f"{cfg['method']}: {world} rank(s) on {device.type}, global batch {cfg['global_batch']}, run folder {run_dir}")

    # data
    # >>> method: data
    dataset = sit.PreparedDataset(cfg['data_path'], images=True)  # the teacher sees the images
    # <<< method
    meta = dataset.meta
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg['seed'],
                                 drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        sit.fail(f"{len(dataset)} images give no full batch of {local_batch} per rank; lower --global-batch")

    # model, EMA, optimizer (same initial weights on every rank; DDP would broadcast rank 0's anyway)
    torch.manual_seed(cfg['seed'])
    model_args = dict(input_size=meta['latent_size'], in_channels=meta['latent_channels'],
                      num_classes=meta['num_classes'], class_dropout_prob=cfg['label_dropout'])
    # >>> method: model
    # the teacher sees 14 px per SiT token (a 16x16 token grid -> 224 px), so its patch tokens line up one-to-one
    grid = meta['latent_size'] // int(cfg['model'].split('/')[1])
    teacher = sit.load_teacher(cfg['enc'], cfg['enc_ckpt'] or None, grid=grid, device=device)
    model_args.update(z_dims=[teacher.dim], projector_dim=cfg['projector_dim'], encoder_depth=cfg['encoder_depth'])
    # <<< method
    if ckpt is not None and ckpt['model_args'] != model_args:
        sit.fail(f"the checkpoint's model was built for {ckpt['model_args']} but the data at "
                 f"'{cfg['data_path']}' gives {model_args}; pass the original --data-path")
    model = sit.build_model(cfg['model'], **model_args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg['lr'], betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0, fused=cuda)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        opt.load_state_dict(ckpt['opt'])
        step = ckpt['step']
        if len(ckpt['rng']) == world:
            sit.set_rng_state(ckpt['rng'][rank], device)
        else:  # another world size cannot replay the same noise; the data order still continues
            log(f"warning: checkpoint has {len(ckpt['rng'])} rank RNG states, this run {world}: resume is not bitwise")
            torch.manual_seed(cfg['seed'] * world + rank + step)
        log(f'resumed from {path} at step {step}')
        del ckpt
    else:
        torch.manual_seed(cfg['seed'] * world + rank)  # each rank draws its own t and noise
    log(f"{cfg['model']}: {sum(p.numel() for p in model.parameters()):,} parameters, data {meta['count']:,} "
        f"images of {meta['latent_channels']}x{meta['latent_size']}x{meta['latent_size']} latents")
    net = torch.compile(model) if cfg['compile'] else model
    if world > 1:
        net = DDP(net, device_ids=[device.index] if cuda else None)

    def batches(step):
        """The order is a function of (seed, epoch) only, so a resumed run continues mid-epoch exactly."""
        epoch, skip = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            indices = list(sampler)[skip * local_batch:]
            # its own generator: a loader draws a worker seed when it starts, which must not shift the global RNG
            yield from DataLoader(dataset, batch_size=local_batch, sampler=indices, num_workers=cfg['num_workers'],
                                  pin_memory=cuda, drop_last=True, generator=torch.Generator().manual_seed(epoch))
            epoch, skip = epoch + 1, 0

    # preview grid: fixed noise and labels (classes 0.. in columns), sampled from the EMA model
    n_cols = min(meta['num_classes'], 10)
    g = torch.Generator().manual_seed(cfg['seed'])
    preview_noise = torch.randn(4 * n_cols, model.in_channels, meta['latent_size'], meta['latent_size'], generator=g)
    preview_labels = torch.arange(4 * n_cols) % n_cols
    vae = sit.load_autoencoder(meta, device, cfg['vae'] or None) if rank == 0 and cfg['sample_every'] else None

    def preview(step):
        with torch.autocast('cuda', torch.bfloat16, enabled=cuda):
            z = sit.euler_sampler(ema, preview_noise.to(device), preview_labels.to(device), num_steps=50,
                                  cfg_scale=cfg['preview_cfg'])
        path = os.path.join(run_dir, f'preview_{step:07d}.png')
        sit.save_grid(sit.decode_latents(z, meta, vae), path, n_cols)
        log(f'preview grid -> {path}')

    def checkpoint(step):
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, sit.rng_state(device))
        else:
            rngs = [sit.rng_state(device)]
        if rank == 0:
            path = os.path.join(run_dir, 'checkpoints', f'{step:07d}.pt')
            sit.save_checkpoint(path, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                           step=step, config=cfg, model_args=model_args, rng=rngs))
            log(f'checkpoint -> {path}')

    # -------------------------------------------------------------------------
    # training loop
    stop = sit.StopFlag()  # installed before the loaders fork, so their workers ignore the signal too
    data = batches(step)
    net.train()
    sums, n_sum, t_log, step_log = {}, 0, time.time(), step
    while step < cfg['max_steps']:
        # >>> method: batch
        images, moments, y = (b.to(device, non_blocking=True) for b in next(data))
        target = teacher(images)['patch']                                    # (N, T, 768), frozen, no grad
        # <<< method
        x = sit.sample_latents(moments, meta['latent_scale'])                # (N, C, h, w)
        y = sit.drop_labels(y, cfg['label_dropout'], meta['num_classes'])     # once, here (REPA's --legacy: twice)
        with torch.autocast('cuda', torch.bfloat16, enabled=cuda):
            # >>> method: loss call
            loss, terms = compute_loss(net, x, y, target, cfg['proj_coeff'])
            # <<< method
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        opt.step()
        sit.update_ema(ema, model, cfg['ema_decay'])
        step += 1

        # accumulate on device; reduce over ranks only when logging
        for k, v in {'loss': loss, 'grad_norm': grad_norm, **terms}.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        n_sum += 1
        if step % cfg['log_every'] == 0 or step == cfg['max_steps']:
            keys = list(sums)
            means = sit.all_mean(torch.stack([sums[k] for k in keys]) / n_sum).tolist()
            dt = time.time() - t_log
            rate = (step - step_log) * cfg['global_batch'] / dt
            eta = (cfg['max_steps'] - step) * dt / (step - step_log)
            values = dict(zip(keys, means), img_per_s=rate)
            log(f"step {step}/{cfg['max_steps']} | " + ' | '.join(f'{k} {v:.4f}' for k, v in zip(keys, means)) +
                f' | {rate:.1f} img/s | eta {sit.format_time(eta)}')
            log.metrics(step, values)
            sums, n_sum, t_log, step_log = {}, 0, time.time(), step
        if rank == 0 and cfg['sample_every'] and (step % cfg['sample_every'] == 0 or step == cfg['max_steps']):
            preview(step)
        stopping = stop()
        if step % cfg['ckpt_every'] == 0 or step == cfg['max_steps'] or stopping:
            checkpoint(step)
        if stopping:
            log(f'stopped by signal at step {step}; continue with --resume {run_dir}')
            break
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model


if __name__ == '__main__':
    main()
