"""What a preempted, crashed or mistaken run must survive: reruns, moved folders, replayed steps, read-only and
full disks, signals as torchrun and Slurm deliver them, and one clear line for every mistake."""
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port, one_line_error

import prepare
import sit
import train_vanilla

TINY = ['--model', 'SiT-T/8', '--global-batch', '16', '--lr', '1e-3', '--ema-decay', '0.9', '--log-every', '1',
        '--num-workers', '0', '--sample-every', '0', '--ckpt-every', '1000']


def run(toy, out, *extra):
    return train_vanilla.main(['--data-path', toy, '--out', str(out), *TINY, *extra])


def hashes(folder):
    """sha1 of every file under folder: what 'intact' means."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha1(open(p, 'rb').read()).hexdigest()
    return out


def steps_logged(out):
    return [json.loads(line)['step'] for line in open(os.path.join(out, 'metrics.jsonl'))]


@contextlib.contextmanager
def mounted(path, *options):
    """A tmpfs (or a read-only bind mount with options ('bind-ro',)) at path for the test's duration: a real full or
    read-only file system, which permission bits cannot give to root. Skips where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    if options == ('bind-ro',):
        cmds = [['mount', '--bind', path, path], ['mount', '-o', 'remount,bind,ro', path]]
    else:
        cmds = [['mount', '-t', 'tmpfs', '-o', ','.join(options) or 'size=1m', 'tmpfs', path]]
    for i, cmd in enumerate(cmds):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            if i:
                subprocess.run(['umount', path])
            pytest.skip(f'cannot mount here: {r.stderr.strip()}')
    try:
        yield path
    finally:
        subprocess.run(['umount', path], check=True)


# -----------------------------------------------------------------------------
# never lose or mix up a run

def test_rerun_continues_and_another_config_is_refused(toy, tmp_path, capsys):
    out = tmp_path / 'run'
    run(toy, out, '--max-steps', '2')
    before = hashes(out)
    # the same command again (a requeued job) continues; more steps continue further
    run(toy, out, '--max-steps', '2')
    assert 'nothing to do' in capsys.readouterr().out
    run(toy, out, '--max-steps', '4')
    assert 'resumed from' in capsys.readouterr().out and steps_logged(out) == [1, 2, 3, 4]
    assert sorted(os.listdir(out / 'checkpoints')) == ['0000002.pt', '0000004.pt']
    # another config into the same folder: one line naming --resume and --out, and nothing touched
    before = hashes(out)
    msg = one_line_error(run, toy, out, '--max-steps', '6', '--lr', '2e-3')
    assert 'other settings (lr (0.001 -> 0.002))' in msg and '--resume' in msg and '--out' in msg
    assert hashes(out) == before
    # a folder that is not a run folder is not written into
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'cat.jpg').write_bytes(b'meow')
    assert 'is not a run folder' in one_line_error(run, toy, tmp_path / 'photos')
    assert os.listdir(tmp_path / 'photos') == ['cat.jpg']


def test_moved_folder_resumes_where_it_is(toy, tmp_path):
    run(toy, tmp_path / 'a', '--max-steps', '2')
    os.rename(tmp_path / 'a', tmp_path / 'b')
    run(toy, tmp_path / 'elsewhere', '--max-steps', '4', '--resume', str(tmp_path / 'b'))
    assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['0000002.pt', '0000004.pt']
    assert not (tmp_path / 'elsewhere').exists()
    assert json.load(open(tmp_path / 'b' / 'config.json'))['out'] == str(tmp_path / 'b')


def test_replayed_steps_are_logged_once(toy, tmp_path):
    """A run killed after logging steps 5-6 but before checkpointing them resumes at 4 and replays them: the
    curve must keep one point per step (the replayed values, which an exact resume makes identical)."""
    out = tmp_path / 'run'
    run(toy, out, '--max-steps', '6', '--ckpt-every', '4')
    first = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    os.remove(out / 'checkpoints' / '0000006.pt')                           # as if killed before that write
    run(toy, out, '--max-steps', '6', '--ckpt-every', '4')
    again = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [m['step'] for m in again] == [1, 2, 3, 4, 5, 6]
    assert [m['loss'] for m in again] == [m['loss'] for m in first]


def test_nothing_is_created_when_the_start_fails(toy, tmp_path):
    out = tmp_path / 'new'
    assert "unknown model 'SiT-Q/2'" in one_line_error(run, toy, out, '--model', 'SiT-Q/2')
    assert 'does not exist' in one_line_error(run, str(tmp_path / 'nodata'), out)
    assert 'does not split' in one_line_error(run, toy, out, '--grad-accum', '3')
    assert not out.exists()


def test_keep_last_checkpoints(toy, tmp_path):
    run(toy, tmp_path / 'run', '--max-steps', '5', '--ckpt-every', '1', '--keep-ckpts', '2')
    assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['0000004.pt', '0000005.pt']


def test_atomic_json(tmp_path):
    path = tmp_path / 'config.json'
    sit.write_json(str(path), {'a': 1})
    with pytest.raises(TypeError):
        sit.write_json(str(path), {'a': object()})                          # fails half-way through the dump
    assert json.load(open(path)) == {'a': 1}


def test_read_only_folders(toy, tmp_path):
    out = tmp_path / 'run'
    run(toy, out, '--max-steps', '1')
    with mounted(str(out), 'bind-ro'):                                      # the whole run folder read-only
        msg = one_line_error(run, toy, out, '--max-steps', '2')
        assert f"cannot write to '{out}'" in msg and 'Read-only' in msg
    with mounted(str(out / 'checkpoints'), 'ro'):                            # writable folder, read-only checkpoints/
        msg = one_line_error(run, toy, out, '--max-steps', '1000')
        assert f"cannot write to '{out / 'checkpoints'}'" in msg
        assert steps_logged(out) == [1]                                     # refused before training, not at step 1000


def test_disk_full_during_a_checkpoint(toy, tmp_path):
    """Room for one checkpoint (~31 MB) but not two: the second write fails in one line that says so, leaves no
    partial file, and the first checkpoint is intact."""
    out = tmp_path / 'run'
    run(toy, out, '--max-steps', '1')
    first = out / 'checkpoints' / '0000001.pt'
    digest = hashlib.sha1(first.read_bytes()).hexdigest()
    saved = first.read_bytes()
    with mounted(str(out / 'checkpoints'), 'size=40m'):
        first.write_bytes(saved)
        msg = one_line_error(run, toy, out, '--max-steps', '2')
        assert 'No space left on device' in msg and f"'{first}' is intact" in msg
        assert os.listdir(out / 'checkpoints') == ['0000001.pt']
        assert hashlib.sha1(first.read_bytes()).hexdigest() == digest


def test_low_disk_warning(toy, tmp_path, monkeypatch, capsys):
    real = sit.shutil.disk_usage
    monkeypatch.setattr(sit.shutil, 'disk_usage', lambda p: real(p)._replace(free=10 * 2 ** 20))
    run(toy, tmp_path / 'run', '--max-steps', '1')
    assert 'less than two checkpoints' in capsys.readouterr().err


# -----------------------------------------------------------------------------
# signals

def test_stop_flag_sigint_once_then_twice():
    """A first SIGINT asks to stop; a repeat within a second (a forwarded copy) is the same request; a second
    Ctrl-C later exits at once with 130."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = sit.StopFlag()
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.requested
        stop.first_sigint -= 2.0                                            # the user presses again, later
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.code == 130
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def start(cmd, **kw):
    """A job in its own session (so the test can signal it as a terminal or a scheduler would)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS='1'), **kw)


def wait_for(p, text):
    seen = []
    for line in p.stdout:
        seen.append(line)
        if text in line:
            return ''.join(seen)
    raise AssertionError(''.join(seen))


def test_ctrl_c_saves_then_continues(toy, tmp_path):
    out = tmp_path / 'run'
    p = start([sys.executable, 'train_vanilla.py', '--data-path', toy, '--out', str(out), *TINY, '--max-steps', '100000'])
    wait_for(p, 'step 3/')
    os.killpg(p.pid, signal.SIGINT)                                         # Ctrl-C: the whole foreground group
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and 'stopped by signal' in rest and 'Traceback' not in rest, rest
    step = torch.load(sit.latest_checkpoint(str(out)), weights_only=True)['step']
    model = run(toy, out, '--max-steps', str(step + 1))                    # the same command continues
    assert steps_logged(out)[-1] == step + 1 and model is not None


def torchrun_job(toy, out, *launcher):
    return start([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
                  *launcher, 'train_vanilla.py', '--data-path', toy, '--out', str(out), *TINY, '--max-steps', '100000'])


def workers(p):
    return [int(k) for k in subprocess.run(['pgrep', '-P', str(p.pid)], capture_output=True, text=True).stdout.split()]


@pytest.mark.parametrize('delivery', ['sigterm-to-torchrun', 'usr1-to-every-process', 'usr1-to-workers'])
def test_signals_under_torchrun(toy, tmp_path, delivery):
    """The recipes of the README's preemption section. torchrun runs each worker in its own session:
    - SIGTERM (or Ctrl-C) to torchrun: it forwards the signal to the workers and waits --shutdown-timeout;
    - Slurm's --signal reaches every process of the step: torchrun must handle SIGUSR1 (--signals-to-handle),
      else it dies at once (exit 138) and the scheduler kills the workers mid-write;
    - a signal to the workers only (Slurm's --signal=B: plus a trap in the batch script): torchrun exits 0.
    In every case both ranks stop at the same step, rank 0 writes it, and the job exits without a worker error."""
    out = tmp_path / 'run'
    launcher = ['--signals-to-handle', 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'] if 'every' in delivery else []
    p = torchrun_job(toy, out, *launcher)
    wait_for(p, 'step 3/')
    if delivery == 'sigterm-to-torchrun':
        os.kill(p.pid, signal.SIGTERM)
    elif delivery == 'usr1-to-every-process':
        for pid in [p.pid] + workers(p):
            os.kill(pid, signal.SIGUSR1)
    else:
        for pid in workers(p):
            os.kill(pid, signal.SIGUSR1)
    rest = p.communicate(timeout=120)[0]
    step = torch.load(sit.latest_checkpoint(str(out)), weights_only=True)['step']
    assert f'stopped by signal at step {step}' in rest, rest
    # torchrun re-raises a signal it handled (exit 1, its own traceback); a worker never fails
    assert p.returncode == (0 if delivery == 'usr1-to-workers' else 1), rest
    assert 'ChildFailedError' not in rest


def test_an_error_every_rank_hits_is_printed_once(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'train_vanilla.py', '--data-path', str(tmp_path / 'nodata'), '--out', str(tmp_path / 'x')]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if 'error: dataset folder' in line]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr


def test_sample_py_stops_and_continues(toy, tmp_path):
    """SIGTERM while sampling: the batch at hand is finished, the PNGs are kept, no .npz yet, exit 0; the same
    command then finishes only what is missing."""
    run(toy, tmp_path / 'run', '--max-steps', '1')
    cmd = [sys.executable, 'sample.py', '--ckpt', str(tmp_path / 'run'), '--num-samples', '60', '--batch-size', '2',
           '--mode', 'ode', '--num-steps', '8', '--log-every', '1', '--sample-dir', str(tmp_path / 's')]
    p = start(cmd)
    wait_for(p, 'batch 2/')
    os.kill(p.pid, signal.SIGTERM)
    rest = p.communicate(timeout=120)[0]
    [folder] = [f for f in os.listdir(tmp_path / 's') if not f.endswith('.npz')]
    done = len(os.listdir(tmp_path / 's' / folder))
    assert p.returncode == 0 and 'stopped by signal' in rest and 2 <= done < 60, rest
    assert not any(f.endswith('.npz') for f in os.listdir(tmp_path / 's'))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and f'{(60 - done) // 2} of 30 batches' in r.stdout, r.stdout


def test_prepare_toy_never_overwrites(tmp_path, capsys):
    out = tmp_path / 'toy'
    prepare.prepare_toy(str(out), per_class=2)
    before = hashes(out)
    prepare.prepare_toy(str(out), per_class=2)                              # the same set again: a no-op
    assert 'nothing to do' in capsys.readouterr().out
    assert 'is not empty' in one_line_error(prepare.prepare_toy, str(out), per_class=3)
    assert hashes(out) == before
    r = subprocess.run([sys.executable, 'prepare.py', 'toy', '--out', str(out), '--seed', '1'], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().startswith('error: ') and hashes(out) == before


def hostile_pickles(target):
    """Every form in which torch.load(weights_only=True) refuses a pickle (torch/_weights_only_unpickler.py), each
    as a raw pickle (protocol 2, what torch.load's legacy path unpickles first) or a torch.save zip."""
    def text(s):  # BINUNICODE
        return b'X' + len(s).to_bytes(4, 'little') + s.encode()

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(target),)
    mkdir = f'c{os.mkdir.__module__}\nmkdir\n'.encode()                    # posix.mkdir: a blocked module
    return {
        'blocked module (zip)': (lambda p: torch.save({'model': Payload()}, p), 'pickled Python object (posix.mkdir)'),
        'blocked module (raw)': (b'\x80\x02' + mkdir + text(str(target)) + b'\x85R.', '(posix.mkdir)'),
        'unsupported global': (b'\x80\x02cbuiltins\nprint\n' + text('hi') + b'\x85R.', 'pickled Python object (print)'),
        'STACK_GLOBAL opcode': (b'\x80\x02' + text('posix') + text('mkdir') + b'\x93.', 'STACK_GLOBAL'),
        'REDUCE of no allowed function': (b'\x80\x02K\x01)R.', 'pickled call of 1'),
        'NEWOBJ of no allowed class': (b'\x80\x02K\x01)\x81.', 'object built from 1'),
        'BUILD of no allowed type': (b'\x80\x02K\x01}b.', "object built from <class 'int'>"),
        'persistent id not a storage': (b'\x80\x02' + text('abc') + b'\x85Q.', 'beyond tensors'),
        'SETITEM on a list': (b'\x80\x02]K\x01K\x02s.', 'beyond tensors'),
    }


def test_hostile_checkpoints_are_named_and_never_run(toy, tmp_path, capsys):
    """torch words its refusals in several ways (e.g. 'Trying to load unsupported GLOBAL posix.mkdir whose module
    posix is blocked'); each is reported as pickled code or objects that will not be loaded, never as a truncated
    file and never with torch's advice to pass weights_only=False (which would run the payload)."""
    target = tmp_path / 'payload_ran'
    for name, (payload, words) in hostile_pickles(target).items():
        path = tmp_path / 'hostile.pt'
        payload(path) if callable(payload) else path.write_bytes(payload)
        msg = one_line_error(sit.load_checkpoint, str(path))
        assert 'hostile.pt' in msg and 'holds pickled code or objects' in msg and 'will not be loaded' in msg, name
        assert words in msg and 'truncated' not in msg and 'weights_only=False' not in msg, (name, msg)
    assert capsys.readouterr() == ('', '') and not target.exists()        # no torch warning lines, no payload run
    # through a training script's --resume: the same line, and no run folder
    hostile_pickles(target)['blocked module (zip)'][0](tmp_path / 'hostile.pt')
    msg = one_line_error(run, toy, tmp_path / 'out', '--resume', str(tmp_path / 'hostile.pt'))
    assert '(posix.mkdir)' in msg and not (tmp_path / 'out').exists() and not target.exists()
    # a truncated checkpoint is still called one
    torch.save({'step': 1, 'model': {'w': torch.zeros(1000)}}, tmp_path / 'good.pt')
    good = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(good[:len(good) // 2])
    assert 'truncated' in one_line_error(sit.load_checkpoint, str(tmp_path / 'cut.pt'))
