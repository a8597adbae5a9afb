"""train_carflow.py: the loss in shifted coordinates by hand and as the vanilla loss of the unshifted model, zero-init
shifts as vanilla, the samplers on Gaussian data with known shifts, the checkpoint round trip, a 2-process run."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import one_line_error, torchrun

import sample
import sit
import train_carflow
import train_vanilla

TINY = ['--model', 'SiT-T/8', '--global-batch', '16', '--lr', '1e-3', '--ema-decay', '0.9', '--log-every', '2',
        '--num-workers', '0', '--sample-every', '0', '--ckpt-every', '1000']


def tiny(shifts='joint', perturb=True):
    torch.manual_seed(0)
    model = sit.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                    shifts=shifts)
    if perturb:  # away from the zero init, so every term bites
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_shift_networks_are_small_and_start_at_zero():
    with torch.device('meta'):
        xl = sit.SiT_models['SiT-XL/2'](shifts='joint')
    extra = sum(p.numel() for n, p in xl.named_parameters() if n.startswith('shift_'))
    assert extra / (sum(p.numel() for p in xl.parameters()) - extra) == pytest.approx(0.0044, abs=5e-5)  # < 0.6%
    # the toy preset scales the width to the same budget of SiT-T/2 (unscaled, they were 60% of it)
    width = train_carflow.presets['toy']['shift_width']
    toy = sit.build_model('SiT-T/2', input_size=16, in_channels=3, num_classes=10, shifts='joint', shift_width=width)
    extra = sum(p.numel() for n, p in toy.named_parameters() if n.startswith('shift_'))
    assert (width, extra) == (12, 2 * 5571) and extra / (sum(p.numel() for p in toy.parameters()) - extra) < 0.006
    wide = sit.build_model('SiT-T/2', input_size=16, in_channels=3, num_classes=10, shifts='joint', shift_width=128)
    extra = sum(p.numel() for n, p in wide.named_parameters() if n.startswith('shift_'))
    assert round(100 * extra / (sum(p.numel() for p in wide.parameters()) - extra)) == 60   # the width they had
    model = tiny(perturb=False)
    mu0, mu1 = model.shifts(torch.tensor([0, 1, 4]))
    assert mu0.shape == mu1.shape == (3, 3, 8, 8) and mu0.abs().max() == 0 and mu1.abs().max() == 0
    assert tiny('source').shifts(torch.tensor([1]))[1] == 0.0 and tiny('target').shifts(torch.tensor([1]))[0] == 0.0
    with pytest.raises(SystemExit, match="shifts 'both'"):
        tiny('both')


def test_loss_by_hand_in_shifted_coordinates():
    model = tiny()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    torch.manual_seed(1)
    loss, _ = train_carflow.compute_loss(model, x, y)
    torch.manual_seed(1)
    t, eps = torch.rand(3), torch.randn(3, 3, 8, 8)
    by_hand = 0.0
    for i in range(3):
        mu0 = model.shift_source(y[i:i + 1])[0]
        mu1 = model.shift_target(y[i:i + 1])[0]
        z0, z1 = eps[i] + mu0, x[i] + mu1                                  # shifted noise, shifted data
        zt = (1 - t[i]) * z1 + t[i] * z0
        v = model(zt[None], t[i:i + 1], y[i:i + 1], shifted=True)[0][0]
        by_hand += ((v - (z0 - z1)) ** 2).mean() / 3
    assert torch.allclose(loss, by_hand, atol=1e-6)
    # no stop-gradient: both shift networks get gradients, through the input and through the target
    loss.backward()
    assert model.shift_source.out.weight.grad.abs().sum() > 0 and model.shift_target.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('shifts', ['source', 'target', 'joint'])
def test_loss_is_the_vanilla_loss_of_the_unshifted_model(shifts):
    """v(x_t + mu_t) - (mu0 - mu1) is the ordinary velocity: the vanilla loss on it equals CAR-Flow's, term for
    term (same t and eps), and so do the gradients."""
    model = tiny(shifts)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    losses, grads = [], []
    for fn in (train_carflow.compute_loss, train_vanilla.compute_loss):
        model.zero_grad()
        torch.manual_seed(2)
        loss, _ = fn(model, x, y)
        loss.backward()
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_first_step_is_vanilla(toy, tmp_path):
    """Zero-initialised shifts: step 1 has vanilla's loss and moves the SiT trunk exactly as vanilla does (clipping
    off, since the shifts' own gradients would enter the global norm; AdamW is per parameter)."""
    flags = ['--data-path', toy, *TINY, '--max-steps', '1', '--log-every', '1', '--grad-clip', '1e9']
    v = train_vanilla.main(flags + ['--out', str(tmp_path / 'v')])
    c = train_carflow.main(flags + ['--out', str(tmp_path / 'c')])
    loss = [json.loads(open(tmp_path / d / 'metrics.jsonl').read())['loss'] for d in 'vc']
    assert loss[0] == pytest.approx(loss[1], rel=1e-6)
    cs = c.state_dict()
    assert all(torch.allclose(p, cs[k], atol=1e-7) for k, p in v.state_dict().items())
    assert cs['shift_source.out.weight'].abs().max() > 0                    # the shifts started learning


def test_shifts_flag_takes_only_the_three_variants(toy, tmp_path, capsys):
    """'' is SiT's "no shift networks": passed through (an unset shell variable), it trained plain SiT that
    config.json called carflow. Refused in one line, like any other value, before anything is written."""
    for bad in ('', 'both', 'Joint'):
        msg = one_line_error(train_carflow.main, ['--data-path', toy, '--out', str(tmp_path / 'x'), *TINY,
                                                  '--max-steps', '1', '--shifts', bad])
        assert f"--shifts {bad!r}" in msg and 'source' in msg and 'target' in msg and 'joint' in msg
    assert capsys.readouterr() == ('', '') and not (tmp_path / 'x').exists()


def test_zero_shifts_sample_as_vanilla():
    plain, shifted = tiny(''), tiny('joint', perturb=False)
    shifted.load_state_dict({**shifted.state_dict(), **plain.state_dict()})  # same trunk, shifts still zero
    z, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for mode in ('ode', 'sde'):
        out = []
        for m in (plain, shifted):
            torch.manual_seed(3)
            out.append(sit.sample(m, z, y, mode=mode, num_steps=6, cfg_scale=2.0, guidance_high=0.7))
        assert torch.equal(out[0], out[1]), mode


# -----------------------------------------------------------------------------
# samplers on Gaussian data with known constant shifts

M, S = [2.0, -1.0, 0.0], [0.5, 1.5, 1.0]                                     # per class: data N(m, s^2); 2 = null
MU0, MU1 = [1.5, -2.0, 0.3], [-0.7, 0.4, 0.2]                                # constant shifts per class


class ShiftedGaussian(torch.nn.Module):
    """The exact velocity of CAR-Flow's shifted path for Gaussian data: z1 = x + mu1 ~ N(m + mu1, s^2), z0 = eps +
    mu0 ~ N(mu0, 1), z_t = (1 - t) z1 + t z0, v = E[z0 - z1 | z_t]. In ordinary coordinates it runs through
    sit.unshifted_velocity, the code SiT uses."""
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.m, self.s, self.mu0, self.mu1 = (torch.tensor(v) for v in (M, S, MU0, MU1))

    def shifts(self, y):
        return self.mu0[y].view(-1, 1), self.mu1[y].view(-1, 1)

    def forward(self, z, t, y, shifted=False):
        if not shifted:
            return sit.unshifted_velocity(self, z, t, y)
        m1, s2, m0 = (self.m[y] + self.mu1[y]).view(-1, 1), self.s[y].view(-1, 1) ** 2, self.mu0[y].view(-1, 1)
        t = t.view(-1, 1).double()
        mean, var, cov = (1 - t) * m1 + t * m0, (1 - t) ** 2 * s2 + t ** 2, t - (1 - t) * s2
        return ((m0 - m1) + cov / var * (z - mean)).float(), {}


class Gaussian(torch.nn.Module):
    """The ordinary exact velocity E[eps - x | x_t] of the same data, no shifts."""
    num_classes = 2

    def forward(self, x, t, y):
        m, s2, t = torch.tensor(M)[y].view(-1, 1), torch.tensor(S)[y].view(-1, 1) ** 2, t.view(-1, 1).double()
        var, cov = (1 - t) ** 2 * s2 + t ** 2, t - (1 - t) * s2
        return (-m + cov / var * (x - (1 - t) * m)).float(), {}


def test_ode_is_the_papers_sampler():
    """Euler on the unshifted model = Euler from eps + mu0 on the shifted field, minus mu1 at the end."""
    model, y = ShiftedGaussian(), torch.arange(600) % 2
    eps = torch.randn(600, 2)
    x = sit.euler_sampler(model, eps, y, num_steps=20)
    mu0, mu1 = model.shifts(y)
    z, ts = eps + mu0, np.linspace(1, 0, 21)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = z + (t1 - t0) * model(z, torch.full((600,), t0), y, shifted=True)[0]
    assert x.shape == eps.shape and torch.allclose(x, z - mu1, atol=1e-5)


@pytest.mark.parametrize('mode', ['ode', 'sde'])
@pytest.mark.parametrize('cfg', [1.0, 2.5])
def test_samplers_with_known_shifts(mode, cfg):
    """With the exact shifted field, every sampler gives what it gives on the ordinary exact field (the same
    process: x_t = z_t - mu_t), CFG included with each half's own shifts; without CFG that is N(m, s^2)."""
    y = torch.arange(20000) % 2
    torch.manual_seed(0)
    eps = torch.randn(20000, 2)
    out = []
    for model in (ShiftedGaussian(), Gaussian()):
        torch.manual_seed(1)
        out.append(sit.sample(model, eps, y, mode=mode, num_steps=100 if mode == 'sde' else 50, cfg_scale=cfg,
                              guidance_high=0.8))
    assert out[0].shape == eps.shape and torch.allclose(out[0], out[1], atol=2e-4), (out[0] - out[1]).abs().max()
    if cfg == 1.0:
        for k in (0, 1):
            xk, se = out[0][y == k], S[k] / math.sqrt(20000)
            assert abs(xk.mean().item() - M[k]) < 4 * se + 0.01 * S[k]
            assert abs(xk.std().item() - S[k]) < 4 * se + 0.01 * S[k]


def test_shifts_computed_once_per_label_batch():
    """While sampling, the shifts are computed once for y and once for [y, null] (the CFG batch), not at every
    network call, and the samples are those of the field that recomputes them every time."""
    class Counting(ShiftedGaussian):
        has_shifts = True                                                    # what routes SiT through ShiftsOnce

        def __init__(self):
            super().__init__()
            self.calls = []

        def shifts(self, y):
            self.calls.append(len(y))
            return super().shifts(y)
    model, y, eps = Counting(), torch.arange(50) % 2, torch.randn(50, 2)
    out = []
    for m in (model, ShiftedGaussian()):
        torch.manual_seed(1)
        out.append(sit.sample(m, eps, y, mode='sde', num_steps=20, cfg_scale=2.5, guidance_high=0.8))
    assert sorted(model.calls) == [50, 100] and torch.equal(out[0], out[1])


# -----------------------------------------------------------------------------
# checkpoints and DDP

def test_checkpoint_round_trip_and_sample_py(toy, tmp_path):
    model = train_carflow.main(['--data-path', toy, '--out', str(tmp_path / 'run'), *TINY, '--max-steps', '3'])
    ckpt = torch.load(sit.latest_checkpoint(str(tmp_path / 'run')), weights_only=True)
    assert ckpt['model_args']['shifts'] == 'joint' and 'shift_target.out.weight' in ckpt['ema']
    again = sit.build_model('SiT-T/8', **ckpt['model_args'])
    again.load_state_dict(ckpt['model'])
    y = torch.arange(10)
    assert all(torch.equal(a, b) for a, b in zip(again.shifts(y), model.shifts(y)))
    assert model.shifts(y)[0].abs().max() > 0
    folder = sample.main(['--ckpt', str(tmp_path / 'run'), '--num-samples', '3', '--mode', 'ode', '--num-steps', '3',
                          '--cfg-scale', '2', '--sample-dir', str(tmp_path / 's')])     # no method flags needed
    assert np.load(folder + '.npz')['arr_0'].shape == (3, 16, 16, 3)


def test_two_ranks(toy, tmp_path):
    """2 processes: the shift networks run outside DDP's forward, yet their gradients are all-reduced: both ranks
    end with identical weights, shifts included, and the shifts have moved."""
    r = torchrun(tmp_path, 'train_carflow', ['--data-path', toy, '--out', tmp_path / 'run', *TINY, '--max-steps', '6'])
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert all(torch.equal(v, w1[k]) for k, v in w0.items())
    assert w0['shift_source.out.weight'].abs().max() > 0 and w0['shift_target.out.weight'].abs().max() > 0


# -----------------------------------------------------------------------------
# the paper's 1-D experiment, with train_carflow.compute_loss

class Flow1D(torch.nn.Module):
    """A small velocity MLP v(z, t, class) for 1-D data shaped (N, 1, 1, 1), with per-class learned shifts (zero at
    the start) for the sides the variant shifts; optionally learned per-class scales of noise and data."""

    def __init__(self, shifts, scales=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32),
                                       torch.nn.SiLU(), torch.nn.Linear(32, 1))
        self.mu0 = torch.nn.Parameter(torch.zeros(2), requires_grad=shifts in ('source', 'joint'))
        self.mu1 = torch.nn.Parameter(torch.zeros(2), requires_grad=shifts in ('target', 'joint'))
        self.log_scale = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=scales)   # (class, [noise, data])

    def shifts(self, y):
        return self.mu0[y].view(-1, 1, 1, 1), self.mu1[y].view(-1, 1, 1, 1)

    def forward(self, z, t, y, shifted=False):
        inp = torch.cat([z.view(-1, 1), t.view(-1, 1), torch.nn.functional.one_hot(y, 2).float()], dim=1)
        return self.net(inp).view(z.shape), {}


def scaled_loss(model, x, y):
    """CAR-Flow with learned scales too, z_noise = a(y) eps + mu0(y), z_data = b(y) x + mu1(y): what the paper warns
    against (and train_carflow.py does not offer)."""
    a, b = model.log_scale.exp()[y].view(-1, 2, 1, 1).unbind(1)
    t = torch.rand(x.shape[0]).view(-1, 1, 1, 1)
    mu0, mu1 = model.shifts(y)
    z0, z1 = a[:, None] * torch.randn_like(x) + mu0, b[:, None] * x + mu1
    return ((model((1 - t) * z1 + t * z0, t.flatten(), y, shifted=True)[0] - (z0 - z1)) ** 2).mean(), {}


def fit_1d(shifts, loss_fn, steps=800, seed=0):
    torch.manual_seed(seed)
    model = Flow1D(shifts, scales=loss_fn is scaled_loss)
    # the shifts learn at 10x the network's rate: at one rate they too reach the paper's path lengths, but only after
    # many thousands of steps (the loss of an ideal network does not depend on a shift; they move as the network errs)
    opt = torch.optim.Adam([{'params': model.net.parameters()},
                            {'params': [model.mu0, model.mu1, model.log_scale], 'lr': 5e-2}], lr=5e-3)
    for _ in range(steps):
        y = torch.randint(0, 2, (256,))
        x = (3.0 * y - 1.5 + 0.2 * torch.randn(256)).view(-1, 1, 1, 1)      # class 0: N(-1.5, 0.2^2), 1: N(1.5, .)
        loss, _ = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item()


@torch.no_grad()
def transport(model, n=4000, steps=100):
    """Euler from z = eps + mu0 (t = 1) to t = 0 in shifted coordinates: mean path length sum |dz|, and the samples
    z - mu1 per class."""
    y = torch.arange(n) % 2
    mu0, mu1 = model.shifts(y)
    z, length, ts = torch.randn(n, 1, 1, 1) + mu0, torch.zeros(n), torch.linspace(1, 0, steps + 1)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dz = (t1 - t0) * model(z, torch.full((n,), t0.item()), y, shifted=True)[0]
        z, length = z + dz, length + dz.abs().flatten()
    x = (z - mu1).flatten()
    return length.mean().item(), [(x[y == k].mean().item(), x[y == k].std().item()) for k in (0, 1)]


def test_paper_1d_experiment(capsys):
    """Source N(0, 1); classes N(-1.5, 0.2^2) and N(+1.5, 0.2^2). Paper: mean path length 1.54 (baseline) / 0.74
    (source) / 0.71 (target) / 0.71 (joint). Exact values: 1.52 without shifts (the monotone map z -> m + 0.2 z),
    0.64 with the mean offset removed (E|0.8 Z|). A learned scale collapses towards a zero-cost constant map."""
    threads, rows = torch.get_num_threads(), {}
    torch.set_num_threads(1)                                                 # tiny matmuls: one thread is fastest
    try:
        for name in ('baseline', 'source', 'target', 'joint'):
            model, loss = fit_1d('' if name == 'baseline' else name, train_carflow.compute_loss)
            rows[name] = (*transport(model), loss)
        scaled, scaled_loss_value = fit_1d('joint', scaled_loss)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print('\n1-D CAR-Flow experiment (800 steps): variant, mean path length, class samples (mean, std), loss')
        for name, (length, stats, loss) in rows.items():
            print(f'  {name:9s} {length:.2f}   ' + '  '.join(f'({m:+.2f}, {s:.2f})' for m, s in stats) + f'   {loss:.3f}')
        print(f'  learned scales: loss {scaled_loss_value:.3f}, scales (noise, data) per class '
              f'{scaled.log_scale.exp().flatten().tolist()}')
    assert abs(rows['baseline'][0] - 1.52) < 0.08
    assert all(rows[k][0] < 0.8 for k in ('source', 'target', 'joint'))      # the paper: 0.74 / 0.71 / 0.71
    # the numbers docs/measurements.md gives (seeded, deterministic on a CPU; 0.02 for other machines' rounding)
    for name, length in dict(baseline=1.54, source=0.65, target=0.67, joint=0.65).items():
        assert abs(rows[name][0] - length) <= 0.02, (name, rows[name][0])
    assert abs(scaled_loss_value - 0.004) <= 0.002 and scaled.log_scale.exp().min() <= 0.06
    for _, stats, _ in rows.values():                                        # every variant still samples the data
        assert all(abs(m - mk) < 0.1 and abs(s - 0.2) < 0.05 for (m, s), mk in zip(stats, (-1.5, 1.5)))
    assert scaled_loss_value < 0.3 * rows['joint'][2] and (scaled.log_scale.exp() < 0.6).all()
