"""The toy lab: lab.py end to end on a few steps, your own script in it (docs/your-method.md built as the page shows
it), refusals, and lab.ode_path_length against closed forms."""
import glob
import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, one_line_error

import evaluate
import lab
import prepare
import sample
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
    assert evaluate.steps_to(curve, 2.0) == pytest.approx(75)        # log 2 is half-way from log 4 to log 1
    assert evaluate.steps_to(curve, 0.5 ** 0.5) == pytest.approx(125)
    assert evaluate.steps_to(curve, 4.0) == 50 and evaluate.steps_to(curve, 9.0) == 50   # at the first checkpoint
    assert evaluate.steps_to(curve, 1.0) == pytest.approx(100)
    assert evaluate.steps_to(curve, 0.4) is None                                   # never within the run
    assert evaluate.steps_to({50: 3.0, 100: 1.0, 150: 2.0}, 1.5) == pytest.approx(50 + 50 * np.log(2) / np.log(3))
    assert evaluate.steps_to({50: 0.5, 100: 0.8}, 0.6, lower=False) == pytest.approx(50 + 50 * np.log(1.2) / np.log(1.6))


@pytest.fixture(scope='module')
def data(toy, tmp_path_factory):
    """The conftest's toy set and toy teacher, with a toy FD trained in a second and its reference set."""
    d = tmp_path_factory.mktemp('lab') / 'toy'
    shutil.copytree(toy, d)
    net = prepare.train_toy_fd(seed=1, per_class=20, epochs=1, log=lambda s: None)
    prepare._save_net(net, str(d / 'fd.safetensors'), dict(width=16, classes=10, resolution=16))
    np.savez(d / 'fd_ref.npz', arr_0=prepare.draw_toy_set(10, 16, seed=2)[0].transpose(0, 2, 3, 1))
    return str(d)


QUICK = ['--teacher', 'toy', '--steps', '4', '--ckpt-every', '2', '--num-samples', '8', '--sample-steps', '2',
         '--path-samples', '4']


def test_lab_end_to_end(data, tmp_path, capsys):
    """lab.py on 4 steps and 8 samples: the teacher's outputs cached once, five runs scored at every checkpoint,
    each run's numbers, the table, both figures and the report; a rerun trains and scores nothing again."""
    out, report = tmp_path / 'lab', tmp_path / 'report'
    flags = ['--data', data, '--out', str(out), '--report', str(report), *QUICK]
    s = lab.main(flags)
    assert set(s) == {'vanilla', 'repa-toy', 'haste-toy', 'reg-toy', 'carflow'}
    assert (tmp_path / 'lab').exists() and os.path.isfile(os.path.join(data, 'cache-toy', 'cache.json'))
    for label, m in s.items():
        run = out / 'seed0' / label
        with open(run / 'eval.jsonl') as f:
            recs = [json.loads(line) for line in f]
        assert sorted(r['step'] for r in recs) == [2, 4] and m['fd'] == {str(r['step']): r['metrics']['fd_toy']
                                                                          for r in sorted(recs, key=lambda r: r['step'])}
        assert all(r['protocol']['mode'] == 'ode' and r['protocol']['num_steps'] == 2 and r['num_samples'] == 8
                   and r['protocol']['cfg_scale'] == 1.0 for r in recs)
        assert m['final'] == m['fd']['4'] and m['ms_per_step'] > 0 and m['path_length'] > 0
        curve = {int(k): v for k, v in m['fd'].items()}
        assert m['steps_to_vanilla_final'] == evaluate.steps_to(curve, s['vanilla']['final'])
        assert m['steps_to_vanilla_half'] == evaluate.steps_to(curve, s['vanilla']['fd']['2'])
        with open(run / 'config.json') as f:
            cfg = json.load(f)
        assert (cfg['max_steps'], cfg['seed'], cfg['ckpt_every']) == (4, 0, 2)
        if m['teacher']:  # aligned to the lab's teacher, through its cache
            assert cfg['enc'] == 'toy' and cfg['enc_cache'] == os.path.join(data, 'cache-toy')
            assert m['teacher_weights'].startswith('toy (teacher.safetensors, sha1 ')
        if label != 'carflow':
            assert m['path_length_shifted'] == pytest.approx(m['path_length'])
    assert s['haste-toy']['tau'] == 2 and len(s['haste-toy']['ms_per_step_phases']) == 2   # the preset's half-way
    assert s['vanilla']['half'] == 2 and s['vanilla']['steps_to_vanilla_final'] <= 4
    for f in ('seed0/fd_toy.png', 'seed0/fd_toy.md', 'seed0/vanilla/lab.json', 'toy_lab.png', 'toy_lab.md'):
        assert (out / f).stat().st_size > 0, f
    assert (report / 'toy_lab.md').read_text() == (out / 'toy_lab.md').read_text()
    assert json.loads((report / 'seed0.json').read_text()) == json.loads(json.dumps(s))
    assert "steps to reach vanilla" in (out / 'seed0' / 'fd_toy.md').read_text()   # evaluate.py --baseline's table
    text = capsys.readouterr().out
    assert str(out / 'toy_lab.png') in text and '| haste-toy |' in text and '[lab]' in text and 'eta' in text
    lab.main(flags)  # done: nothing trained or scored again
    assert 'nothing to do' in (out / 'seed0' / 'train_reg-toy.log').read_text()
    assert 'nothing to score' in (out / 'seed0' / 'score_reg-toy.log').read_text()
    assert 'the teacher cache is there' in (out / 'seed0' / 'teacher_cache.log').read_text()


def test_report_table_is_what_the_command_writes():
    """The committed toy-lab table (docs/lab/toy_lab.md) is lab.report_table of the committed per-seed numbers, and
    the README's table is its first table, verbatim: no number in them is typed by hand."""
    docs = os.path.join(ROOT, 'docs', 'lab')
    seeds = {}
    for path in sorted(glob.glob(os.path.join(docs, 'seed*.json'))):
        with open(path) as f:
            summary = json.load(f)
        seeds[next(iter(summary.values()))['seed']] = summary
    assert len(seeds) >= 3
    table = lab.report_table(dict(sorted(seeds.items())))
    assert open(os.path.join(docs, 'toy_lab.md')).read() == table
    first = table.split('\n\n')[1]                                              # the header line, then the rows
    assert first in open(os.path.join(ROOT, 'README.md')).read()


def page_blocks():
    """docs/your-method.md's slot blocks: [(slot name, code)]."""
    text = open(os.path.join(ROOT, 'docs', 'your-method.md')).read()
    return re.findall(r'^<!-- slot: (.+?) -->\n```python\n(.*?)^```', text, re.M | re.S)


def build_from_page(path):
    """train_repa.py with each slot the page names replaced by its block (indented as the slot is): the script the
    page builds."""
    script = open(os.path.join(ROOT, 'train_repa.py')).read()
    for name, body in page_blocks():
        slot = re.search(rf'^([ \t]*)# >>> method: {re.escape(name)}\n(?:.*\n)*?[ \t]*# <<< method\n', script, re.M)
        assert slot, f'the template has no slot {name!r}'
        indent = slot.group(1)
        new = (f'{indent}# >>> method: {name}\n' + ''.join(indent + line if line.strip() else line
                                                           for line in body.splitlines(True)) + f'{indent}# <<< method\n')
        script = script[:slot.start()] + new + script[slot.end():]
    with open(path, 'w') as f:
        f.write(script)
    return str(path)


def test_your_method_page_runs_in_the_lab(data, tmp_path):
    """The iREPA example built from docs/your-method.md's blocks: only REPA's slots differ, the lab trials it and
    trains it beside vanilla, sample.py loads its checkpoints (a projector it does not know), and its loss is the
    page's: -cos(conv3x3(h), spatial_norm(teacher tokens)) by hand."""
    import test_methods_aligned
    script = build_from_page(tmp_path / 'train_irepa.py')
    assert {name for name, _ in page_blocks()} == {'what this script trains', 'config', 'loss', 'model', 'modules',
                                                   'batch'}
    repa, irepa = test_methods_aligned.outside_slots(os.path.join(ROOT, 'train_repa.py')), \
        test_methods_aligned.outside_slots(script)
    assert irepa == repa                                              # the same file outside the slots
    s = lab.main(['--data', data, '--out', str(tmp_path / 'lab'), '--methods', f'{script}', *QUICK])
    assert set(s) == {'vanilla', 'irepa-toy'} and s['irepa-toy']['final'] > 0
    with open(tmp_path / 'lab' / 'seed0' / 'irepa-toy' / 'config.json') as f:
        cfg = json.load(f)
    assert (cfg['method'], cfg['proj_coeff'], cfg['spatial_gamma']) == ('irepa', 1.0, 0.6)
    loaded = sample.load_model(str(tmp_path / 'lab' / 'seed0' / 'irepa-toy' / 'checkpoints' / '0000004.pt'))
    assert not hasattr(loaded.model, 'projectors') or len(loaded.model.projectors) == 0
    # the page's loss pieces by hand
    spec = importlib.util.spec_from_file_location('train_irepa', script)
    irepa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(irepa)
    z = torch.randn(2, 16, 5)
    want = (z - 0.6 * z.mean(1, keepdim=True)) / (z.std(1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(irepa.spatial_norm(z, 0.6), want)
    proj = irepa.ConvProjector(5, 3, 4)
    h = torch.randn(2, 16, 5)
    grid = h.view(2, 4, 4, 5).permute(0, 3, 1, 2)                     # token k at row k // 4, column k % 4
    by_hand = torch.nn.functional.conv2d(grid, proj.conv.weight, proj.conv.bias, padding=1)  # (2, 3, 4, 4)
    torch.testing.assert_close(proj(h), by_hand.permute(0, 2, 3, 1).reshape(2, 16, 3))


def test_own_scripts_are_refused_in_one_line(data, tmp_path):
    """A script without a toy preset, one whose checkpoints sample.py cannot load and an unknown flag are refused
    before anything trains."""
    out = tmp_path / 'lab'
    template = open(os.path.join(ROOT, 'train_vanilla.py')).read()
    no_toy = tmp_path / 'train_notoy.py'
    no_toy.write_text(template.replace("presets = {  # --preset toy", "presets = {'big': {}}\n_unused = {  # --preset toy"))
    msg = one_line_error(lab.main, ['--data', data, '--out', str(out), '--methods', str(no_toy), *QUICK])
    assert 'notoy' in msg and 'no toy preset' in msg and not out.exists()
    odd = tmp_path / 'train_odd.py'  # a model sample.py cannot rebuild from model_args: an extra block
    odd.write_text(template.replace("    # >>> method: modules\n", "    # >>> method: modules\n"
                                    "    model.extra = torch.nn.Linear(2, 2).to(device)\n"))
    msg = one_line_error(lab.main, ['--data', data, '--out', str(out), '--methods', str(odd), *QUICK])
    assert 'odd' in msg and 'sample.py cannot load' in msg and 'extra.weight' in msg
    assert not any((out / 'seed0').glob('*/checkpoints'))                            # nothing trained
    msg = one_line_error(lab.main, ['--data', data, '--out', str(out), '--methods', 'haste:tua=5', *QUICK])
    assert "'tua=5'" in msg and 'tau' in msg
    assert 'not one of' in one_line_error(lab.main, ['--out', str(out), '--methods', 'ddpm'])


def test_lab_bad_flags(toy, tmp_path):
    assert '--num-samples' in one_line_error(lab.main, ['--num-samples', '1', '--out', str(tmp_path / 'x')])
    assert not (tmp_path / 'x').exists()
    data = tmp_path / 'toy'
    shutil.copytree(toy, data)
    for f in ('teacher.json', 'fd.json'):
        (data / f).write_text('{}')                                # present (lab.py makes nothing), never read
    msg = one_line_error(lab.main, ['--data', str(data), '--background', 'textured', '--out', str(tmp_path / 'x'),
                                    '--teacher', 'toy'])
    assert 'plain background' in msg and '--background plain' in msg and not (tmp_path / 'x').exists()
    msg = one_line_error(lab.main, ['--enc-ckpt', str(tmp_path / 'nothing.safetensors'), '--out', str(tmp_path / 'x')])
    assert 'nothing.safetensors' in msg and not (tmp_path / 'x').exists()


def test_lab_needs_matplotlib_before_anything(toy, tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, '__import__', lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == 'matplotlib' else real(name, *a, **k))
    msg = one_line_error(lab.main, ['--data', str(tmp_path / 'toy'), '--out', str(tmp_path / 'x'), '--teacher', 'toy'])
    assert 'pip install matplotlib' in msg and not (tmp_path / 'toy').exists() and not (tmp_path / 'x').exists()
