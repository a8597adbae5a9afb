"""
lab.py: the toy lab. Trains vanilla, REPA, HASTE, REG and CAR-Flow on the toy set for the same steps (each at its
toy preset: the papers' loss coefficients, encoder depth and tau scaled to SiT-T/2, nothing tuned per method),
scores every checkpoint with the toy FD through evaluate.py under one protocol, measures the ODE path lengths of
the final models and each method's time per step, and draws toy FD against steps.

  python lab.py                              # seed 0: data, toy teacher, toy FD, 5 trainings, scoring, figure
  python lab.py --seed 1 && python lab.py --seed 2     # more seeds into the same --out: the table spans them all
  python lab.py --steps 4 --ckpt-every 2 --num-samples 8 --out /tmp/lab   # the mechanics in a minute (tests)
  python lab.py --background textured --data data/toy-textured --out runs/lab-textured    # the harder variant

Sampling protocol (every checkpoint, every method): ODE, 25 Euler steps, no guidance, sample i's noise and label
keyed by (--seed, i). No guidance, as REPA's convergence curves: CFG pulls every model's samples towards its class
modes and hides what the network itself learned. The figure needs matplotlib (pip install matplotlib).
Outputs: OUT/seedS/<method>/ (the runs, with eval.jsonl), OUT/seedS/summary.json, OUT/seedS/fd_toy.png (+ .md,
evaluate.py's figure of this seed), and over every seed in OUT: OUT/toy_lab.png and OUT/toy_lab.md.
"""
import argparse
import glob
import importlib.util
import json
import math
import os
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
METHODS = {m: os.path.join(HERE, f'train_{m}.py') for m in ('vanilla', 'repa', 'haste', 'reg', 'carflow')}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--seed', type=int, default=0, help='training seed of every method and the sampling seed')
p.add_argument('--steps', type=int, default=500, help='optimizer steps of every method (the toy preset has 1000)')
p.add_argument('--ckpt-every', type=int, default=50, help='checkpoint (and toy FD point) every K steps')
p.add_argument('--num-samples', type=int, default=300, help='samples per checkpoint for the toy FD')
p.add_argument('--sample-steps', type=int, default=25, help='Euler steps of the ODE sampler')
p.add_argument('--path-samples', type=int, default=300, help='samples for the path lengths of the final models')
p.add_argument('--data', default='data/toy', help='toy set, toy teacher and toy FD (made here if missing)')
p.add_argument('--data-seed', type=int, default=0, help="prepare.py toy's --seed (the data is shared by all seeds)")
p.add_argument('--background', default='plain', choices=prepare.TOY_BACKGROUNDS,
               help="prepare.py toy's --background; textured is the harder variant (give it its own --data, --out)")
p.add_argument('--out', default='runs/lab')
p.add_argument('--jobs', type=int, default=2, help='processes at a time (one thread each)')


def read_script(path):
    """A training script's (config, presets): imported from its path (importing a script starts no training)."""
    spec = importlib.util.spec_from_file_location(f'lab_{os.path.splitext(os.path.basename(path))[0]}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config, module.presets


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
        dx = (t_next - t_cur) * sit.guided_velocity(net, x, t_cur, y)           # (N, ...) one Euler step
        ordinary += dx.flatten(1)[:, :n].norm(dim=1).cpu()
        shifted += (dx.flatten(1)[:, :n] + (t_next - t_cur) * dmu).norm(dim=1).cpu()
        x = x + dx
    return ordinary, shifted


def fd_curve(run):
    """{step: toy FD} of a run's eval.jsonl."""
    return {r['step']: r['metrics']['fd_toy'] for r in evaluate.read_records(run)}


def ms_per_step(run, global_batch, lo=0, hi=float('inf')):
    """Median training time per step (ms) over the run's log intervals ending in (lo, hi] (metrics.jsonl img/s;
    an interval that wrote a checkpoint counts too: the same for every method)."""
    with open(os.path.join(run, 'metrics.jsonl')) as f:
        rates = [r['img_per_s'] for r in map(json.loads, f) if lo < r['step'] <= hi]
    return float(np.median([1000 * global_batch / r for r in rates])) if rates else None


def steps_to(curve, target):
    """The first step at which an FD curve {step: FD} reaches target, interpolated between the two checkpoints that
    bracket it, linearly in log FD (the curves fall roughly exponentially between checkpoints), so a method that
    gets there 20 steps sooner shows it with checkpoints 50 apart; None if it never does within the run."""
    prev = None
    for step, fd in sorted(curve.items()):
        if fd <= target:
            if prev is None:
                return float(step)
            s0, f0 = prev
            return s0 + (step - s0) * (np.log(f0) - np.log(target)) / (np.log(f0) - np.log(fd))
        prev = (step, fd)
    return None


def mean_sd(values, fmt='.3g'):
    """'mean +- sd' over seeds (sd with ddof 1); None (a target never reached) is counted apart, not averaged."""
    v = [x for x in values if x is not None]
    never = f'never on {len(values) - len(v)} of {len(values)} seeds' if len(v) < len(values) else ''
    if not v:
        return 'never'
    shown = f'{np.mean(v):{fmt}} +- {np.std(v, ddof=1):.2g}' if len(v) > 1 else f'{v[0]:{fmt}}'
    return shown + (f' ({never})' if never else '')


def main(argv=None):
    args = p.parse_args(argv)
    if min(args.steps, args.ckpt_every, args.sample_steps, args.jobs) < 1 or min(args.num_samples, args.path_samples) < 2:
        sit.fail('--steps, --ckpt-every, --sample-steps and --jobs must be >= 1, --num-samples and --path-samples >= 2')
    seed_dir = os.path.join(args.out, f'seed{args.seed}')
    t_start = time.time()

    def progress(what, done, total):
        dt = time.time() - t_start
        print(f'[lab] {what} | {done}/{total} stages | {sit.format_time(dt)} elapsed'
              + (f', eta {sit.format_time(dt / done * (total - done))}' if done else ''), flush=True)

    # -------------------------------------------------------------------------
    # data, toy teacher, toy FD network and its held-out reference (once: every seed shares them)
    stages = 1 + 2 * len(METHODS)
    t0 = time.time()
    if not all(os.path.isfile(os.path.join(args.data, f)) for f in ('dataset.json', 'teacher.json', 'fd.json')):
        prepare.main(['toy', '--out', args.data, '--seed', str(args.data_seed), '--background', args.background,
                      '--teacher', '--fd'])
    with open(os.path.join(args.data, 'dataset.json')) as f:
        found = (json.load(f).get('toy') or {}).get('background', 'plain')
    if found != args.background:
        sit.fail(f"--data {args.data} holds the toy set with the {found} background, not {args.background}; pass "
                 f"--background {found}, or another --data for the {args.background} variant")
    timing = dict(prepare=time.time() - t0)
    progress('data, toy teacher and toy FD ready', 1, stages)

    # -------------------------------------------------------------------------
    # five trainings, same steps and seed, --jobs at a time, one thread each (2 single-thread processes use 2 cores
    # better than one process with 2 threads, and far better on a shared machine); then every checkpoint of every
    # run scored under one protocol with the toy FD. A finished run or score is skipped when rerun.
    runs = {m: os.path.join(seed_dir, m) for m in METHODS}
    toy = read_script(METHODS['vanilla'])[1]['toy']
    tau = round(read_script(METHODS['haste'])[1]['toy']['tau'] * args.steps / toy['max_steps'])  # as a share of the run
    train = {m: [METHODS[m], '--preset', 'toy', '--data-path', args.data, '--out', runs[m], '--seed',
                 str(args.seed), '--max-steps', str(args.steps), '--ckpt-every', str(args.ckpt_every),
                 '--sample-every', '0', '--log-every', str(min(toy['log_every'], args.ckpt_every))]
             + (['--tau', str(tau)] if m == 'haste' else []) for m in METHODS}
    sampler = ['--mode', 'ode', '--num-steps', str(args.sample_steps), '--seed', str(args.seed), '--batch-size', '250']
    score = {m: [os.path.join(HERE, 'evaluate.py'), runs[m], '--ref', os.path.join(args.data, 'fd_ref.npz'), '--features', 'toy',
                 '--num-samples', str(args.num_samples), *sampler] for m in METHODS}
    jobs = [(f'train {m}', train[m]) for m in METHODS] + [(f'score {m}', score[m]) for m in METHODS]
    running, done = {}, 0
    os.makedirs(seed_dir, exist_ok=True)
    while jobs or running:
        # a run is scored only once it is trained: scoring jobs wait for their training job
        while jobs and len(running) < args.jobs and not (jobs[0][0].startswith('score') and any(
                n == 'train ' + jobs[0][0][6:] for n in running)):
            name, cmd = jobs.pop(0)
            log = open(os.path.join(seed_dir, name.replace(' ', '_') + '.log'), 'w')
            proc = subprocess.Popen([sys.executable, *cmd], stdout=log,
                                    stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS='1'))
            running[name] = (proc, log, time.time())
            print(f'[lab] {name} started (log {log.name})', flush=True)
        time.sleep(0.5)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                sit.fail(f'{name} failed (exit {proc.returncode}); see {log.name}')
            timing[name], done = time.time() - t0, done + 1
            progress(f'{name} done ({timing[name]:.0f} s)', 1 + done, stages)
    figure = os.path.join(seed_dir, 'fd_toy.png')
    evaluate.main([*runs.values(), '--plot', '--metric', 'fd_toy', '--out', figure])

    # -------------------------------------------------------------------------
    # this seed's numbers: FD curves, steps to vanilla's final FD, time per step, ODE path lengths
    curves = {m: fd_curve(r) for m, r in runs.items()}
    half = min(curves['vanilla'], key=lambda k: abs(k - args.steps // 2))   # the checkpoint nearest half-way
    target, target_half = curves['vanilla'][args.steps], curves['vanilla'][half]
    summary = dict(seed=args.seed, data=args.data, background=args.background, steps=args.steps, tau=tau,
                   protocol=sampler, num_samples=args.num_samples,
                   vanilla_final=target, half=half, vanilla_half=target_half, timing=timing, methods={})
    for name, run in runs.items():
        gb = toy['global_batch']
        ckpt = os.path.join(run, 'checkpoints', f'{args.steps:07d}.pt')
        model, meta, *_ = sample.load_model(ckpt, data_path=args.data)
        shape = (meta['latent_channels'], meta['latent_size'], meta['latent_size'])
        # sample.py's noise and labels: the same latent noise for every method (REG's token noise drawn after it)
        noise, y = sample.draw_inputs(range(args.path_samples), args.seed, sit.noise_shapes(model, shape),
                                      meta['num_classes'])
        ordinary, shifted = ode_path_length(model, noise, y, num_steps=args.sample_steps)
        summary['methods'][name] = dict(
            fd={str(s): v for s, v in sorted(curves[name].items())}, final=curves[name][args.steps],
            steps_to_vanilla_final=steps_to(curves[name], target),
            steps_to_vanilla_half=steps_to(curves[name], target_half),
            ms_per_step=ms_per_step(run, gb),
            ms_per_step_phases=[ms_per_step(run, gb, 0, tau), ms_per_step(run, gb, tau)] if name == 'haste' else None,
            path_length=ordinary.mean().item(), path_length_shifted=shifted.mean().item())
    with open(os.path.join(seed_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)

    # -------------------------------------------------------------------------
    # over every seed in --out (same steps): the table with spread and the figure (mean, band = min..max)
    seeds = []
    for path in sorted(glob.glob(os.path.join(args.out, 'seed*', 'summary.json'))):
        with open(path) as f:
            s = json.load(f)
        seeds += [s] if (s['steps'], s['protocol'][:4], s['num_samples'], s['background']) == (
            args.steps, sampler[:4], args.num_samples, args.background) else []
    rows = [f"toy FD ({args.background} background), {len(seeds)} seed(s) "
            f"({', '.join(str(s['seed']) for s in seeds)}), {args.steps} steps, "
            f"ODE Euler {args.sample_steps} steps, no guidance, {args.num_samples} samples per checkpoint; "
            f"mean +- sd over seeds; steps to a target interpolated between checkpoints (log FD)", '',
            f'| method | FD at {half} | final FD (step {args.steps}) | steps to vanilla\'s FD at {half} '
            f'| steps to vanilla\'s final FD (per seed) | ms / step | ODE path length (shifted) |',
            '|---|---:|---:|---:|---|---:|---:|']
    for name in METHODS:
        ms = [s['methods'][name] for s in seeds]
        reach = ', '.join('never' if m['steps_to_vanilla_final'] is None else f"{m['steps_to_vanilla_final']:.0f}"
                          for m in ms)
        phases = (' (I ' + mean_sd([m['ms_per_step_phases'][0] for m in ms], '.0f') + ', II '
                  + mean_sd([m['ms_per_step_phases'][1] for m in ms], '.0f') + ')') if name == 'haste' else ''
        shifted = f" ({mean_sd([m['path_length_shifted'] for m in ms])})" if name == 'carflow' else ''
        rows.append(f"| {name} | {mean_sd([m['fd'][str(half)] for m in ms])} | {mean_sd([m['final'] for m in ms])} "
                    f"| {mean_sd([m['steps_to_vanilla_half'] for m in ms], '.0f')} "
                    f"| {reach} | {mean_sd([m['ms_per_step'] for m in ms], '.0f')}{phases} "
                    f"| {mean_sd([m['path_length'] for m in ms])}{shifted} |")
    # every checkpoint, mean +- sd over seeds: the whole curve in numbers (HASTE's around tau among them)
    steps = sorted(int(k) for k in summary['methods']['vanilla']['fd'])
    rows += ['', f'toy FD at every checkpoint, mean +- sd over {len(seeds)} seed(s) (HASTE stops aligning at {tau})',
             '',
             '| method | ' + ' | '.join(map(str, steps)) + ' |', '|---|' + '---:|' * len(steps)]
    rows += [f'| {name} | ' + ' | '.join(mean_sd([s['methods'][name]['fd'][str(k)] for s in seeds]) for k in steps)
             + ' |' for name in METHODS]
    table = '\n'.join(rows) + '\n'
    with open(os.path.join(args.out, 'toy_lab.md'), 'w') as f:
        f.write(table)
    print(table)

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in METHODS:
        steps = sorted(int(k) for k in seeds[0]['methods'][name]['fd'])
        fds = np.array([[s['methods'][name]['fd'][str(k)] for k in steps] for s in seeds])  # (seeds, points)
        line, = ax.plot(steps, fds.mean(0), 'o-', ms=3, label=name)
        ax.fill_between(steps, fds.min(0), fds.max(0), color=line.get_color(), alpha=0.2)
    ax.axvline(tau, color='grey', ls=':', lw=1)
    ax.text(tau, ax.get_ylim()[1], ' HASTE tau', va='top', fontsize=8, color='grey')
    ax.set(xlabel='training step', ylabel='toy FD', yscale='log',
           title=f'toy lab ({args.background} background): SiT-T/2, {len(seeds)} seed(s) (mean, band min-max)\n'
                 f'toy FD of {args.num_samples} samples, ODE Euler {args.sample_steps} steps, no CFG')
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, 'toy_lab.png'), dpi=120)
    plt.close(fig)
    print(f"[lab] done in {sit.format_time(time.time() - t_start)}: this seed's figure {figure} (table "
          f"{figure[:-4]}.md); over {len(seeds)} seed(s): figure {os.path.join(args.out, 'toy_lab.png')}, table "
          f"{os.path.join(args.out, 'toy_lab.md')}")
    return summary


if __name__ == '__main__':
    main()
