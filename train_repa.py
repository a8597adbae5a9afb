# >>> method: what this script trains
"""
train_repa.py: REPA (Yu et al. 2024, arXiv 2410.06940) = SiT + aligning its hidden tokens with a frozen DINOv2's.

  L_v = mean over (C, H, W) of (model(x_t, t, y) - (eps - x))^2,  x_t = (1 - t) x + t eps,  t ~ U(0, 1), 0 = data
  L = L_v + proj_coeff * L_proj,  L_proj = mean over tokens of -cos(projector(h), the teacher's patch tokens)

Defaults (REPA's recipe, shared by every script; SiT's own code does not clip and flips images: docs/reproducing.md):
SiT-XL/2, global batch 256, AdamW lr 1e-4 constant, grad clip 1.0, EMA 0.9999, 400K steps, label dropout 0.1 (for
CFG); latents drawn each step from the VAE moments prepare.py stored. --help: every flag.
REPA's: h = SiT's tokens after block encoder_depth 8 (4 for SiT-B), projector D -> 2048 -> 2048 -> 768, proj_coeff
0.5; teacher DINOv2-B/14 (timm; --enc-ckpt PATH offline), frozen, on the clean image at 14 px per SiT token.
Paper (ImageNet 256, FID-50K, SDE 250 steps): SiT-XL/2 7.9 at 400K steps without CFG (vanilla 17.2; --protocol
repa-nocfg), 5.9 at 4M, 1.42 with CFG 1.8 on t <= 0.7 (--protocol repa); SiT-B/2 24.4, SiT-L/2 9.7 at 400K.

  torchrun --nproc_per_node=8 train_repa.py --data-path data/imagenet256         # the paper's SiT-XL/2 run
  torchrun --nproc_per_node=2 train_repa.py --preset toy                         # CPU, the trained toy teacher
  ... --resume RUN_FOLDER                            # continue exactly; python instead of torchrun: one process
"""
# <<< method
# Everything that differs between methods sits between `# >>> method` and `# <<< method`; the rest of this file is
# the same in train_repa.py, train_haste.py, train_reg.py and train_carflow.py (compare them with diff).
import copy
import os

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
    model='SiT-XL/2',              # SiT-{S,B,L,XL}/{1,2,4,8}, or SiT-T/* (tiny, ours: toy data and tests)
    global_batch=256,              # per optimizer step, split evenly over ranks and accumulation steps
    grad_accum=1,                  # micro-batches per optimizer step (same update, less memory: 256 on 1-4 GPUs)
    lr=1e-4,                       # AdamW, constant, betas (0.9, 0.999), eps 1e-8, no weight decay
    grad_clip=1.0,                 # max global grad norm
    ema_decay=0.9999,              # every step, from a copy of the initial model
    label_dropout=0.1,             # classifier-free guidance: p(label -> null class)
    max_steps=400_000,             # optimizer steps
    log_every=100,                 # steps between log lines (loss, grad norm, img/s, ETA)
    ckpt_every=50_000,             # steps between checkpoints (also at the end and on SIGTERM/SIGUSR1/Ctrl-C)
    keep_ckpts=0,                  # keep only the newest K checkpoints; 0 keeps all (papers evaluate several)
    sample_every=10_000,           # preview grid from the EMA model (fixed noise and labels), and at the end; 0: never
    preview_cfg=4.0,               # guidance scale of the preview grid only
    vae='',                        # decoder for previews: '' = the dataset's (hub download), or a local file/folder
    seed=0,                        # init and data order; rank r draws noise from seed * world + r
    precision='auto',              # auto: bf16 autocast on CUDA, fp32 on CPU; or bf16 / fp32 on any device
    num_workers=4,                 # data loader processes per rank
    compile=False,                 # torch.compile the model (CUDA)
    wandb=False,                   # also log to Weights & Biases (pip install wandb)
)
presets = {  # --preset toy: the toy set on a laptop CPU in minutes
    'toy': dict(data_path='data/toy', out='runs/toy-{method}', model='SiT-T/2', global_batch=64, lr=2e-3,
                ema_decay=0.99, max_steps=1000, log_every=50, ckpt_every=500, sample_every=500, num_workers=0),
}
# keys that may change when resuming (everything else must match the checkpoint, or resume is not exact)
RUN_KEYS = {'data_path', 'out', 'resume', 'grad_accum', 'max_steps', 'log_every', 'ckpt_every', 'keep_ckpts',
            'sample_every', 'vae', 'precision', 'num_workers', 'compile', 'wandb'}
# >>> method: config
config.update(
    method='repa',
    enc='dinov2-b',                # teacher: DINOv2 ViT-B/14 as the paper; 'dinov2-s', '-l', '-g'; 'toy'
    enc_ckpt='',                   # teacher weights: '' = the hub (toy: in --data-path), a local file, or 'random'
    enc_cache='',                  # the teacher's outputs, made once (prepare.py teacher-cache): no ViT per step
    encoder_depth=8,               # align the tokens after this block (1-based): 8 for SiT-L/XL, 4 for SiT-B
    projector_dim=2048,            # projector MLP D -> 2048 -> 2048 -> teacher width, SiLU between
    proj_coeff=0.5,                # L = L_v + proj_coeff * L_proj
)
# toy: the toy teacher, a 4-block ViT trained on the toy set and saved beside it (prepare.py toy --teacher), or
# --enc dinov2-s: DINOv2-S sees the 16 px image at 112 px, an 8x8 token grid as SiT-T/2's (lab.py's default); a
# projector for SiT-T
presets['toy'].update(enc='toy', enc_ckpt='', encoder_depth=2, projector_dim=256)
RUN_KEYS.update({'enc_ckpt', 'enc_cache'})  # the weights file may move; a cache changes only float rounding
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
    if cuda:  # TF32 matmuls; SDPA picks flash / memory-efficient kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = sit.use_bf16(cfg['precision'], device)  # autocast of the SiT forward (a teacher runs in fp16)
    accum = cfg['grad_accum']
    micro_batch = sit.micro_batch_size(cfg['global_batch'], world, accum)
    # --resume, or the same command rerun into its run folder, continues; nothing is written until all is checked
    run_dir, ckpt = sit.open_run(cfg, RUN_KEYS)

    # data
    # >>> method: data
    depth = sit.model_depth(cfg['model'])  # flags are checked before a teacher is built or fetched (DINOv2-g: 1.1B)
    if not 1 <= cfg['encoder_depth'] <= depth:
        sit.fail(f"--encoder-depth {cfg['encoder_depth']} is outside {cfg['model']}'s blocks 1..{depth}")
    dataset = sit.PreparedDataset(cfg['data_path'], images=True)  # the teacher sees the images
    # <<< method
    meta = dataset.meta
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg['seed'],
                                 drop_last=True)
    steps_per_epoch = len(sampler) // (accum * micro_batch)
    if steps_per_epoch == 0:
        sit.fail(f"{len(dataset)} images give no full batch of {accum * micro_batch} per rank; lower --global-batch")

    # model, EMA, optimizer (same initial weights on every rank; DDP would broadcast rank 0's anyway)
    torch.manual_seed(cfg['seed'])
    model_args = dict(input_size=meta['latent_size'], in_channels=meta['latent_channels'],
                      num_classes=meta['num_classes'], class_dropout_prob=cfg['label_dropout'])
    # >>> method: model
    # the teacher sees 14 px per SiT token (a 16x16 token grid -> 224 px), so its patch tokens line up one-to-one
    grid = meta['latent_size'] // int(cfg['model'].split('/')[1])
    teacher = sit.load_teacher(cfg['enc'], cfg['enc_ckpt'] or None, grid=grid, device=device, fp16=bf16,
                               data_path=cfg['data_path'], cache=cfg['enc_cache'])
    model_args.update(z_dims=[teacher.dim], projector_dim=cfg['projector_dim'], encoder_depth=cfg['encoder_depth'])
    # <<< method
    if ckpt is not None and ckpt['model_args'] != model_args:
        sit.fail(f"the checkpoint's model was built for {ckpt['model_args']} but the data at "
                 f"'{cfg['data_path']}' gives {model_args}; pass the original --data-path")
    model = sit.build_model(cfg['model'], **model_args).to(device)
    # modules a method adds to the built model, or swaps for one of its own, go here: the optimizer, EMA, DDP and
    # checkpoints below take them
    # >>> method: modules
    # <<< method
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg['lr'], betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0, fused=cuda)
    sit.create_run_dir(run_dir, dict(cfg, out=run_dir), __file__, model, ckpt['step'] if ckpt else 0)
    log = sit.Logger(run_dir, rank, cfg, step=ckpt['step'] if ckpt else 0)
    log(f"{cfg['method']}: {world} rank(s) on {device.type}{' (bf16)' if bf16 else ''}, global batch "
        f"{cfg['global_batch']} = {world} x {accum} x {micro_batch}, run folder {run_dir}")
    if ckpt is not None:
        step = sit.restore(ckpt, model, ema, opt, device, log)  # weights, optimizer, step, this rank's RNG
        del ckpt
    else:
        step = 0
        torch.manual_seed(cfg['seed'] * world + rank)  # each rank draws its own t and noise
    log(f"{cfg['model']}: {sum(p.numel() for p in model.parameters()):,} parameters, data {meta['count']:,} "
        f"images of {meta['latent_channels']}x{meta['latent_size']}x{meta['latent_size']} latents")
    net = torch.compile(model) if cfg['compile'] else model
    if world > 1:
        # gradients as views into DDP's all-reduce buckets: no copy between them (SiT-XL/2: 2.7 GB less memory)
        net = DDP(net, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True)

    def batches(step):
        """Micro-batches in an order that is a function of (seed, epoch) only, so a resumed run continues
        mid-epoch exactly (also with another --grad-accum)."""
        epoch, skip = divmod(step, steps_per_epoch)
        per_step = accum * micro_batch
        while True:
            sampler.set_epoch(epoch)
            indices = list(sampler)[skip * per_step: steps_per_epoch * per_step]
            # its own generator: a loader draws a worker seed when it starts, which must not shift the global RNG
            yield from DataLoader(dataset, batch_size=micro_batch, sampler=indices, num_workers=cfg['num_workers'],
                                  pin_memory=cuda, drop_last=True, generator=torch.Generator().manual_seed(epoch))
            epoch, skip = epoch + 1, 0

    # preview grid: fixed noise and labels (classes 0.. in columns), sampled from the EMA model
    n_cols = min(meta['num_classes'], 10)
    g = torch.Generator().manual_seed(cfg['seed'])
    latent_shape = (model.in_channels, meta['latent_size'], meta['latent_size'])
    preview_noise = [torch.randn(4 * n_cols, *s, generator=g) for s in sit.noise_shapes(model, latent_shape)]
    preview_labels = torch.arange(4 * n_cols) % n_cols
    vae = sit.load_autoencoder(meta, device, cfg['vae'] or None) if rank == 0 and cfg['sample_every'] else None

    def preview(step):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            z = sit.sample(ema, [n.to(device) for n in preview_noise], preview_labels.to(device), mode='ode',
                           num_steps=50, cfg_scale=cfg['preview_cfg'])
            images = sit.decode_latents(z, meta, vae)
        path = os.path.join(run_dir, f'preview_{step:07d}.png')
        sit.save_grid(images, path, n_cols)
        log(f'preview grid -> {path}')

    # -------------------------------------------------------------------------
    # training loop
    stop = sit.StopFlag()  # installed before the loaders fork, so their workers ignore the signal too
    data = batches(step)
    if step >= cfg['max_steps']:
        log(f"the run is at step {step} of {cfg['max_steps']}: nothing to do (raise --max-steps to train on)")
    net.train()
    while step < cfg['max_steps']:
        opt.zero_grad(set_to_none=True)
        for i in range(accum):
            # >>> method: batch
            images, moments, y = (b.to(device, non_blocking=True) for b in next(data))
            target = teacher(images)['patch']                                # (N, T, 768), frozen, no grad
            # <<< method
            x = sit.sample_latents(moments, meta)                            # (N, C, h, w), normalised
            y = sit.drop_labels(y, cfg['label_dropout'], meta['num_classes'])  # once, here (REPA's --legacy: twice)
            with sit.grad_sync(net, enabled=i == accum - 1):                   # all-reduce on the last micro-batch
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    # >>> method: loss call
                    loss, terms = compute_loss(net, x, y, target, cfg['proj_coeff'])
                    # <<< method
                (loss / accum).backward()
            log.add({'loss': loss, **terms}, weight=1 / accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        opt.step()
        sit.update_ema(ema, model, cfg['ema_decay'])
        step += 1

        log.add({'grad_norm': grad_norm})
        if step % cfg['log_every'] == 0 or step == cfg['max_steps']:
            log.report(step)
        if rank == 0 and cfg['sample_every'] and (step % cfg['sample_every'] == 0 or step == cfg['max_steps']):
            preview(step)
        stopping = stop.poll()  # agreed by all ranks; no host sync (a signal stops within two steps)
        if step % cfg['ckpt_every'] == 0 or step == cfg['max_steps'] or stopping:
            sit.save_training_state(run_dir, step, log, device, keep=cfg['keep_ckpts'], model=model, ema=ema, opt=opt,
                                    config=cfg, model_args=model_args)
        if stopping:
            log(f'stopped by signal at step {step}; rerun the same command (or --resume {run_dir}) to continue')
            break
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model


if __name__ == '__main__':
    main()
