"""
benchmark.py: training-step time of each method over vanilla's, measured in one run on one fixed config.

  python benchmark.py                        # CPU here: SiT-S/2 on ImageNet-shaped random data, batch 16
  python benchmark.py --model SiT-XL/2 --batch 64 --steps 50      # on a GPU machine: one GPU, bf16

Each method's real script runs as its own process on the same synthetic prepared dataset (random 256 px images
and 4x32x32 latent moments, 1000 classes), with random-weight DINOv2-B teachers (speed does not depend on the
weights). The rate is read from the script's own log line after a warm-up interval, so data loading, the teacher,
the optimizer and the EMA are all in it. Ratios are what to compare; absolute numbers depend on the machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import prepare
import sit

METHODS = ['vanilla', 'repa', 'haste', 'reg', 'carflow']
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='SiT-S/2')
    p.add_argument('--batch', type=int, default=16, help='global batch')
    p.add_argument('--steps', type=int, default=12, help='timed steps per method (after as many warm-up steps)')
    args = p.parse_args()
    scripts = [m for m in METHODS if os.path.exists(os.path.join(ROOT, f'train_{m}.py'))]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'data')
        synthetic_imagenet(data, 2 * args.steps * args.batch)
        rates = {}
        for m in scripts:
            cmd = [sys.executable, os.path.join(ROOT, f'train_{m}.py'), '--data-path', data, '--out',
                   os.path.join(tmp, m), '--model', args.model, '--global-batch', str(args.batch),
                   '--max-steps', str(2 * args.steps), '--log-every', str(args.steps), '--sample-every', '0',
                   '--ckpt-every', str(10 ** 9), '--num-workers', '2']
            if m != 'vanilla':
                cmd += ['--enc-ckpt', 'random']
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f'{m} failed:\n{r.stderr[-2000:]}')
            with open(os.path.join(tmp, m, 'metrics.jsonl')) as f:
                rates[m] = [json.loads(line) for line in f][-1]['img_per_s']  # the interval after warm-up
            print(f'{m:8s} {rates[m]:8.2f} img/s  {args.batch / rates[m] * 1000:8.1f} ms/step', flush=True)
    print(f'\n{args.model}, global batch {args.batch}: step time relative to vanilla')
    for m in scripts:
        print(f'  {m:8s} {rates["vanilla"] / rates[m]:5.2f}x')


if __name__ == '__main__':
    main()
