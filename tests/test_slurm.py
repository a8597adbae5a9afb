"""The self-requeueing Slurm job of docs/training.md ("Stopping and preemption") as written there: the ```bash block
with `#SBATCH --signal=B:USR1@300 --requeue` is read from the page and run with bash, against stubs first on PATH:

    torchrun   parses the script, --out (default runs/METHOD) and --max-steps (default 400000) as the training
               scripts do, logs its argv, continues from the newest checkpoint, rewrites RUN/config.json and, if the
               run is not finished yet, by STUB_MODE: finish (checkpoint at max_steps), preempt (checkpoint
               halfway), signal (a child worker waits for SIGUSR1, saves slowly, exits 0), fail (exit 1 before
               writing anything); every such run exits 0 like the real scripts
    scontrol   records its arguments
    python3    this interpreter

What is checked: the step count is written once, in the command; a run short of max_steps is requeued, a finished
one (also when a requeued job finds it finished) and one that never started are not; SIGUSR1 to the batch shell
reaches the workers, not torchrun, and the job waits for their checkpoint before it requeues itself.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = '#SBATCH --signal=B:USR1@300 --requeue'
FENCE = re.compile(r'^```bash\n(.*?)^```', re.M | re.S)
RUN = 'runs/haste'  # the block's run folder, relative to the job's folder
MAX_STEPS = 2500000

TORCHRUN = r'''
import json, os, re, signal, subprocess, sys, time

STATE = %(state)r


def log(**entry):
    with open(os.path.join(STATE, 'torchrun.log'), 'a') as f:
        f.write(json.dumps(entry) + '\n')


def save(run, step):
    os.makedirs(os.path.join(run, 'checkpoints'), exist_ok=True)
    with open(os.path.join(run, 'checkpoints', '%%07d.pt' %% step), 'w') as f:
        f.write('step %%d\n' %% step)


def worker(run, step):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # no race between the marker and the wait
    with open(os.path.join(STATE, 'worker.ready'), 'w') as f:
        f.write(str(os.getpid()))
    if signal.sigtimedwait({signal.SIGUSR1}, 10) is None:
        sys.exit(3)  # never signalled: give up, no checkpoint
    open(os.path.join(STATE, 'worker.usr1'), 'w').close()
    time.sleep(0.5)  # a slow save
    save(run, step)
    sys.exit(0)


def flag(args, name, default):
    value = default  # the last one wins, as with argparse
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + '='):
            value = a.split('=', 1)[1]
    return value


def main(argv):
    if argv[:1] == ['--worker']:
        worker(argv[1], int(argv[2]))
    log(argv=argv)
    mode = os.environ['STUB_MODE']
    if mode == 'fail':
        log(exit=1)
        sys.exit(1)
    script = next(a for a in argv if a.endswith('.py'))  # torchrun's own flags come before it
    args = argv[argv.index(script) + 1:]
    method = re.fullmatch(r'train_(\w+)\.py', os.path.basename(script)).group(1)
    run = flag(args, '--out', 'runs/' + method)
    max_steps = int(flag(args, '--max-steps', '400000'))
    ckpts = os.path.join(run, 'checkpoints')
    steps = [int(f[:-3]) for f in os.listdir(ckpts) if f.endswith('.pt')] if os.path.isdir(ckpts) else []
    start = max(steps, default=0)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, 'config.json'), 'w') as f:
        json.dump({'max_steps': max_steps}, f)
    code = 0
    if start < max_steps:  # a finished run writes nothing new
        half = start + (max_steps - start) // 2
        if mode == 'finish':
            save(run, max_steps)
        elif mode == 'preempt':
            save(run, half)
        elif mode == 'signal':
            code = subprocess.call([sys.executable, os.path.abspath(__file__), '--worker', run, str(half)])
        else:
            raise SystemExit('unknown STUB_MODE ' + mode)
    log(exit=code)
    sys.exit(code)


main(sys.argv[1:])
'''


def recipe():
    """The one ```bash block of docs/training.md with the #SBATCH line."""
    with open(os.path.join(ROOT, 'docs', 'training.md')) as f:
        blocks = [b for b in FENCE.findall(f.read()) if MARK in b]
    assert len(blocks) == 1, f'{len(blocks)} ```bash blocks of docs/training.md hold {MARK!r}'
    return blocks[0]


@pytest.fixture
def job(tmp_path):
    """The block as tmp_path/job.sh and the stubs in tmp_path/bin; returns the folder of the stubs' records."""
    state, bin_, src = tmp_path / 'state', tmp_path / 'bin', tmp_path / 'src'
    for d in (state, bin_, src):
        d.mkdir()
    (tmp_path / 'job.sh').write_text(recipe())
    (src / 'torchrun.py').write_text(TORCHRUN % {'state': str(state)})
    py = shlex.quote(sys.executable)
    stubs = {'torchrun': f'exec {py} {shlex.quote(str(src / "torchrun.py"))} "$@"\n',  # exec: $! is its pid
             'scontrol': f'printf "%s\\n" "$*" >> {shlex.quote(str(state / "scontrol.log"))}\n',
             'python3': f'exec {py} "$@"\n'}
    for name, body in stubs.items():
        (bin_ / name).write_text('#!/bin/sh\n' + body)
        (bin_ / name).chmod(0o755)
    return state


def environ(tmp_path, mode):
    return dict(os.environ, PATH=f'{tmp_path / "bin"}{os.pathsep}{os.environ.get("PATH", "")}',
                SLURM_JOB_ID='4242', STUB_MODE=mode)


def run_job(tmp_path, mode):
    """Runs job.sh to its end; its output goes to a file, so returning means bash exited."""
    with open(tmp_path / 'job.log', 'a') as out:
        p = subprocess.run(['bash', 'job.sh'], cwd=tmp_path, env=environ(tmp_path, mode), stdout=out,
                           stderr=subprocess.STDOUT, timeout=60)
    return p.returncode


def requeues(state):
    path = state / 'scontrol.log'
    return path.read_text().splitlines() if path.exists() else []


def torchrun_log(state):
    return [json.loads(line) for line in (state / 'torchrun.log').read_text().splitlines()]


def checkpoints(tmp_path):
    return sorted(os.listdir(tmp_path / RUN / 'checkpoints'))


def test_the_recipe_passes_the_step_count_once(tmp_path):
    """2500000 is written once, as --max-steps of the torchrun command of train_haste.py; the block parses."""
    block = recipe()
    assert block.count(str(MAX_STEPS)) == 1, block
    line = next(line for line in block.splitlines() if str(MAX_STEPS) in line)
    argv = shlex.split(line, comments=True)
    assert argv[0] == 'torchrun' and 'train_haste.py' in argv, line
    assert argv.count('--max-steps') == 1 and argv[argv.index('--max-steps') + 1] == str(MAX_STEPS), line
    (tmp_path / 'job.sh').write_text(block)
    p = subprocess.run(['bash', '-n', 'job.sh'], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_preempted_run_is_requeued(job, tmp_path):
    """A run that stopped halfway (exit 0) requeues the job, once, with its own id."""
    assert run_job(tmp_path, 'preempt') == 0, (tmp_path / 'job.log').read_text()
    assert checkpoints(tmp_path) == [f'{MAX_STEPS // 2:07d}.pt']
    assert json.loads((tmp_path / RUN / 'config.json').read_text())['max_steps'] == MAX_STEPS
    assert requeues(job) == ['requeue 4242'], (tmp_path / 'job.log').read_text()


def test_signal_to_the_batch_shell_saves_and_requeues(job, tmp_path):
    """SIGUSR1 to bash alone (Slurm's B:): the trap passes it to torchrun's worker, not to torchrun; the job waits
    for the worker's slow save, then requeues itself."""
    if shutil.which('pkill') is None:
        pytest.skip('needs pkill')
    ready = job / 'worker.ready'
    with open(tmp_path / 'job.log', 'w') as out:
        p = subprocess.Popen(['bash', 'job.sh'], cwd=tmp_path, env=environ(tmp_path, 'signal'), stdout=out,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            assert p.poll() is None, (tmp_path / 'job.log').read_text()
            assert time.monotonic() < deadline, 'the worker did not start'
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGUSR1)
        code = p.wait(timeout=30)
        saved = os.listdir(tmp_path / RUN / 'checkpoints')  # right when bash exited
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if ready.exists() and ready.read_text() and not (job / 'worker.usr1').exists():
            try:  # a worker the signal never reached: end it now, not at its own 10 s timeout
                os.kill(int(ready.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = (tmp_path / 'job.log').read_text()
    assert (job / 'worker.usr1').exists(), log
    assert saved == [f'{MAX_STEPS // 2:07d}.pt'], log  # the save took 0.5 s: the job waited for it
    assert torchrun_log(job)[-1] == {'exit': 0}, log  # torchrun waited for its worker and exited by itself
    assert requeues(job) == ['requeue 4242'], log
    assert code == 0, log


def test_finished_run_is_not_requeued(job, tmp_path):
    """A run that reached max_steps ends the job, exit 0, no requeue; torchrun got --max-steps once."""
    assert run_job(tmp_path, 'finish') == 0, (tmp_path / 'job.log').read_text()
    argv = torchrun_log(job)[0]['argv']
    assert sum(a == '--max-steps' or a.startswith('--max-steps=') for a in argv) == 1, argv
    assert checkpoints(tmp_path) == [f'{MAX_STEPS:07d}.pt']
    assert requeues(job) == [], (tmp_path / 'job.log').read_text()


def test_requeued_job_that_finds_a_finished_run_is_not_requeued(job, tmp_path):
    """Preempted, then finished, then started again on the finished run (which writes nothing new): one requeue,
    after the preemption only."""
    assert run_job(tmp_path, 'preempt') == 0
    assert requeues(job) == ['requeue 4242']
    assert run_job(tmp_path, 'finish') == 0
    assert requeues(job) == ['requeue 4242']
    done = checkpoints(tmp_path)
    assert done == [f'{MAX_STEPS // 2:07d}.pt', f'{MAX_STEPS:07d}.pt']
    assert run_job(tmp_path, 'finish') == 0
    assert checkpoints(tmp_path) == done
    assert [e['exit'] for e in torchrun_log(job) if 'exit' in e] == [0, 0, 0]
    assert requeues(job) == ['requeue 4242'], (tmp_path / 'job.log').read_text()


def test_job_that_fails_before_the_run_starts_is_not_requeued(job, tmp_path):
    """torchrun exits 1 before the run folder is written: no config.json, so no requeue."""
    run_job(tmp_path, 'fail')
    assert torchrun_log(job)[-1] == {'exit': 1}  # the stub did run
    assert not (tmp_path / RUN / 'config.json').exists()
    assert requeues(job) == [], (tmp_path / 'job.log').read_text()
