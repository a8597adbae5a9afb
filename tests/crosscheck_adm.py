"""fid.py's metric arithmetic against ADM's TensorFlow evaluator (openai/guided-diffusion evaluations/evaluator.py),
on the same random features. Not part of the test suite: it needs TensorFlow and ADM's file; docs/measurements.md
gives the commands and the numbers.

What it covers: FID, sFID, IS, precision and recall computed from the same feature arrays by both, and the resize
of uint8 images to 299 px. Not the Inception network: its weights cannot be downloaded here, so ADM's two functions
that load its graph are replaced by the ops the evaluator runs on their outputs (the graph's ResizeBilinear for
the features, which are then the resized images themselves; matmul + softmax with our random fc weight for IS).
Everything else is ADM's unmodified code in a tf.compat.v1 session, as its main() runs it.

  python tests/crosscheck_adm.py inputs  --out DIR [--seed 0] [--config small|standard]   # any Python with numpy
  python tests/crosscheck_adm.py fidpy   --out DIR            # this repo's venv (torch): fid.py's numbers
  TF/bin/python tests/crosscheck_adm.py adm --out DIR --evaluator guided-diffusion/evaluations/evaluator.py
  python tests/crosscheck_adm.py compare --out DIR [--report FILE]   # the table (FILE: markdown for docs/)

Features: 'pool' (2048-d, softplus of a clustered low-rank Gaussian: non-negative, squared norms in the hundreds to
about 1350, the table says, so ADM's float16 distances stay finite), 'spatial' (2023-d, post-ReLU); the samples drop 30 of
the reference's 100 clusters and shift the others. small: 2000 reference x 1000 samples; standard: 10,000 x 50,000
(ADM's ImageNet setting, 10 IS splits).
"""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np

CONFIGS = {'small': (2000, 1000), 'standard': (10_000, 50_000)}


def make_inputs(out, seed, config):
    rng = np.random.default_rng([seed, list(CONFIGS).index(config)])

    def pair(dim, relu, r=64, k=100):  # reference and sample features of one kind
        centers, proj = rng.standard_normal((k, r)), rng.standard_normal((r, dim)) / np.sqrt(r)

        def draw(n, c):
            z = c[rng.integers(len(c), size=n)] + 0.5 * rng.standard_normal((n, r))       # (n, r)
            g = z @ proj + 0.3 * rng.standard_normal((n, dim)) - 1.0                     # (n, dim)
            return (np.maximum(g, 0) if relu else np.logaddexp(0, g)).astype(np.float32)
        return draw(n_ref, centers), draw(n_sample, centers[:70] + 0.15 * rng.standard_normal((70, r)))
    n_ref, n_sample = CONFIGS[config]
    ref_pool, sample_pool = pair(2048, False)
    ref_spatial, sample_spatial = pair(2023, True)
    np.savez(os.path.join(out, 'inputs.npz'), ref_pool=ref_pool, sample_pool=sample_pool, ref_spatial=ref_spatial,
             sample_spatial=sample_spatial, fc_weight=(0.25 * rng.standard_normal((1008, 2048))).astype(np.float32),
             images=rng.integers(0, 256, size=(4, 256, 256, 3), dtype=np.uint8), seed=seed, config=config)


def fidpy_side(out):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fid
    z = np.load(os.path.join(out, 'inputs.npz'))
    stats = {f'{s}_{k}': fid.gaussian_stats(z[f'{s}_{k}']) for s in ('sample', 'ref') for k in ('pool', 'spatial')}
    res = {'fid': fid.frechet_distance(*stats['sample_pool'], *stats['ref_pool']),        # as fid.evaluate
           'sfid': fid.frechet_distance(*stats['sample_spatial'], *stats['ref_spatial'])}
    with fid.exact_fp32('cpu'):  # as fid.evaluate: IS from pool @ fc.weight^T
        res['inception_score'] = fid.inception_score(torch.from_numpy(z['sample_pool']) @ torch.from_numpy(z['fc_weight']).T)
    res['precision'], res['recall'] = fid.precision_recall(z['ref_pool'], z['sample_pool'], device='cpu')
    x = torch.from_numpy(z['images']).permute(0, 3, 1, 2).float()                          # (4, 3, 256, 256)
    np.save(os.path.join(out, 'fidpy_resize.npy'), fid.tf1_resize(x, (299, 299)).permute(0, 2, 3, 1).numpy())
    json.dump({k: float(v) for k, v in res.items()}, open(os.path.join(out, 'fidpy.json'), 'w'), indent=1)


def adm_side(out, evaluator):
    import tensorflow.compat.v1 as tf
    spec = importlib.util.spec_from_file_location('adm_evaluator', evaluator)
    adm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adm)
    z = np.load(os.path.join(out, 'inputs.npz'))
    fc, float64 = np.ascontiguousarray(z['fc_weight'].T), [False]                         # (2048, 1008)

    def features(image_input):  # the graph's ResizeBilinear (its 2015 node: no half-pixel centres)
        r = tf.raw_ops.ResizeBilinear(images=image_input, size=tf.constant([299, 299]), align_corners=False,
                                      half_pixel_centers=False)
        return r, r

    def softmax(pool):  # ADM's matmul + softmax on the graph's logits weight (ours: random)
        w = tf.constant(fc)
        if float64[0]:
            pool, w = tf.cast(pool, tf.float64), tf.cast(w, tf.float64)
        return tf.nn.softmax(tf.matmul(pool, w))
    adm._create_feature_graph, adm._create_softmax_graph = features, softmax

    def evaluator_():
        config = tf.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True
        return adm.Evaluator(tf.Session(config=config))
    ev, res = evaluator_(), {}
    for kind, key in (('pool', 'fid'), ('spatial', 'sfid')):
        res[key] = float(ev.compute_statistics(z[f'sample_{kind}']).frechet_distance(
            ev.compute_statistics(z[f'ref_{kind}'])))
    res['inception_score'] = float(ev.compute_inception_score(z['sample_pool']))
    res['precision'], res['recall'] = map(float, ev.compute_prec_recall(z['ref_pool'], z['sample_pool']))
    resized, _ = ev.compute_activations([z['images']])
    np.save(os.path.join(out, 'adm_resize.npy'), resized.reshape(-1, 299, 299, 3))

    class Float16As32:  # ADM's DistanceBlock built with tf.float16 meaning float32: its distances in float32
        def __getattr__(self, name):
            return tf.float32 if name == 'float16' else getattr(tf, name)
    adm.tf = Float16As32()
    ev.manifold_estimator = adm.ManifoldEstimator(ev.sess)
    adm.tf = tf
    res['precision_fp32_distances'], res['recall_fp32_distances'] = map(
        float, ev.compute_prec_recall(z['ref_pool'], z['sample_pool']))
    float64[0] = True
    res['inception_score_fp64'] = float(evaluator_().compute_inception_score(z['sample_pool']))
    res['tensorflow'] = tf.__version__ if hasattr(tf, '__version__') else tf.version.VERSION
    json.dump(res, open(os.path.join(out, 'adm.json'), 'w'), indent=1)


def compare(out):
    """The lines of the comparison table (printed, and written by --report)."""
    lines = []
    z = np.load(os.path.join(out, 'inputs.npz'))
    adm, ours = (json.load(open(os.path.join(out, f))) for f in ('adm.json', 'fidpy.json'))
    n_ref, n_sample = len(z['ref_pool']), len(z['sample_pool'])
    lines += [f"{z['config']}: {n_ref} reference x {n_sample} samples, seed {int(z['seed'])}; ADM on TensorFlow "
              f"{adm['tensorflow']}", '', '| metric | ADM | fid.py | fid.py - ADM | relative |', '|---|---:|---:|---:|---:|']
    rows = [(k, k, k) for k in ('fid', 'sfid', 'inception_score', 'precision', 'recall')]
    rows += [('inception_score', 'inception_score_fp64', 'IS, ADM in float64'),
             ('precision', 'precision_fp32_distances', 'precision, ADM with float32 distances'),
             ('recall', 'recall_fp32_distances', 'recall, ADM with float32 distances')]
    for ours_key, adm_key, label in rows:
        a, b = adm[adm_key], ours[ours_key]
        lines.append(f'| {label} | {a:.10g} | {b:.10g} | {b - a:+.3g} | {abs(b - a) / abs(a):.2g} |')
    a, b = np.load(os.path.join(out, 'adm_resize.npy')), np.load(os.path.join(out, 'fidpy_resize.npy'))
    norms = (np.concatenate([z['ref_pool'], z['sample_pool']]).astype(np.float64) ** 2).sum(1)
    lines += ['', f'pool features, squared norms: {norms.min():.0f} to {norms.max():.0f}, median {np.median(norms):.0f} '
                  f'(small enough for the float16 distances of ADM\'s DistanceBlock)']
    lines += [f'resize 256 -> 299 px of 4 random uint8 images: max |fid.py - ADM| = {np.abs(a - b).max():.3g}, '
                  f'bit-identical: {np.array_equal(a, b)}']
    return lines


def report(args):
    lines = compare(args.out)
    print('\n'.join(lines))
    if args.report:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import sit  # torch: only here, the adm step runs in TensorFlow's environment without it
        sit.write_report(args.report, 'python tests/crosscheck_adm.py ' + ' '.join(sys.argv[1:]), lines)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('step', choices=['inputs', 'fidpy', 'adm', 'compare'])
    p.add_argument('--out', required=True)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--config', default='small', choices=list(CONFIGS))
    p.add_argument('--evaluator', help="adm: the path of guided-diffusion's evaluations/evaluator.py")
    p.add_argument('--report', metavar='FILE', help='compare: also write the table as markdown (command, date, machine)')
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    {'inputs': lambda: make_inputs(a.out, a.seed, a.config), 'fidpy': lambda: fidpy_side(a.out),
     'adm': lambda: adm_side(a.out, a.evaluator), 'compare': lambda: report(a)}[a.step]()
