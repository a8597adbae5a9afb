"""The toy lab: lab.py end to end on a few steps, and sit.ode_path_length against closed forms."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import one_line_error

import lab
import prepare
import sit


class PointMass(torch.nn.Module):
    """The exact field when every class's data is one point x0[y]: straight lines, so Euler is exact. With shifts
    (CAR-Flow's): z1 = x0 + mu1, z0 = eps + mu0, v_shifted(z, t) = (z - z1) / t; in ordinary coordinates through
    sit.unshifted_velocity, the code SiT uses."""
    num_classes = 2

    def __init__(self, shifts):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x0, self.mu0, self.mu1 = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        self.has_shifts = shifts

    def shifts(self, y):
        return self.mu0[y], self.mu1[y]

    def forward(self, x, t, y, shifted=False):
        if self.has_shifts and not shifted:
            return sit.unshifted_velocity(self, x, t, y)
        z1 = self.x0[y] + (self.mu1[y] if self.has_shifts else 0)
        return (x - z1) / t.view(-1, 1, 1, 1), {}


@pytest.mark.parametrize('shifts', [False, True])
def test_ode_path_length_closed_form(shifts):
    """Straight paths: ordinary length |eps - x0|, shifted |eps + mu0 - x0 - mu1| (= ordinary without shifts);
    the trajectory ends where sit.sample's Euler ODE ends."""
    model, y = PointMass(shifts), torch.tensor([0, 1, 1, 0, 1])
    eps = torch.randn(5, 3, 4, 4)
    ordinary, shifted = lab.ode_path_length(model, eps, y, num_steps=7)
    torch.testing.assert_close(ordinary, (eps - model.x0[y]).flatten(1).norm(dim=1))
    mu = (model.mu0[y] - model.mu1[y]) if shifts else 0
    torch.testing.assert_close(shifted, (eps + mu - model.x0[y]).flatten(1).norm(dim=1))
    torch.testing.assert_close(sit.sample(model, eps, y, mode='ode', num_steps=7), model.x0[y])


def test_ode_path_length_sums_the_euler_steps():
    """On a curved field (a random SiT-T with REG's token) the length is the sum of the latent part of each Euler
    step's norm, and the steps are sit.sample's (they end at its samples); the token is integrated, not counted."""
    torch.manual_seed(0)
    model = sit.build_model('SiT-T/2', input_size=8, in_channels=3, num_classes=4, cls_dim=16).eval()
    z, c, y = torch.randn(3, 3, 8, 8), torch.randn(3, 16), torch.tensor([0, 1, 2])
    length, same = lab.ode_path_length(model, [z, c], y, num_steps=4)
    expect, x, joint = torch.zeros(3), torch.cat([z.flatten(1), c], 1), sit.JointState(model, (3, 8, 8), 1.0)
    with torch.no_grad():
        for k in range(4):
            step = -0.25 * joint(x, torch.full((3,), 1 - k / 4), y)[0]                # (3, 192 + 16)
            expect, x = expect + step[:, :192].norm(dim=1), x + step
    torch.testing.assert_close(length, expect)
    torch.testing.assert_close(same, length)
    torch.testing.assert_close(x[:, :192].reshape(3, 3, 8, 8), sit.sample(model, [z, c], y, mode='ode', num_steps=4))


def test_steps_to_interpolates_in_log_fd():
    curve = {50: 4.0, 100: 1.0, 150: 0.5}
    assert lab.steps_to(curve, 2.0) == pytest.approx(75)        # log 2 is half-way from log 4 to log 1
    assert lab.steps_to(curve, 0.5 ** 0.5) == pytest.approx(125)
    assert lab.steps_to(curve, 4.0) == 50 and lab.steps_to(curve, 9.0) == 50   # reached at the first checkpoint
    assert lab.steps_to(curve, 1.0) == pytest.approx(100)
    assert lab.steps_to(curve, 0.4) is None                                   # never within the run
    assert lab.steps_to({50: 3.0, 100: 1.0, 150: 2.0}, 1.5) == pytest.approx(50 + 50 * np.log(2) / np.log(3))


def test_lab_end_to_end(toy, tmp_path, capsys):
    """lab.py on 4 steps and 8 samples: five runs scored at every checkpoint, the summary, the table and both
    figures; a rerun trains and scores nothing again."""
    data = tmp_path / 'toy'
    shutil.copytree(toy, data)
    net = prepare.train_toy_fd(seed=1, per_class=20, epochs=1, log=lambda s: None)  # a toy FD in a second
    prepare._save_net(net, str(data / 'fd.safetensors'), dict(width=16, classes=10, resolution=16))
    np.savez(data / 'fd_ref.npz', arr_0=prepare.draw_toy_set(10, 16, seed=2)[0].transpose(0, 2, 3, 1))
    out = tmp_path / 'lab'
    flags = ['--data', str(data), '--out', str(out), '--steps', '4', '--ckpt-every', '2', '--num-samples', '8',
             '--sample-steps', '2', '--path-samples', '4']
    s = lab.main(flags)
    assert s['tau'] == 2 and set(s['methods']) == set(lab.METHODS)
    for name, m in s['methods'].items():
        with open(out / 'seed0' / name / 'eval.jsonl') as f:
            recs = [json.loads(line) for line in f]
        assert sorted(r['step'] for r in recs) == [2, 4] and m['fd'] == {str(r['step']): r['metrics']['fd_toy']
                                                                          for r in sorted(recs, key=lambda r: r['step'])}
        assert all(r['protocol']['mode'] == 'ode' and r['protocol']['num_steps'] == 2 and r['num_samples'] == 8
                   and r['protocol']['cfg_scale'] == 1.0 for r in recs)
        assert m['final'] == m['fd']['4'] and m['ms_per_step'] > 0 and m['path_length'] > 0
        curve = {int(k): v for k, v in m['fd'].items()}
        assert m['steps_to_vanilla_final'] == lab.steps_to(curve, s['vanilla_final'])
        assert m['steps_to_vanilla_half'] == lab.steps_to(curve, s['vanilla_half'])
        if name != 'carflow':
            assert m['path_length_shifted'] == pytest.approx(m['path_length'])
    assert s['half'] == 2 and s['methods']['vanilla']['steps_to_vanilla_half'] <= 2
    assert s['methods']['vanilla']['steps_to_vanilla_final'] <= 4 and len(s['methods']['haste']['ms_per_step_phases']) == 2
    for f in ('seed0/fd_toy.png', 'seed0/fd_toy.md', 'seed0/summary.json', 'toy_lab.png', 'toy_lab.md'):
        assert (out / f).stat().st_size > 0, f
    text = capsys.readouterr().out
    assert str(out / 'toy_lab.png') in text and str(out / 'toy_lab.md') in text and '[lab]' in text and 'eta' in text
    lab.main(flags)  # done: nothing trained or scored again
    assert 'nothing to do' in (out / 'seed0' / 'train_reg.log').read_text()
    assert 'nothing to score' in (out / 'seed0' / 'score_reg.log').read_text()


def test_lab_bad_flags(toy, tmp_path):
    assert '--num-samples' in one_line_error(lab.main, ['--num-samples', '1', '--out', str(tmp_path / 'x')])
    assert not (tmp_path / 'x').exists()
    data = tmp_path / 'toy'
    shutil.copytree(toy, data)
    for f in ('teacher.json', 'fd.json'):
        (data / f).write_text('{}')                                # present (lab.py makes nothing), never read
    msg = one_line_error(lab.main, ['--data', str(data), '--background', 'textured', '--out', str(tmp_path / 'x')])
    assert 'plain background' in msg and '--background plain' in msg and not (tmp_path / 'x').exists()
