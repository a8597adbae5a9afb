"""
lab.py: the toy lab. Does a method speed up training? It trains vanilla SiT and each method on the toy set for the
same steps with the same seed (each at its --preset toy: the papers' loss coefficients, encoder depth and tau
scaled to SiT-T/2, nothing tuned per method), scores every checkpoint with the toy FD through evaluate.py under
one protocol, and reports FD against steps, the steps each method needs to reach vanilla's FD (the papers' "N x
fewer steps"), its time per step and the ODE path lengths of the final models.

  python lab.py --seed 0            # DINOv2-S from the hub: vanilla, REPA, HASTE, REG, CAR-Flow; scoring, figure
  python lab.py --seed 0 --enc-ckpt data/dinov2_small.safetensors    # the teacher's weights from a file (offline)
  python lab.py --seed 1 && python lab.py --seed 2     # more seeds into the same --out: the table spans them all
  python lab.py --methods vanilla,repa,path/to/train_mine.py    # your copy of a training script beside the others
  python lab.py --teacher toy --methods repa,haste,reg          # the toy teacher beside DINOv2 (runs repa-toy, ...)
  python lab.py --methods haste:tau=500                         # a variant: script flags as key=value after ':'
  python lab.py --steps 4 --ckpt-every 2 --num-samples 8 --out /tmp/lab   # the mechanics in a minute (tests)

Methods: the names vanilla, repa, haste, reg, carflow, or the path of any training script that follows the
template (train_repa.py copied and changed in its method slots: docs/your-method.md). Each is trained with
--preset toy and the same seed, steps and checkpoints; a script with a teacher (an `enc` key) aligns to --teacher,
one with a `tau` key stops at the same share of the run as its preset does. Vanilla is always trained: it is the
baseline. A script without a toy preset, or whose checkpoints sample.py cannot load (a one-step trial run tells),
is refused in one line before anything trains.
Teacher: dinov2-s (default): DINOv2 ViT-S/14, a real self-supervised encoder; the 16 px toy image at 112 px gives
it an 8x8 token grid, SiT-T/2's. toy: the 4-block ViT that prepare.py toy --teacher trains on the toy labels. The
teacher is frozen and the toy images are never augmented, so its outputs (tokens, class token, the attention
logits of its last two blocks) are computed once into DATA/cache-TEACHER (prepare.py teacher-cache) and read by
every run: the live teacher's outputs to float rounding (tests/test_toy_lab.py), without a ViT forward per step.
Sampling protocol (every checkpoint, every method): ODE, 25 Euler steps, no guidance, sample i's noise and label
keyed by (--seed, i). No guidance, as REPA's convergence curves: CFG pulls every model's samples towards its class
modes and hides what the network itself learned. The figure needs matplotlib (pip install matplotlib), checked
first, with the teacher's weights.
Outputs: OUT/seedS/<run>/ (the run, its eval.jsonl and lab.json: its numbers), OUT/seedS/fd_toy.png (+ .md,
evaluate.py's figure of the seed); over every seed in OUT: OUT/toy_lab.md and OUT/toy_lab.png. --report DIR writes
those two to DIR as well, with every seed's per-checkpoint numbers (DIR/seedS.json), for committing.
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

import evaluate
import prepare
import sample
import sit

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN = {m: os.path.join(HERE, f'train_{m}.py') for m in ('vanilla', 'repa', 'haste', 'reg', 'carflow')}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--seed', type=int, default=0, help='training seed of every method and the sampling seed')
p.add_argument('--methods', default='vanilla,repa,haste,reg,carflow',
               help="comma-separated: built-in names or paths of training scripts, each optionally with ':key=value' "
                    "flags (haste:tau=500)")
p.add_argument('--teacher', default='dinov2-s', choices=[*sit.DINOV2, 'toy'],
               help='what methods with a teacher align to (dinov2-s: 112 px, an 8x8 grid)')
p.add_argument('--enc-ckpt', default='', help="the teacher's weights: '' = the hub (toy: DATA/teacher.safetensors), "
                                              "or a file (data/dinov2_small.safetensors)")
p.add_argument('--steps', type=int, default=500, help='optimizer steps of every method (the toy preset has 1000)')
p.add_argument('--ckpt-every', type=int, default=50, help='checkpoint (and toy FD point) every K steps')
p.add_argument('--num-samples', type=int, default=300, help='samples per checkpoint for the toy FD')
p.add_argument('--sample-steps', type=int, default=25, help='Euler steps of the ODE sampler')
p.add_argument('--path-samples', type=int, default=300, help='samples for the path lengths of the final models')
p.add_argument('--data', default='data/toy', help='toy set, toy FD (and toy teacher) (made here if missing)')
p.add_argument('--data-seed', type=int, default=0, help="prepare.py toy's --seed (the data is shared by all seeds)")
p.add_argument('--background', default='plain', choices=prepare.TOY_BACKGROUNDS,
               help="prepare.py toy's --background; textured is the harder variant (give it its own --data, --out)")
p.add_argument('--out', default='runs/lab')
p.add_argument('--report', metavar='DIR', help="also write the table, the figure and each seed's numbers here")
p.add_argument('--jobs', type=int, default=2, help='processes at a time (one thread each)')


# -----------------------------------------------------------------------------
# Methods: a script, its flags, the name of its runs


def read_script(path):
    """A training script's (config, presets): imported from its path (importing a script starts no training)."""
    spec = importlib.util.spec_from_file_location(f'lab_{os.path.splitext(os.path.basename(path))[0]}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config, module.presets


def parse_methods(spec, teacher, steps):
    """'vanilla,haste:tau=500,path/train_x.py' -> [dict(label, script, flags, teacher, tau)], vanilla first. Checks
    what can be checked without data: the scripts exist, have a toy preset and the keys the flags name."""
    methods = []
    for item in [m.strip() for m in spec.split(',') if m.strip()]:
        name, *pairs = item.split(':')
        script = BUILTIN.get(name, os.path.abspath(name))
        if not (name in BUILTIN or name.endswith('.py')) or not os.path.isfile(script):
            sit.fail(f"--methods {item}: not one of {', '.join(BUILTIN)} nor a training script's path")
        config, presets = read_script(script)
        if 'toy' not in presets:
            sit.fail(f"{name}: no toy preset (presets['toy']); the lab trains every method with --preset toy, so add "
                     f"one as train_vanilla.py has")
        flags = {}
        for pair in pairs:
            k, _, v = pair.partition('=')
            if k not in config or not v:
                sit.fail(f"--methods {item}: '{pair}' is not key=value of a key of {os.path.basename(script)}'s "
                         f"config ({', '.join(config)})")
            flags[k] = v
        stem = name if name in BUILTIN else os.path.basename(script)[:-3].removeprefix('train_')
        label = stem + ''.join(f'-{k.replace("_", "")}{v}' for k, v in flags.items())
        toy = presets['toy']
        tau = None
        if 'tau' in config and 'tau' not in flags:  # stop at the same share of the run as the preset does
            tau = round(toy.get('tau', config['tau']) * steps / toy.get('max_steps', config['max_steps']))
        uses = 'enc' in config
        methods.append(dict(label=label + (f'-{teacher}' if uses else ''), script=script, flags=flags,
                            teacher=teacher if uses else None, tau=tau, name=stem))
    if not any(m['script'] == BUILTIN['vanilla'] and not m['flags'] for m in methods):
        methods.insert(0, parse_methods('vanilla', teacher, steps)[0])
    labels = [m['label'] for m in methods]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        sit.fail(f"--methods: two runs would be named {', '.join(twice)}; rename a script or drop the repeat")
    return sorted(methods, key=lambda m: m['label'] != 'vanilla')


def train_command(m, args, run, cache=None, steps=None, ckpt_every=None):
    """The training command of method m: its script with --preset toy, the lab's seed, steps and checkpoints, the
    teacher (and its cache) for a script with one, the scaled tau, then the method's own flags."""
    steps, every = steps or args.steps, ckpt_every or args.ckpt_every
    cmd = [sys.executable, m['script'], '--preset', 'toy', '--data-path', args.data, '--out', run, '--seed',
           str(args.seed), '--max-steps', str(steps), '--ckpt-every', str(every), '--sample-every', '0',
           '--log-every', str(min(50, every))]
    if m['teacher']:
        cmd += ['--enc', m['teacher'], '--enc-ckpt', args.enc_ckpt] + (['--enc-cache', cache] if cache else [])
    if m['tau'] is not None:
        cmd += ['--tau', str(m['tau'])]
    for k, v in m['flags'].items():
        cmd += ['--' + k.replace('_', '-'), v]
    return cmd


def job_env():
    """One thread per process, and this folder on the import path: a copied script elsewhere imports sit as ours do."""
    path = os.pathsep.join([HERE] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=path)


def trial_run(m, args, folder):
    """One step of a method that is not built in, then sample.py's loader on its checkpoint: a script that does not
    train with the lab's flags, or whose checkpoints sample.py cannot load, is refused here in one line."""
    shutil.rmtree(folder, ignore_errors=True)
    cmd = train_command(m, args, folder, steps=1, ckpt_every=1)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=job_env())
        if out.returncode:
            said = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
            sit.fail(f"{m['name']}: a one-step trial run with the lab's flags failed ({(said or ['no output'])[-1][:200]}"
                     f"); run `python {shlex.join(cmd[1:])}` to see why")
        try:
            sample.load_model(os.path.join(folder, 'checkpoints', '0000001.pt'), data_path=args.data)
        except sit.Failure as e:
            sit.fail(f"{m['name']}: sample.py cannot load its checkpoints ({e.line}); the lab scores every checkpoint "
                     f"with sample.py, so keep the model a sit.SiT (a projector, which only trains, may be anything)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -----------------------------------------------------------------------------
# Numbers of one run


@torch.no_grad()
def ode_path_length(model, noise, y, num_steps=50):
    """Length of each sample's trajectory under sit.sample's Euler ODE without guidance, t = 1 -> 0: the sum over
    steps of |x_{k+1} - x_k| (L2 over the latent's C*H*W values) -> (ordinary, shifted), (N,) each. ordinary is
    measured where the images live (from eps to the sample); shifted where CAR-Flow's network integrates,
    z_t = x_t + mu_t(y), from eps + mu0 to x + mu1 (its paper's "shorter paths" are these); for a model without
    shifts the two are equal. noise as sit.sample's; a REG class token is integrated along and not counted."""
    noise = list(noise) if isinstance(noise, (list, tuple)) else [noise]
    n = math.prod(noise[0].shape[1:])
    shifts = getattr(model, 'has_shifts', False)
    net, x = sit.ShiftsOnce(model) if shifts else model, noise[0].float()
    if len(noise) == 2:
        net, x = sit.JointState(model, noise[0].shape[1:], 1.0), torch.cat([x.flatten(1), noise[1]], dim=1)
    mu0, mu1 = model.shifts(y) if shifts else (0.0, 0.0)
    dmu = ((mu0 - mu1) * torch.ones_like(noise[0])).flatten(1)              # (N, C*H*W): dz = dx + dt (mu0 - mu1)
    ordinary, shifted = torch.zeros(len(x)), torch.zeros(len(x))
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()  # euler_sampler's grid
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dx = (t_next - t_cur) * sit.guided_velocity(net, x, t_cur, y)       # (N, ...) one Euler step
        ordinary += dx.flatten(1)[:, :n].norm(dim=1).cpu()
        shifted += (dx.flatten(1)[:, :n] + (t_next - t_cur) * dmu).norm(dim=1).cpu()
        x = x + dx
    return ordinary, shifted


def ms_per_step(run, global_batch, lo=0, hi=float('inf')):
    """Median training time per step (ms) over the run's log intervals ending in (lo, hi] (metrics.jsonl img/s;
    an interval that wrote a checkpoint counts too: the same for every method)."""
    with open(os.path.join(run, 'metrics.jsonl')) as f:
        rates = [r['img_per_s'] for r in map(json.loads, f) if lo < r['step'] <= hi]
    return float(np.median([1000 * global_batch / r for r in rates])) if rates else None


def run_numbers(m, args, run, sampler):
    """What the table needs of one finished, scored run -> RUN/lab.json's content."""
    with open(os.path.join(run, 'config.json')) as f:
        gb = json.load(f)['global_batch']
    fd = {str(r['step']): r['metrics']['fd_toy'] for r in sorted(evaluate.read_records(run), key=lambda r: r['step'])
          if r['protocol']['num_steps'] == args.sample_steps and r['num_samples'] == args.num_samples}
    model, meta, *_ = sample.load_model(os.path.join(run, 'checkpoints', f'{args.steps:07d}.pt'), data_path=args.data)
    shape = (meta['latent_channels'], meta['latent_size'], meta['latent_size'])
    # sample.py's noise and labels: the same latent noise for every method (REG's token noise drawn after it)
    noise, y = sample.draw_inputs(range(args.path_samples), args.seed, sit.noise_shapes(model, shape),
                                  meta['num_classes'])
    ordinary, shifted = ode_path_length(model, noise, y, num_steps=args.sample_steps)
    weights = sit.teacher_id(m['teacher'], args.enc_ckpt or None, args.data) if m['teacher'] else None
    return dict(label=m['label'], script=os.path.basename(m['script']), flags=m['flags'], teacher=m['teacher'],
                teacher_weights=weights, seed=args.seed, steps=args.steps,
                tau=m['tau'], protocol=sampler, num_samples=args.num_samples, background=args.background,
                fd=fd, final=fd[str(args.steps)], ms_per_step=ms_per_step(run, gb),
                ms_per_step_phases=[ms_per_step(run, gb, 0, m['tau']), ms_per_step(run, gb, m['tau'])]
                if m['tau'] else None, path_length=ordinary.mean().item(), path_length_shifted=shifted.mean().item(),
                date=time.strftime('%Y-%m-%d', time.localtime(os.path.getmtime(os.path.join(run, 'eval.jsonl')))),
                machine=sit.machine())


# -----------------------------------------------------------------------------
# Over seeds: the table and the figure


def mean_sd(values, fmt='.3g'):
    """'mean +- sd' over seeds (sd with ddof 1, two digits); None (a target never reached) is counted apart."""
    v = [x for x in values if x is not None]
    never = f'never on {len(values) - len(v)} of {len(values)} seeds' if len(v) < len(values) else ''
    if not v:
        return 'never'
    sd = np.std(v, ddof=1) if len(v) > 1 else None
    shown = f'{np.mean(v):{fmt}}' + ('' if sd is None else f' +- {sd:.0f}' if sd >= 10 else f' +- {sd:.2g}')
    return shown + (f' ({never})' if never else '')


def seed_summary(runs):
    """One seed's runs [lab.json] -> {label: numbers} with the targets filled in: the steps each run needs to reach
    vanilla's FD half-way and at the end (evaluate.steps_to, interpolated in log FD between checkpoints)."""
    vanilla = next(r for r in runs if r['label'] == 'vanilla')
    steps = sorted(int(k) for k in vanilla['fd'])
    half = min(steps, key=lambda k: abs(k - vanilla['steps'] // 2))                 # the checkpoint nearest half-way
    out = {}
    for r in runs:
        curve = {int(k): v for k, v in r['fd'].items()}
        out[r['label']] = dict(r, half=half, steps_to_vanilla_half=evaluate.steps_to(curve, vanilla['fd'][str(half)]),
                               steps_to_vanilla_final=evaluate.steps_to(curve, vanilla['final']))
    return out


def report_table(seeds):
    """seeds: {seed: seed_summary} -> the markdown toy_lab.md holds (written by this function only): the FD and the
    steps to vanilla's FD, then cost and path lengths, then the FD at every checkpoint."""
    first = next(iter(seeds.values()))
    v = first['vanilla']
    runs = {label: [s[label] for s in seeds.values() if label in s] for s in seeds.values() for label in s}
    teachers = [ms[0]['teacher'] for ms in runs.values() if ms[0]['teacher']]
    main = max(set(teachers), key=teachers.count) if teachers else None
    order = [os.path.basename(path) for path in BUILTIN.values()]
    runs = dict(sorted(runs.items(), key=lambda kv: (  # vanilla, the built-in methods, yours, variants, other teachers
        kv[1][0]['teacher'] not in (None, main), bool(kv[1][0]['flags']),
        order.index(kv[1][0]['script']) if kv[1][0]['script'] in order else len(order), kv[0])))
    name = {label: label + ('' if len(ms) == len(seeds) else ' (seed ' + ', '.join(str(m['seed']) for m in ms) + ')')
            for label, ms in runs.items()}
    half, steps = v['half'], v['steps']
    rows = [f"toy FD ({v['background']} background), seeds {', '.join(str(k) for k in seeds)}, {steps} steps, ODE "
            f"Euler {v['protocol'][3]} steps, no guidance, {v['num_samples']} samples per checkpoint; mean +- sd over "
            f"seeds; steps to a target interpolated between checkpoints (log FD). Teachers: "
            + ('; '.join(sorted({r['teacher_weights'] for ms in runs.values() for r in ms if r['teacher']})) or 'none')
            + '. Scored on ' + ', '.join(sorted({r['date'] for ms in runs.values() for r in ms})) + ' on '
            + '; '.join(sorted({r['machine'] for ms in runs.values() for r in ms})) + '.', '',
            f'| run | FD at {half} | final FD (step {steps}) | steps to vanilla\'s FD at {half} '
            f'| steps to vanilla\'s final FD (per seed) |', '|---|---:|---:|---:|---|']
    for label, ms in runs.items():
        reach = ', '.join('never' if m['steps_to_vanilla_final'] is None else f"{m['steps_to_vanilla_final']:.0f}"
                          for m in ms)
        rows.append(f"| {name[label]} | {mean_sd([m['fd'][str(half)] for m in ms])} | {mean_sd([m['final'] for m in ms])} "
                    f"| {mean_sd([m['steps_to_vanilla_half'] for m in ms], '.0f')} | {reach} |")
    rows += ['', 'time per training step (the lab\'s runs: median over their log intervals, one thread per process, '
             'two at a time, so it moves with the machine\'s load) and the ODE path length of the final model (in '
             'CAR-Flow\'s shifted coordinates in brackets)', '', '| run | ms / step | ODE path length |', '|---|---:|---:|']
    for label, ms in runs.items():
        phases = (' (I ' + mean_sd([m['ms_per_step_phases'][0] for m in ms], '.0f') + ', II '
                  + mean_sd([m['ms_per_step_phases'][1] for m in ms], '.0f') + ')') if ms[0]['tau'] else ''
        shifted = (f" ({mean_sd([m['path_length_shifted'] for m in ms])})"
                   if abs(ms[0]['path_length_shifted'] - ms[0]['path_length']) > 1e-6 * ms[0]['path_length'] else '')
        rows.append(f"| {name[label]} | {mean_sd([m['ms_per_step'] for m in ms], '.0f')}{phases} | "
                    f"{mean_sd([m['path_length'] for m in ms])}{shifted} |")
    ckpts = sorted(int(k) for k in v['fd'])
    rows += ['', 'toy FD at every checkpoint, mean +- sd over seeds', '',
             '| run | ' + ' | '.join(map(str, ckpts)) + ' |', '|---|' + '---:|' * len(ckpts)]
    rows += [f'| {name[label]} | ' + ' | '.join(mean_sd([m['fd'][str(k)] for m in ms]) for k in ckpts) + ' |'
             for label, ms in runs.items()]
    return '\n'.join(rows) + '\n'


def report_figure(seeds, path):
    """FD against steps, mean over seeds with a min-max band: one panel per teacher, vanilla and the runs without a
    teacher in each."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = {label: [s[label] for s in seeds.values() if label in s] for s in seeds.values() for label in s}
    teachers = sorted({r[0]['teacher'] for r in runs.values() if r[0]['teacher']}) or [None]
    fig, axes = plt.subplots(1, len(teachers), figsize=(7 * len(teachers), 4.8), squeeze=False)
    v = next(iter(seeds.values()))['vanilla']
    base = {label: label.removesuffix(f"-{ms[0]['teacher']}") for label, ms in runs.items()}   # 'repa-toy' -> 'repa'
    colour = {b: f'C{i % 10}' for i, b in enumerate(dict.fromkeys(base.values()))}  # a method's colour in every panel
    for ax, teacher in zip(axes[0], teachers):
        for label, ms in runs.items():
            if ms[0]['teacher'] not in (None, teacher):
                continue
            steps = sorted(int(k) for k in ms[0]['fd'])
            fds = np.array([[m['fd'][str(k)] for k in steps] for m in ms])             # (seeds, checkpoints)
            ax.plot(steps, fds.mean(0), marker='o', ms=3, label=f'{label} ({len(ms)})', color=colour[base[label]],
                    ls='-' if not ms[0]['flags'] else '--')
            ax.fill_between(steps, fds.min(0), fds.max(0), color=colour[base[label]], alpha=0.15)
        for m in (runs.get(label)[0] for label in runs):
            if m['tau'] and m['teacher'] == teacher and not m['flags']:
                ax.axvline(m['tau'], color='grey', ls=':', lw=1)
                ax.text(m['tau'], ax.get_ylim()[1], ' HASTE tau', va='top', fontsize=8, color='grey')
        ax.set(xlabel='training step', ylabel='toy FD', yscale='log',
               title=f"teacher {teacher}: SiT-T/2 on the toy set ({v['background']} background), mean over seeds "
                     f"(in brackets),\nband min-max; toy FD of {v['num_samples']} samples, ODE Euler "
                     f"{v['protocol'][3]} steps, no CFG")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = p.parse_args(argv)
    if min(args.steps, args.ckpt_every, args.sample_steps, args.jobs) < 1 or min(args.num_samples, args.path_samples) < 2:
        sit.fail('--steps, --ckpt-every, --sample-steps and --jobs must be >= 1, --num-samples and --path-samples >= 2')
    methods = parse_methods(args.methods, args.teacher, args.steps)
    # what the end needs, before anything is made or trained: matplotlib for the figure, the teacher's weights
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sit.fail('the lab draws its figure with matplotlib: pip install matplotlib')
    uses = any(m['teacher'] for m in methods)
    if uses and args.enc_ckpt and not os.path.isfile(args.enc_ckpt):
        sit.fail(f"--enc-ckpt {args.enc_ckpt}: no such file (DINOv2-S offline: docs/toy.md#a-real-dinov2-teacher)")
    if uses and args.teacher != 'toy' and not args.enc_ckpt:  # from the hub (or its cache), now rather than later
        sit.load_teacher(args.teacher, None, grid=8)
    seed_dir = os.path.join(args.out, f'seed{args.seed}')
    t_start = time.time()

    def progress(what, done, total):
        dt = time.time() - t_start
        print(f'[lab] {what} | {done}/{total} stages | {sit.format_time(dt)} elapsed'
              + (f', eta {sit.format_time(dt / done * (total - done))}' if done else ''), flush=True)

    # -------------------------------------------------------------------------
    # data, toy FD network and its held-out reference (and the toy teacher): once, every seed shares them
    need = ['dataset.json', 'fd.json'] + (['teacher.json'] if uses and args.teacher == 'toy' else [])
    if not all(os.path.isfile(os.path.join(args.data, f)) for f in need):
        prepare.main(['toy', '--out', args.data, '--seed', str(args.data_seed), '--background', args.background,
                      '--fd'] + (['--teacher'] if 'teacher.json' in need else []))
    with open(os.path.join(args.data, 'dataset.json')) as f:
        found = (json.load(f).get('toy') or {}).get('background', 'plain')
    if found != args.background:
        sit.fail(f"--data {args.data} holds the toy set with the {found} background, not {args.background}; pass "
                 f"--background {found}, or another --data for the {args.background} variant")
    os.makedirs(seed_dir, exist_ok=True)
    for m in methods:
        if m['script'] not in BUILTIN.values():
            trial_run(m, args, os.path.join(seed_dir, f".trial-{m['label']}"))
    stages = 1 + 2 * len(methods) + uses
    progress('data and toy FD ready' + (', scripts checked' if len(methods) > len(BUILTIN) else ''), 1, stages)

    # -------------------------------------------------------------------------
    # the teacher's outputs once, the trainings (same steps and seed), then every checkpoint of every run scored
    # under one protocol with the toy FD; --jobs at a time, one thread each (2 single-thread processes use 2 cores
    # better than one process with 2 threads, and far better on a shared machine). A job starts once the jobs it
    # needs are done; finished trainings and scores are skipped when rerun.
    cache = os.path.join(args.data, f'cache-{args.teacher}')
    runs = {m['label']: os.path.join(seed_dir, m['label']) for m in methods}
    sampler = ['--mode', 'ode', '--num-steps', str(args.sample_steps), '--seed', str(args.seed), '--batch-size', '250']
    jobs = ([('teacher cache', [sys.executable, os.path.join(HERE, 'prepare.py'), 'teacher-cache', '--data', args.data,
                                '--enc', args.teacher, '--out', cache] + (['--enc-ckpt', args.enc_ckpt] if args.enc_ckpt
                                                                          else []), [])] if uses else [])
    jobs += [(f"train {m['label']}", train_command(m, args, runs[m['label']], cache), ['teacher cache'] if m['teacher']
              else []) for m in sorted(methods, key=lambda m: m['teacher'] is not None)]  # no teacher: alongside
    jobs += [(f"score {m['label']}", [sys.executable, os.path.join(HERE, 'evaluate.py'), runs[m['label']], '--ref',
                                      os.path.join(args.data, 'fd_ref.npz'), '--features', 'toy', '--num-samples',
                                      str(args.num_samples), *sampler], [f"train {m['label']}"]) for m in methods]
    running, done, finished = {}, 1, set()
    while jobs or running:
        for job in [j for j in jobs if all(d in finished for d in j[2])][:args.jobs - len(running)]:
            jobs.remove(job)
            name, cmd, _ = job
            log = open(os.path.join(seed_dir, name.replace(' ', '_') + '.log'), 'a')  # a rerun adds to it
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env())
            running[name] = (proc, log, time.time())
            print(f'[lab] {name} started (log {log.name})', flush=True)
        time.sleep(0.5)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                for other, (q, _, _) in running.items():
                    q.terminate()
                sit.fail(f'{name} failed (exit {proc.returncode}); see {log.name}')
            done += 1
            finished.add(name)
            progress(f'{name} done ({time.time() - t0:.0f} s)', done, stages)
    figure = os.path.join(seed_dir, 'fd_toy.png')
    evaluate.main([*runs.values(), '--plot', '--metric', 'fd_toy', '--out', figure, '--log', '--baseline',
                   runs['vanilla']])

    # -------------------------------------------------------------------------
    # this seed's numbers (RUN/lab.json), then the table and the figure over every seed in --out
    for m in methods:
        sit.write_json(os.path.join(runs[m['label']], 'lab.json'), run_numbers(m, args, runs[m['label']], sampler))
    seeds = {}
    for path in sorted(glob.glob(os.path.join(args.out, 'seed*', '*', 'lab.json'))):
        with open(path) as f:
            r = json.load(f)
        if (r['steps'], r['protocol'][:4], r['num_samples'], r['background']) == (
                args.steps, sampler[:4], args.num_samples, args.background):  # the same protocol but for the seed
            seeds.setdefault(r['seed'], []).append(r)
    seeds = {k: seed_summary(v) for k, v in sorted(seeds.items()) if any(r['label'] == 'vanilla' for r in v)}
    table = report_table(seeds)
    for folder in [args.out] + ([args.report] if args.report else []):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'toy_lab.md'), 'w') as f:
            f.write(table)
        report_figure(seeds, os.path.join(folder, 'toy_lab.png'))
    if args.report:
        for seed, summary in seeds.items():
            sit.write_json(os.path.join(args.report, f'seed{seed}.json'), summary)
    print(table)
    print(f"[lab] done in {sit.format_time(time.time() - t_start)}: this seed's figure {figure} (table "
          f"{figure[:-4]}.md, with the steps to vanilla's FD at each checkpoint); over {len(seeds)} seed(s): "
          f"{os.path.join(args.out, 'toy_lab.png')}, {os.path.join(args.out, 'toy_lab.md')}"
          + (f'; also in {args.report}' if args.report else ''))
    return seeds[args.seed]


if __name__ == '__main__':
    main()
