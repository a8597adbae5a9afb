"""
benchmark.py: training-step time of each method over vanilla's, measured in one run on one fixed config.

  python benchmark.py                        # CPU here: SiT-S/2 on ImageNet-shaped random data, batch 16
  python benchmark.py --model SiT-XL/2 --batch 64 --steps 50      # on a GPU machine: one GPU, bf16
  python benchmark.py --toy data/toy         # --preset toy on the toy set, its toy teacher, one thread each
  python benchmark.py --toy data/toy --enc-ckpt data/dinov2_small.safetensors   # the toy lab's setting

Each method's real script runs as its own process on the same synthetic prepared dataset (random 256 px images
and 4x32x32 latent moments, 1000 classes), with random-weight DINOv2-B teachers (speed does not depend on the
weights). The rate is read from the script's own log line after a warm-up interval, so data loading, the teacher,
the optimizer and the EMA are all in it. Ratios are what to compare; absolute numbers depend on the machine.
With --toy DATA the scripts run on the toy set instead: --preset toy (SiT-T/2, global batch 64) in DATA, one
thread per process (--model and --batch do not apply), aligned to its trained toy teacher; with --enc-ckpt PATH as
lab.py runs them: to DINOv2-S (those weights), its outputs read from DATA/cache-dinov2-s (lab.py makes it).

FLOPs: one training step of each script (its own main(), one process, 2 images) runs under torch's
FlopCounterMode, which counts matrix products, convolutions and attention, a multiply-add as 2 FLOPs (the DiT
paper's "Gflops" count it once: halve ours to compare). The teacher's forward is counted apart from the student's
step (forward, backward, projector). Each step time is then printed with its achieved TFLOP/s (student step +
teacher) and, on a GPU, the model-FLOPs utilisation against the device's dense bf16 peak (PEAK_TFLOPS, or
--peak-tflops).
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import prepare
import sit

ROOT = os.path.dirname(os.path.abspath(__file__))


def synthetic_imagenet(path, count, seed=0):
    rng = np.random.default_rng(seed)
    arrays = prepare.open_arrays(path, count, 256, 4, 32, np.float32)
    arrays['images'][:] = rng.integers(0, 256, size=arrays['images'].shape, dtype=np.uint8)
    arrays['moments'][:, :4] = rng.standard_normal((count, 4, 32, 32)) * 5
    arrays['moments'][:, 4:] = 0.1
    arrays['labels'][:] = rng.integers(0, 1000, size=count)
    for a in arrays.values():
        a.flush()
    # 'identity' only so no decoder is loaded: previews are off in the benchmark
    prepare.write_meta(path, resolution=256, autoencoder='identity', latent_scale=sit.VAE_SCALE, latent_channels=4,
                       latent_size=32, num_classes=1000, count=count)


# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins
PEAK_TFLOPS = [('B200', 2250), ('H200', 989), ('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989), ('A100', 312),
               ('L40S', 362), ('L4', 121)]

# torch's counter has no formula for the CPU attention kernel: the same count as for the GPU kernels
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def flop_counter():
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def forward_flops(model_name):
    """FLOPs of one SiT forward per image (ImageNet 256 latents, 4x32x32): one sampler step without CFG."""
    model, meta = sit.build_model(model_name).to('meta'), dict(device='meta')  # shapes only: nothing is computed
    with torch.no_grad(), flop_counter() as fc:
        model(torch.randn(1, 4, 32, 32, **meta), torch.rand(1, **meta), torch.zeros(1, dtype=torch.long, **meta))
    return fc.get_total_flops()


def step_flops(script, extra, data, out, model_name, batch=2):
    """FLOPs per image of one training step of train_<script>.py: its main() for one step of `batch` images, under
    the counter, with checkpoint writing switched off (the step is all that is counted). -> (student, teacher):
    the teacher's forward apart, everything else (forward, backward, projector, shift nets) in student."""
    train = importlib.import_module(f'train_{script}')
    argv = ['--data-path', data, '--out', out, '--model', model_name, '--global-batch', str(batch), '--max-steps', '1',
            '--sample-every', '0', '--num-workers', '0', *extra]
    if 'enc_ckpt' in train.config:
        argv += ['--enc-ckpt', 'random']
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}  # main() sets them
    save, sit.save_training_state = sit.save_training_state, lambda *args, **kwargs: None
    try:
        with flop_counter() as fc, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.main(argv)
    finally:
        sit.save_training_state = save
        for s, h in handlers.items():
            signal.signal(s, h)
    teacher = sum(fc.get_flop_counts().get('Teacher', {}).values())
    return (fc.get_total_flops() - teacher) / batch, teacher / batch


def peak_tflops(args):
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in PEAK_TFLOPS if key in name), None)
    if peak is None:
        print(f'{name}: no dense bf16 peak known; pass --peak-tflops for MFU', flush=True)
    return peak


def flops_line(label, student, teacher):
    """One line of the FLOPs block: a method's FLOPs per image, student step and teacher forward."""
    return f'  {label:9s} {student / 1e9:8.2f} G student + {teacher / 1e9:6.2f} G teacher'


def time_line(label, ratio, lo, hi, ms, tflops, mfu=None):
    """One line of the step-time block: the ratio to vanilla (median [min, max] over rounds), ms per step, TFLOP/s."""
    return (f'  {label:9s} {ratio:5.2f}x  [{lo:.2f}, {hi:.2f}]   {ms:8.1f} ms/step  {tflops:7.3f} TFLOP/s'
            + (f'  MFU {mfu:4.1f}%' if mfu is not None else ''))


# (label, script, extra flags): HASTE twice, before and after its switch at tau
RUNS = [('vanilla', 'vanilla', []), ('repa', 'repa', []), ('haste I', 'haste', ['--tau', str(10 ** 9)]),
        ('haste II', 'haste', ['--tau', '0']), ('reg', 'reg', []), ('carflow', 'carflow', [])]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='SiT-S/2')
    p.add_argument('--batch', type=int, default=16, help='global batch')
    p.add_argument('--steps', type=int, default=12, help='timed steps per method (after as many warm-up steps)')
    p.add_argument('--rounds', type=int, default=3, help='every method once per round; medians over rounds')
    p.add_argument('--only', help='comma-separated labels to run (vanilla always runs: it is the reference)')
    p.add_argument('--peak-tflops', type=float, help='dense bf16 peak of the GPU for MFU (default: PEAK_TFLOPS)')
    p.add_argument('--flops-only', action='store_true', help='count the FLOPs per image, skip the timing')
    p.add_argument('--toy', metavar='DATA', help="--preset toy on the toy set DATA (prepare.py toy --teacher), one "
                   "thread per process, aligned to its toy teacher")
    p.add_argument('--enc-ckpt', metavar='PATH', help="with --toy: lab.py's teacher, DINOv2-S with these weights, "
                   "read from its cache DATA/cache-dinov2-s")
    p.add_argument('--report', metavar='FILE', help='also write the result as markdown (the command, date, machine '
                   'and the lines printed), for docs/')
    args = p.parse_args()
    lines = []

    def say(line):  # printed now, and kept for --report
        print(line, flush=True)
        lines.append(line)
    teacher = []
    if args.toy and args.enc_ckpt:  # lab.py's teacher and its cache
        cache = os.path.join(args.toy, 'cache-dinov2-s')
        if not os.path.isfile(os.path.join(cache, 'cache.json')):
            sit.fail(f'--toy {args.toy} --enc-ckpt: no DINOv2-S cache in {cache}; run `python lab.py --enc-ckpt '
                     f'{args.enc_ckpt}` once, or python prepare.py teacher-cache --data {args.toy} --enc-ckpt ...')
        teacher = ['--enc', 'dinov2-s', '--enc-ckpt', args.enc_ckpt, '--enc-cache', cache]
    elif args.toy and not os.path.isfile(os.path.join(args.toy, 'teacher.json')):
        sit.fail(f'--toy {args.toy}: no toy set with its teacher there; make it: python prepare.py toy --out '
                 f'{args.toy} --teacher')
    if args.toy:
        preset = importlib.import_module('train_vanilla').presets['toy']
        args.model, args.batch = preset['model'], preset['global_batch']
    peak = peak_tflops(args)
    runs = [r for r in RUNS if os.path.exists(os.path.join(ROOT, f'train_{r[1]}.py'))
            and (not args.only or r[0] == 'vanilla' or r[0] in args.only.split(','))]
    toy = ['--preset', 'toy'] if args.toy else []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.toy or os.path.join(tmp, 'data')
        if not args.toy:
            synthetic_imagenet(data, 2 * args.steps * args.batch)
            say(f'{args.model} FLOPs per image (a multiply-add = 2 FLOPs): forward '
                f'{forward_flops(args.model) / 1e9:.1f} G; one training step:')
        else:
            say(f'{args.model} on the toy set, FLOPs per image (a multiply-add = 2 FLOPs) of one training step:')
        flops = {}
        for label, script, extra in runs:
            flops[label] = step_flops(script, toy + extra, data, os.path.join(tmp, 'flops-' + label.replace(' ', '_')),
                                      args.model)
            say(flops_line(label, *flops[label]))
        if args.flops_only:
            return report(args, lines)
        rates = {label: [] for label, _, _ in runs}
        for k in range(args.rounds):  # interleaved, so a drift of the machine's speed hits every method alike
            for label, script, extra in runs:
                out = os.path.join(tmp, f'{label}-{k}'.replace(' ', '_'))
                cmd = [sys.executable, os.path.join(ROOT, f'train_{script}.py'), *toy, '--data-path', data,
                       '--out', out, '--model', args.model, '--global-batch', str(args.batch),
                       '--max-steps', str(2 * args.steps),
                       '--log-every', str(args.steps), '--sample-every', '0', '--ckpt-every', str(10 ** 9),
                       '--num-workers', '0' if args.toy else '2', *extra]
                if 'enc_ckpt' in importlib.import_module(f'train_{script}').config:
                    cmd += teacher if args.toy else ['--enc-ckpt', 'random']  # ImageNet: a random one, the same cost
                env = dict(os.environ, OMP_NUM_THREADS='1') if args.toy else None  # as lab.py runs them
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode:
                    sys.exit(f'{label} failed:\n{r.stderr[-2000:]}')
                with open(os.path.join(out, 'metrics.jsonl')) as f:
                    rates[label].append([json.loads(line) for line in f][-1]['img_per_s'])  # after warm-up
                print(f'round {k + 1}: {label:9s} {rates[label][-1]:8.2f} img/s', flush=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print()
    say(f'{args.model}, global batch {args.batch}, {args.rounds} rounds: step time relative to vanilla '
        f'(median of the per-round ratios [min, max]); achieved TFLOP/s of student step + teacher'
        + (f', MFU against {peak:g} TFLOP/s' if peak else ''))
    for label, _, _ in runs:
        ratios = [v / m for v, m in zip(rates['vanilla'], rates[label])]
        tflops = sum(flops[label]) * median(rates[label]) / 1e12
        say(time_line(label, median(ratios), min(ratios), max(ratios), args.batch / median(rates[label]) * 1000,
                      tflops, 100 * tflops / peak if peak else None))
    report(args, lines)


def report(args, lines):
    """--report FILE: the command, its date and machine, then what it printed, as a markdown block."""
    if args.report:
        sit.write_report(args.report, f'python benchmark.py {shlex.join(sys.argv[1:])}', lines)


if __name__ == '__main__':
    main()
