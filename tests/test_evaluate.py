"""evaluate.py on a toy run with three checkpoints (SiT-T/8, 16 px, random-weight Inception): its records equal
sample.py + fid.py run by hand, reruns add nothing, a killed checkpoint resumes to the same record, protocols stay
apart in records and figure, --watch follows a run, and bad input is one line before any sampling."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, one_line_error
from test_fid import randomize_

import evaluate
import fid
import prepare
import sample
import sit
import train_vanilla

N = 5                                                         # samples per checkpoint (>= 4 for precision/recall)
FLAGS = ['--num-steps', '2', '--batch-size', '2', '--mode', 'sde', '--cfg-scale', '2', '--guidance-high', '0.7']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Toy data (40 images, 16 px), a vanilla SiT-T/8 run with checkpoints at steps 1, 2, 3 (EMA weights perturbed
    differently in each, so the checkpoints differ), a reference .npz of the toy images and random Inception
    weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp('evaluate')
    toy = str(tmp / 'toy')
    prepare.prepare_toy(toy, per_class=4, resolution=16)
    run = str(tmp / 'run')
    train_vanilla.main(['--data-path', toy, '--out', run, '--model', 'SiT-T/8', '--max-steps', '3',
                        '--sample-every', '0', '--num-workers', '0', '--global-batch', '8', '--ckpt-every', '1'])
    for step, path in evaluate.checkpoints(run):
        ckpt = torch.load(path, weights_only=True)
        g = torch.Generator().manual_seed(step)
        for k, v in ckpt['ema'].items():
            if k != 'pos_embed':
                v.add_(0.1 * torch.randn(v.shape, generator=g))
        sit.save_checkpoint(path, ckpt)
    ref = str(tmp / 'ref.npz')
    np.savez(ref, arr_0=np.load(os.path.join(toy, 'images.npy')).transpose(0, 2, 3, 1))  # (40, 16, 16, 3)
    weights = str(tmp / 'inception.pth')
    torch.save(randomize_(fid.InceptionV3()).state_dict(), weights)
    yield dict(tmp=tmp, toy=toy, run=run, ref=ref, weights=weights)
    torch.set_num_threads(threads)


def score(env, run, *extra):
    evaluate.main([run, '--ref', env['ref'], '--num-samples', str(N), '--inception-weights', env['weights'],
                   *FLAGS, *extra])
    return evaluate.read_records(run)


def copy_run(env, name):
    dst = str(env['tmp'] / name)
    shutil.copytree(env['run'], dst, ignore=shutil.ignore_patterns('eval.jsonl', 'samples'))
    return dst


@pytest.fixture(scope='module')
def scored(env):
    """The run scored once (samples kept, to compare against): its three records."""
    return score(env, env['run'], '--keep-samples')


def test_three_records_equal_sample_and_fid_by_hand(env, scored, capsys):
    assert [r['step'] for r in scored] == [1, 2, 3]
    assert [r['images_seen'] for r in scored] == [8, 16, 24]                  # step x global batch 8
    for r in scored:
        assert (r['method'], r['model'], r['num_samples']) == ('vanilla', 'SiT-T/8', N)
        assert r['protocol'] == sample.sampling_protocol(sample.parse_args(['--ckpt', 'x.pt', *FLAGS]))
        assert r['reference']['sha1'] == evaluate.content_sha1(env['ref'])
        assert r['code'].startswith(('git:', 'sha1:')) and r['wall_time']['total'] > 0
    # by hand: sample.py into another folder, then fid.py's CLI on its .npz
    for r in scored:
        folder = sample.main(['--ckpt', os.path.join(env['run'], r['checkpoint']), '--num-samples', str(N), *FLAGS,
                              '--sample-dir', str(env['tmp'] / 'by_hand')])
        capsys.readouterr()
        fid.main([folder + '.npz', env['ref'], '--inception-weights', env['weights'], '--json'])
        hand = json.loads(capsys.readouterr().out)
        assert {k: hand[k] for k in ('fid', 'sfid', 'inception_score', 'precision', 'recall')} == r['metrics']
    assert len({r['metrics']['fid'] for r in scored}) == 3                    # the checkpoints do differ
    # --keep-samples kept the PNGs and the ADM .npz of each checkpoint
    kept = os.listdir(os.path.join(env['run'], 'samples', os.listdir(os.path.join(env['run'], 'samples'))[0]))
    assert sorted(f for f in kept if f.endswith('.npz')) == [f'000000{s}-ema-sde2-cfg2.0-g0.0-0.7-seed0.npz'
                                                             for s in (1, 2, 3)]


def test_rerun_adds_nothing_and_samples_nothing(env, scored, monkeypatch):
    before = open(os.path.join(env['run'], 'eval.jsonl')).read()
    monkeypatch.setattr(sample, 'sample_for_evaluation', lambda *a, **k: pytest.fail('sampled a scored checkpoint'))
    score(env, env['run'])
    assert open(os.path.join(env['run'], 'eval.jsonl')).read() == before


def test_killed_checkpoint_resumes_to_the_same_record(env, scored, monkeypatch):
    """SIGTERM during the first batch of checkpoint 1: exit 0 without a record, that batch's PNGs kept; the rerun
    finishes from them, gives the uninterrupted run's record, and deletes the samples (the default)."""
    run = copy_run(env, 'killed')
    real, calls = sample.generate, []

    def generate_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # through sit.StopFlag's handler, as a preemption
        return real(*a, **k)
    monkeypatch.setattr(sample, 'generate', generate_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        assert score(env, run, '--steps', '1') == []
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    [folder] = [os.path.join(dp, d) for dp, ds, _ in os.walk(os.path.join(run, 'samples')) for d in ds
                if d.startswith('0000001-')]
    assert sorted(os.listdir(folder)) == ['000000.png', '000001.png']      # the first batch of 2
    monkeypatch.setattr(sample, 'generate', real)
    records = score(env, run, '--steps', '1')
    strip = lambda r: {k: v for k, v in r.items() if k not in ('run', 'wall_time', 'date')}
    assert [strip(r) for r in records] == [strip(scored[0])]
    assert not os.path.exists(os.path.join(run, 'samples'))                  # nothing kept but the records


def test_second_protocol_adds_records_and_figure_keeps_them_apart(env, scored, tmp_path, capsys, monkeypatch):
    run = copy_run(env, 'two_protocols')
    shutil.copy(os.path.join(env['run'], 'eval.jsonl'), run)
    records = score(env, run, '--steps', '3', '--seed', '1')
    assert len(records) == 4 and records[3]['step'] == 3 and records[3]['protocol']['seed'] == 1
    assert records[3]['metrics'] != records[2]['metrics']                       # other seeds, other samples
    other = copy_run(env, 'other')  # a second run (its step-2 record), to see two lines in a panel
    with open(os.path.join(other, 'eval.jsonl'), 'w') as f:
        f.write(json.dumps(scored[1]) + '\n')
    out = str(tmp_path / 'fid.png')
    panels = evaluate.main([run, other, '--plot', '--metric', 'fid', '--out', out])
    assert len(panels) == 2                                                  # one panel row per protocol
    for group in panels:
        assert len({json.dumps(r['protocol'], sort_keys=True) for r in group}) == 1
    assert sorted(len({r['run_label'] for r in g}) for g in panels) == [1, 2]
    assert os.path.getsize(out) > 10_000 and open(out, 'rb').read(4) == b'\x89PNG'
    md = open(str(tmp_path / 'fid.md')).read()
    seed0 = next(r for r in records if r['protocol']['seed'] == 0 and r['step'] == 2)['metrics']['fid']
    assert f"| 2 | {seed0:.4g} | {evaluate.read_records(other)[0]['metrics']['fid']:.4g} |" in md
    assert md.count('| step |') == 2
    import matplotlib.axes
    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, 'set_yscale', lambda ax, v, **k: scales.append(v))
    evaluate.main([run, '--plot', '--metric', 'fid', '--out', out, '--log'])
    assert scales == ['log'] * 4                                        # 2 panel rows x (step, images seen)


def test_watch_scores_new_checkpoints_until_the_last(env, scored, monkeypatch):
    """A run 'still training': checkpoints 1 and 2 are scored, 3 (= max_steps) is written while --watch waits; it is
    scored and the command ends. A half-written checkpoint (.pt.tmp) is not touched."""
    run = copy_run(env, 'watched')
    shutil.copy(os.path.join(env['run'], 'eval.jsonl'), run)
    with open(os.path.join(run, 'eval.jsonl')) as f:
        lines = f.readlines()[:2]
    with open(os.path.join(run, 'eval.jsonl'), 'w') as f:
        f.writelines(lines)
    last = evaluate.checkpoints(run)[-1][1]
    os.replace(last, last + '.tmp')                                          # being written

    def trainer():  # finishes the checkpoint as training does (rename) once the watcher has polled a few times
        time.sleep(1.5)
        os.replace(last + '.tmp', last)
    t = threading.Thread(target=trainer)
    t.start()
    records = score(env, run, '--watch', '--poll', '0.2', '--timeout', '60')
    t.join()
    assert [r['step'] for r in records] == [1, 2, 3] and records[2]['metrics'] == scored[2]['metrics']


def test_bad_input_is_one_line_before_sampling(env, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, 'sample_for_evaluation', lambda *a, **k: pytest.fail('sampled before the check'))
    empty = tmp_path / 'empty'
    (empty / 'checkpoints').mkdir(parents=True)
    common = ['--ref', env['ref'], '--inception-weights', env['weights']]
    assert 'no checkpoints' in one_line_error(evaluate.main, [str(empty), *common])
    assert 'does not exist' in one_line_error(evaluate.main, [env['run'], '--ref', str(tmp_path / 'no.npz')])
    with contextlib.redirect_stderr(io.StringIO()):
        msg = one_line_error(evaluate.main, [env['run'], *common, '--cfg-scael', '2'])
    assert 'unrecognized arguments: --cfg-scael 2' in msg
    assert '--ckpt' in one_line_error(evaluate.main, [env['run'], *common, '--ckpt', 'x.pt'])
    assert 'first' in one_line_error(evaluate.main, ['--ref', env['ref']])
    assert 'no records' in one_line_error(evaluate.main, [str(empty), '--plot'])


def test_two_processes_give_the_same_record(env, scored):
    """torchrun with 2 CPU processes: sampling split over ranks, features on rank 0; the same record as one process."""
    run = copy_run(env, 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'evaluate.py', run, '--ref', env['ref'], '--num-samples', str(N), '--inception-weights', env['weights'],
           '--steps', '2', *FLAGS]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    [rec] = evaluate.read_records(run)
    assert rec['world_size'] == 2 and rec['step'] == 2
    assert rec['metrics'] == scored[1]['metrics'] and rec['protocol'] == scored[1]['protocol']


def test_a_torn_last_record_is_skipped_and_scored_again(env, scored, tmp_path, capsys):
    """A partial append (full disk, lost NFS write) leaves a last line that is not JSON: --plot and scoring both go
    on with the records before it (one warning line naming the file), the torn checkpoint is scored again, and
    its new record starts on a line of its own."""
    run = copy_run(env, 'torn')
    with open(os.path.join(env['run'], 'eval.jsonl')) as f:
        lines = f.readlines()
    path = os.path.join(run, 'eval.jsonl')
    with open(path, 'w') as f:
        f.writelines(lines[:2] + [lines[2][:len(lines[2]) // 2]])          # the third record cut in half, no newline
    capsys.readouterr()
    evaluate.main([run, '--plot', '--metric', 'fid', '--out', str(tmp_path / 'torn.png')])
    err = capsys.readouterr().err
    assert err.count('warning:') == 1 and f'{path} line 3' in err
    assert '| 3 |' not in (tmp_path / 'torn.md').read_text()                # the torn record is not drawn
    records = score(env, run)                                               # step 3 has no record: scored again
    assert [r['step'] for r in records] == [1, 2, 3] and records[2]['metrics'] == scored[2]['metrics']
    with open(path) as f:
        text = f.read().split('\n')
    assert text[2] == lines[2][:len(lines[2]) // 2] and json.loads(text[3])['step'] == 3 and text[4] == ''


def test_protocol_overrides_with_the_shared_parser(env):
    """evaluate.py parses sample.py's sampler flags with sample.py's own code (one parser): --protocol fills in what
    is not given, flags given on top of it are the overrides, and its own --num-samples is neither."""
    common = [env['run'], '--ref', env['ref'], '--num-samples', '7', '--protocol', 'repa']
    args = evaluate.parse_args(common + ['--cfg-scale', '2', '--guidance-high', '0.7'])
    assert (args.cfg_scale, args.guidance_high, args.mode, args.num_steps) == (2.0, 0.7, 'sde', 250)
    assert args.overrides == ['--cfg-scale'] and args.num_samples == 7    # 0.7 is the protocol's own: no override
    same = sample.parse_args(['--ckpt', 'x.pt', '--protocol', 'repa', '--cfg-scale', '2'])
    assert sample.sampling_protocol(args) == sample.sampling_protocol(same)
    assert evaluate.parse_args(common).overrides == []
    plain = evaluate.parse_args([env['run'], '--ref', env['ref'], '--mode', 'ode'])
    assert (plain.protocol, plain.overrides, plain.num_steps, plain.num_samples) == (None, [], 50, 10_000)


def test_baseline_table_by_hand(tmp_path):
    """--plot --baseline RUN: for each of RUN's checkpoints, the steps (and images) another run needs to reach its
    FID, interpolated linearly in log FID between the two checkpoints around it, and the ratio; by hand."""
    def fake_run(name, fids, batch):
        run = tmp_path / name
        run.mkdir()
        with open(run / 'eval.jsonl', 'w') as f:
            for step, value in fids.items():
                f.write(json.dumps(dict(run=str(run), checkpoint=f'checkpoints/{step:07d}.pt', step=step,
                                        images_seen=step * batch, method=name, model='SiT-B/2', num_samples=10_000,
                                        metrics={'fid': value}, protocol={'protocol': 'repa-nocfg', 'mode': 'sde',
                                        'heun': False, 'num_steps': 250, 'cfg_scale': 1.0, 'seed': 0, 'weights': 'ema'},
                                        reference={'path': 'ref.npz', 'sha1': 'ab' * 20, 'features': {}})) + '\n')
        return str(run)
    base = fake_run('vanilla', {100: 8.0, 200: 4.0, 300: 2.0}, 256)
    other = fake_run('repa', {100: 6.0, 200: 3.0, 300: 1.5}, 256)
    slow = fake_run('slow', {100: 9.0, 200: 8.0, 300: 5.0}, 128)
    out = str(tmp_path / 'fid.png')
    evaluate.main([base, other, slow, '--plot', '--baseline', base, '--out', out])
    md = open(out[:-4] + '.md').read()
    s4 = 100 + 100 * np.log(6 / 4) / np.log(2)        # 6 -> 3 between steps 100 and 200 crosses 4 at 158.5
    s2 = 200 + 100 * np.log(3 / 2) / np.log(2)        # 3 -> 1.5 between 200 and 300 crosses 2 at 258.5
    assert f'| 100 | 8 | 100, 25,600 img (1.00x) | 200, 25,600 img (0.50x) |' in md   # repa is there at once
    assert f'| 200 | 4 | {s4:,.0f}, {s4 * 256:,.0f} img ({200 / s4:.2f}x) | not reached |' in md
    assert f'| 300 | 2 | {s2:,.0f}, {s2 * 256:,.0f} img ({300 / s2:.2f}x) | not reached |' in md
    assert '(1.26x)' in md and '(1.16x)' in md
    assert '--baseline' in one_line_error(evaluate.main, [other, '--plot', '--baseline', base, '--out', out])
