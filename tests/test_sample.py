"""sample.py on tiny toy checkpoints: the npz format, world-size independence, resume, every checkpoint layout
(ours, our REPA, REPA/HASTE releases, the SiT convention), the preview grid and the one-line errors."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, one_line_error

import prepare
import sample
import sit
import train_vanilla

FAST = ['--num-steps', '4', '--batch-size', '3']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Toy data (40 images, 16 px) and a SiT-T/8 vanilla checkpoint. Two training steps leave the adaLN-Zero
    layers near zero (velocity ~ 0 whatever t and y), so the EMA weights are perturbed to make every test bite."""
    # one thread: as fast as two for these tiny models, far faster on a loaded machine, and the same reduction
    # order as the OMP_NUM_THREADS=1 subprocesses (so their samples can be compared bitwise)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp('sample')
    toy = str(tmp / 'toy')
    prepare.prepare_toy(toy, per_class=4, resolution=16)
    train_vanilla.main(['--data-path', toy, '--out', str(tmp / 'run'), '--model', 'SiT-T/8', '--max-steps', '2',
                        '--sample-every', '0', '--num-workers', '0', '--global-batch', '8', '--ckpt-every', '1000'])
    path = str(tmp / 'run' / 'checkpoints' / '0000002.pt')
    ckpt = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt['ema'].items():
        if k != 'pos_embed':
            v.add_(0.1 * torch.randn(v.shape, generator=g))
    sit.save_checkpoint(path, ckpt)
    yield dict(tmp=tmp, toy=toy, ckpt=path)
    torch.set_num_threads(threads)


def run(ckpt, out, *extra):
    return sample.main(['--ckpt', str(ckpt), '--sample-dir', str(out), *FAST, *extra])


def npz(folder):
    with np.load(folder + '.npz') as f:
        return f['arr_0']


@pytest.fixture(scope='module')
def reference(env):
    """Our vanilla checkpoint sampled in this process: 5 samples, ODE with CFG (labels matter)."""
    return npz(run(env['ckpt'], env['tmp'] / 'ref', '--num-samples', '5', '--mode', 'ode', '--cfg-scale', '2'))


def test_npz_two_processes_equal_one(env):
    """7 samples (not divisible by 2 ranks x batch 2): exact count, ADM format, same images as one process."""
    flags = ['--ckpt', env['ckpt'], '--num-samples', '7', '--batch-size', '2', '--num-steps', '4',
             '--mode', 'sde', '--cfg-scale', '1.8', '--guidance-high', '0.7']
    two, one = env['tmp'] / 'two', env['tmp'] / 'one'
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
                    'sample.py', *flags, '--sample-dir', str(two)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                   check=True, capture_output=True)
    sample.main(flags + ['--sample-dir', str(one)])  # in this process, also one thread (see env)
    name = '0000002-ema-sde4-cfg1.8-g0.0-0.7-seed0'
    assert sorted(os.listdir(two / name)) == [f'{i:06d}.png' for i in range(7)]
    a, b = npz(str(two / name)), npz(str(one / name))
    assert a.dtype == np.uint8 and a.shape == (7, 16, 16, 3)
    assert np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 7  # distinct noise per index


def test_resume_regenerates_only_missing(env):
    folder = run(env['ckpt'], env['tmp'] / 'resume', '--num-samples', '7', '--mode', 'sde')
    before = npz(folder)
    stat = lambda i: os.stat(os.path.join(folder, f'{i:06d}.png'))
    # 1 and 5 sit in batches [0, 3) and [3, 6): their neighbours are resampled but must not be rewritten
    kept = {i: (stat(i).st_ino, stat(i).st_mtime_ns) for i in (0, 2, 3, 4, 6)}
    for i in (1, 5):
        os.remove(os.path.join(folder, f'{i:06d}.png'))
    run(env['ckpt'], env['tmp'] / 'resume', '--num-samples', '7', '--mode', 'sde')
    assert {i: (stat(i).st_ino, stat(i).st_mtime_ns) for i in kept} == kept
    assert np.array_equal(npz(folder), before)
    assert not [f for f in os.listdir(folder) if not f.endswith('.png')]  # no tmp files left behind


def test_class_balanced_labels(env, monkeypatch):
    """--class-balanced: 20 samples of 10 classes, 2 per class, in the run itself; the same noise as uniform labels."""
    y = sample.balanced_labels(20, 10, seed=0)
    assert torch.bincount(y).tolist() == [2] * 10 and not torch.equal(y, torch.arange(20) % 10)
    assert torch.equal(y, sample.balanced_labels(20, 10, seed=0))
    [z1], y1 = sample.draw_inputs(range(4), 0, [(3, 16, 16)], 10)
    [z2], y2 = sample.draw_inputs(range(2, 4), 0, [(3, 16, 16)], 10)
    assert torch.equal(z1[2:], z2) and torch.equal(y1[2:], y2)  # keyed by global index
    seen, real = [], sit.sample
    monkeypatch.setattr(sit, 'sample', lambda net, z, y, **kw: seen.append(y) or real(net, z, y, **kw))
    run(env['ckpt'], env['tmp'] / 'bal', '--num-samples', '20', '--mode', 'ode', '--num-steps', '1', '--class-balanced')
    assert torch.bincount(torch.cat(seen), minlength=10).tolist() == [2] * 10


def test_precision_and_pixel_protocol(env, reference):
    """Default = REPA's generate.py: fp32 and truncated pixels. --round rounds the same values (never darker,
    at most one level brighter); --bf16 runs the network under bf16 autocast (the GPU code path) and moves pixels."""
    common = ['--num-samples', '5', '--mode', 'ode', '--cfg-scale', '2']
    rounded = npz(run(env['ckpt'], env['tmp'] / 'round', *common, '--round'))
    diff = rounded.astype(int) - reference.astype(int)
    inner = (reference > 0) & (reference < 254)                               # not clamped
    assert diff.min() == 0 and diff.max() == 1 and 0.3 < diff[inner].mean() < 0.7   # ~half round up
    bf16 = run(env['ckpt'], env['tmp'] / 'bf16', *common, '--bf16')
    assert bf16.endswith('-bf16') and not np.array_equal(npz(bf16), reference)
    assert np.abs(npz(bf16).astype(int) - reference.astype(int)).mean() < 8


def test_our_repa_checkpoint_samples(env, reference):
    """method 'repa' with projectors in model_args and state dict: loads strictly, samples as its trunk."""
    ckpt = torch.load(env['ckpt'], weights_only=True)
    args = dict(ckpt['model_args'], z_dims=[32], projector_dim=16, encoder_depth=2)
    model = sit.build_model('SiT-T/8', **args)
    assert model.load_state_dict(ckpt['ema'], strict=False).missing_keys  # only the projector is new
    repa = dict(ckpt, ema=model.state_dict(), model=model.state_dict(), model_args=args,
                config=dict(ckpt['config'], method='repa'))
    path = env['tmp'] / 'repa.pt'
    torch.save(repa, path)
    out = run(path, env['tmp'] / 'repa', '--num-samples', '5', '--mode', 'ode', '--cfg-scale', '2')
    assert np.array_equal(npz(out), reference)


@pytest.mark.parametrize('layout', ['raw', 'ema'])
def test_released_state_dict(env, reference, layout):
    """REPA / HASTE layout: raw state dict or {'ema': sd, 'args': Namespace}, with projector keys (dropped)."""
    ckpt = torch.load(env['ckpt'], weights_only=True)
    model = sit.SiT(input_size=16, patch_size=8, in_channels=3, hidden_size=128, depth=6, num_heads=4,
                    num_classes=10, z_dims=[32], projector_dim=16, encoder_depth=2)
    model.load_state_dict(ckpt['ema'], strict=False)
    sd = model.state_dict()
    obj = sd if layout == 'raw' else {'ema': sd, 'opt': {}, 'args': argparse.Namespace(model='SiT-T/8'), 'steps': 2}
    path = env['tmp'] / f'released-{layout}.pt'
    torch.save(obj, path)
    out = run(path, env['tmp'] / f'rel-{layout}', '--model', 'SiT-T/8', '--data-path', env['toy'],
              '--num-samples', '5', '--mode', 'ode', '--cfg-scale', '2')
    assert os.path.basename(out).startswith(f'released-{layout}-{layout}-ode4')
    assert np.array_equal(npz(out), reference)


class SiTConvention(sit.SiT):
    """A network trained in the original SiT direction: v_sit(x, t) = -v_ours(x, 1 - t)."""

    def forward(self, x, t, y, **kw):
        v, aux = super().forward(x, 1 - t, y, **kw)
        return -v, aux


@pytest.mark.parametrize('mode', ['ode', 'sde'])
def test_sit_convention_flag(env, monkeypatch, mode):
    flags = ['--ckpt', env['ckpt'], '--mode', mode, '--num-steps', '4', '--cfg-scale', '2', '--guidance-high', '0.7']
    ours = sample.load_model(env['ckpt']).model
    monkeypatch.setitem(sit.SiT_models, 'SiT-T/8', lambda **kw: SiTConvention(
        depth=6, hidden_size=128, num_heads=4, patch_size=8, **kw))
    args = sample.parse_args(flags + ['--sit-convention'])
    flipped = sample.load_model(args.ckpt, sit_convention=args.sit_convention).model
    unflipped = sample.load_model(env['ckpt']).model
    [z], y = sample.draw_inputs(range(6), 0, [(3, 16, 16)], 10)

    def draw(model):
        sample.seed_batch(0, 0)
        return sit.sample(model, z, y, mode=mode, num_steps=4, cfg_scale=2, guidance_high=0.7)
    a, b = draw(ours), draw(flipped)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (draw(unflipped) - a).abs().max() > 0.1  # without the flag the same weights sample something else


def test_learn_sigma_state_dict_with_sit_convention(env):
    """The SiT release layout: 2C output channels (learn_sigma) detected from the final layer, then flipped."""
    model = sit.SiT(input_size=16, patch_size=8, in_channels=3, hidden_size=128, depth=6, num_heads=4,
                    num_classes=10, learn_sigma=True)
    path = env['tmp'] / 'SiT-T-8-16.pt'
    torch.save(model.state_dict(), path)
    out = run(path, env['tmp'] / 'sitconv', '--model', 'SiT-T/8', '--data-path', env['toy'], '--sit-convention',
              '--num-samples', '2', '--mode', 'ode', '--num-steps', '2')
    assert out.endswith('-sitconv') and npz(out).shape == (2, 16, 16, 3)


def test_grid(env, capsys):
    folder = env['tmp'] / 'grid'
    run(env['ckpt'], folder, '--grid', '2', '--classes', '1,3', '--mode', 'ode', '--cfg-scale', '3')
    [name] = os.listdir(folder)
    assert name.endswith('-grid2-classes1_3.png')
    from PIL import Image
    # 2 columns (classes) x 2 rows of 16 px images shown 4x (64 px), 2 px gaps
    assert Image.open(folder / name).size == (2 * 66 + 2, 2 * 66 + 2)
    assert '1 (green square), 3 (yellow cross)' in capsys.readouterr().out


def error(argv):
    return one_line_error(sample.main, argv)


def test_one_line_errors(env, tmp_path):
    toy, ckpt = env['toy'], env['ckpt']
    assert 'does not exist' in error(['--ckpt', str(tmp_path / 'nope.pt')])
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    msg = error(['--ckpt', str(tmp_path / 'junk.pt')])
    assert 'not a PyTorch checkpoint' in msg and 'weights_only=False' not in msg
    torch.save({'ema': np.zeros(3)}, tmp_path / 'pickled.pt')             # a pickled object: never unpickled
    msg = error(['--ckpt', str(tmp_path / 'pickled.pt')])
    assert 'pickled Python object (numpy.' in msg and 'weights_only=False' not in msg
    torch.save({'foo': 1}, tmp_path / 'other.pt')
    assert 'neither' in error(['--ckpt', str(tmp_path / 'other.pt')])
    sd = torch.load(ckpt, weights_only=True)['ema']
    torch.save(sd, tmp_path / 'sd.pt')
    assert '--model' in error(['--ckpt', str(tmp_path / 'sd.pt')])
    # wrong model size: shapes; ImageNet layout by default: 4 latent channels and 1000 classes do not fit
    msg = error(['--ckpt', str(tmp_path / 'sd.pt'), '--model', 'SiT-T/4', '--data-path', toy])
    assert 'wrong shape' in msg and 'x_embedder.proj.weight' in msg
    assert 'pos_embed (1, 4, 128)!=(1, 16, 128)' in error(['--ckpt', str(tmp_path / 'sd.pt'), '--model', 'SiT-T/8'])
    bad = {k.replace('blocks.5.', 'block.5.'): v for k, v in sd.items()}
    torch.save(bad, tmp_path / 'bad.pt')
    msg = error(['--ckpt', str(tmp_path / 'bad.pt'), '--model', 'SiT-T/8', '--data-path', toy])
    assert 'missing' in msg and "'blocks.5." in msg and "unexpected (e.g. ['block.5." in msg
    # our checkpoint whose dataset moved: clear error, then --data-path fixes it
    moved = torch.load(ckpt, weights_only=True)
    moved['config']['data_path'] = str(tmp_path / 'gone')
    torch.save(moved, tmp_path / 'moved.pt')
    assert 'pass --data-path' in error(['--ckpt', str(tmp_path / 'moved.pt')])
    assert 'holds a SiT-T/8' in error(['--ckpt', ckpt, '--model', 'SiT-B/8'])
    assert '--protocol carflow needs --cfg-scale' in error(['--ckpt', ckpt, '--protocol', 'carflow'])
    assert 'scales below 1' in error(['--ckpt', ckpt, '--cfg-scale', '0.5'])
    assert '--cfg-channels -1' in error(['--ckpt', ckpt, '--cfg-channels', '-1'])
    assert 'cfg_channels=4' in error(['--ckpt', ckpt, '--cfg-channels', '4', '--num-samples', '1', '--num-steps', '1',
                                      '--cfg-scale', '2', '--sample-dir', str(tmp_path / 'ch4')])  # toy: 3 channels
    out = run(tmp_path / 'moved.pt', tmp_path / 'out', '--data-path', toy, '--num-samples', '1', '--mode', 'ode')
    assert npz(out).shape == (1, 16, 16, 3)


# -----------------------------------------------------------------------------
# --protocol: each published evaluation by name, on the toy checkpoint (2 samples, the protocol's full step count)

# what each paper's official evaluation runs, written out independently of sample.PROTOCOLS (sources there)
PUBLISHED = {
    'repa': dict(mode='sde', num_steps=250, heun=False, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7,
                 cfg_channels=0, cls_cfg_scale=None),
    'repa-nocfg': dict(mode='sde', num_steps=250, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                       cfg_channels=0, cls_cfg_scale=None),
    'haste': dict(mode='sde', num_steps=250, heun=False, cfg_scale=1.65, guidance_low=0.0, guidance_high=0.72,
                  cfg_channels=0, cls_cfg_scale=None),
    'reg': dict(mode='sde', num_steps=250, heun=False, cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85,
                cfg_channels=0, cls_cfg_scale=2.3),
    'sit': dict(mode='sde', num_steps=250, heun=False, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
                cfg_channels=3, cls_cfg_scale=None),
    'carflow': dict(mode='sde', num_steps=125, heun=True, cfg_scale=1.3, guidance_low=0.0, guidance_high=1.0,
                    cfg_channels=3, cls_cfg_scale=None),             # 1.3: carflow's scale must be given
}


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_protocol_sets_the_published_flags(env, monkeypatch, capsys, name):
    """sample.py --protocol NAME on a toy checkpoint: the sampler receives the published settings, the pixels and
    the 50K count follow the official script, and the log and folder name carry the protocol and its overrides."""
    seen, real = [], sit.sample
    monkeypatch.setattr(sit, 'sample', lambda net, z, y, **kw: seen.append(kw) or real(net, z, y, **kw))
    extra = ['--cfg-scale', '1.3'] if name == 'carflow' else []
    argv = ['--ckpt', env['ckpt'], '--protocol', name, '--num-samples', '2', '--batch-size', '2', *extra]
    folder = sample.main(argv + ['--sample-dir', str(env['tmp'] / 'proto')])
    assert seen == [PUBLISHED[name]]
    args = sample.parse_args(argv)
    assert args.protocol == name and args.overrides == ['--num-samples'] and args.weights == 'ema'
    assert args.round == (name in ('sit', 'carflow')) and not args.bf16 and not args.class_balanced
    assert sample.parse_args(['--ckpt', env['ckpt'], '--protocol', name, *extra]).num_samples == 50_000
    assert f'-ema-{name}-' in os.path.basename(folder) and npz(folder).shape == (2, 16, 16, 3)
    evals = 249 if name == 'carflow' else 250
    out = capsys.readouterr().out
    assert f'= {evals} network evaluations per sample' in out and f'protocol {name} (overridden: --num-samples)' in out


def test_protocol_overrides_and_no_protocol():
    """Flags given with a protocol win and are recorded when they differ from it; without one nothing is recorded."""
    args = sample.parse_args(['--ckpt', 'x.pt', '--protocol', 'sit', '--cfg-scale', '1.5', '--guidance-high', '0.8',
                              '--no-round', '--cfg-channels', '0'])
    assert (args.cfg_scale, args.guidance_high, args.round, args.cfg_channels) == (1.5, 0.8, False, 0)
    assert args.overrides == ['--cfg-channels', '--guidance-high', '--round']    # 1.5 is sit's own scale
    plain = sample.parse_args(['--ckpt', 'x.pt', '--mode', 'ode', '--heun'])
    assert plain.protocol is None and plain.overrides == [] and plain.num_steps == 50 and plain.cfg_channels == 0
    assert sample.folder_name(plain, 'c', 'ema', False) == 'c-ema-heun50-cfg1.0-g0.0-1.0-seed0'
    sde_heun = sample.parse_args(['--ckpt', 'x.pt', '--heun', '--num-steps', '125', '--cfg-channels', '3'])
    assert sample.folder_name(sde_heun, 'c', 'ema', False) == 'c-ema-sdeheun125-cfg1.0-g0.0-1.0-seed0-cfgch3'


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(['--help'])
    assert e.value.code == 0 and '--cfg-scale' in capsys.readouterr().out
