"""Two nodes simulated on one machine: two torchrun launches (--nnodes 2, one process each, gloo on 127.0.0.1).
A run stopped by a signal on one node and rerun continues bit for bit; a node that sees another run folder (a
private mount namespace) or an older checkpoint (a lagging file system), or a bad flag, stops the job with one
line per node instead of training on diverged state."""
import copy
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port
from test_reliability import TINY, hashes, run, workers

import sit


def launch(args, node1=(), script='train_vanilla.py'):
    """Both nodes of a 2-node job; node1: a command prefix for node 1 (a private mount namespace). Returns the
    Popen of each node, output merged."""
    port = free_port()
    procs = []
    for rank, prefix in ((0, []), (1, list(node1))):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', f'--node_rank={rank}',
               '--master_addr=127.0.0.1', f'--master_port={port}', script, *map(str, args)]
        procs.append(subprocess.Popen(prefix + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1')))
    return procs


def finish(procs, timeout=240):
    return [p.communicate(timeout=timeout)[0] for p in procs]


def private_view(parent, setup=''):
    """A command prefix: node 1 runs in its own mount namespace with an empty tmpfs over `parent` (then `setup`, a
    shell command, fills it), as a node whose --out is node-local or on another file system. Skips where
    unshare or mount is not permitted."""
    probe = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount -t tmpfs tmpfs {parent}'], capture_output=True,
                           text=True)
    if probe.returncode:
        pytest.skip(f'no private mount namespace here (unshare -m, mount): {probe.stderr.strip()}')
    return ['unshare', '-m', 'sh', '-c', f'mount -t tmpfs tmpfs {parent} && {setup or "true"} && exec "$@"', 'sh']


def one_line_per_node(outs, text):
    for out in outs:
        lines = [line for line in out.splitlines() if line.startswith('error: ')]
        assert len(lines) == 1 and text in lines[0], out
        assert 'terminate called' not in out and 'sit.py", line' not in out, out  # torchrun's own report only


def trained(path):
    ckpt = torch.load(path, weights_only=True)
    return {k: ckpt[k] for k in ('model', 'ema', 'opt', 'rng', 'step')}


def test_stopped_on_one_node_then_rerun_is_bit_exact(toy, tmp_path):
    """SIGUSR1 to node 1's worker only: both nodes stop at the same step and rank 0 saves it; the same command
    then continues, and the result equals a 2-node run that was never stopped."""
    out, ref = tmp_path / 'run', tmp_path / 'ref'
    args = ['--data-path', toy, '--out', out, *TINY]
    node0, node1 = launch([*args, '--max-steps', '100000'])
    for line in node0.stdout:
        if 'step 3/' in line:
            break
    for pid in workers(node1):
        os.kill(pid, signal.SIGUSR1)
    outs = finish([node0, node1])
    assert node0.returncode == node1.returncode == 0, outs
    step = torch.load(sit.latest_checkpoint(str(out)), weights_only=True)['step']
    assert f'stopped by signal at step {step}' in outs[0], outs
    end = step + 2
    outs = finish(launch([*args, '--max-steps', end]))
    assert f'resumed from {out}/checkpoints/{step:07d}.pt at step {step}' in outs[0], outs
    finish(launch(['--data-path', toy, '--out', ref, *TINY, '--max-steps', end]))
    a, b = (trained(os.path.join(d, 'checkpoints', f'{end:07d}.pt')) for d in (out, ref))
    flat = lambda d: torch.utils._pytree.tree_leaves(d)
    assert len(flat(a)) == len(flat(b)) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat(a), flat(b)))


def test_a_node_with_another_run_folder_stops_the_job(toy, tmp_path):
    """Node 1 sees an empty folder where node 0 sees the run: no restart from step 0 on node 1, nothing written."""
    out = tmp_path / 'runs' / 'run'
    run(toy, out, '--max-steps', '2')
    before = hashes(out)
    outs = finish(launch(['--data-path', toy, '--out', out, *TINY, '--max-steps', '4'],
                         node1=private_view(tmp_path / 'runs')))
    one_line_per_node(outs, 'must be on a file system all nodes share')
    assert f"node 1 (rank 1, host {os.uname().nodename}) sees nothing at '{out}/checkpoints'" in outs[0]
    assert hashes(out) == before


def test_a_node_with_an_older_checkpoint_stops_the_job(toy, tmp_path):
    """A lagging file system: node 1 sees the run at step 2, node 0 at step 4. Both find *a* checkpoint."""
    out, stash = tmp_path / 'runs' / 'run', tmp_path / 'stash'
    run(toy, out, '--max-steps', '2')
    shutil.copytree(out, stash / 'run')
    run(toy, out, '--max-steps', '4')
    before = hashes(out)
    outs = finish(launch(['--data-path', toy, '--out', out, *TINY, '--max-steps', '6'],
                         node1=private_view(tmp_path / 'runs', f'cp -a {stash}/run {tmp_path}/runs/')))
    one_line_per_node(outs, 'must be on a file system all nodes share')
    assert ('sees 1 file(s), the last 0000002.pt at' in outs[0] and
            'rank 0 sees 2 file(s), the last 0000004.pt' in outs[0]), outs
    assert hashes(out) == before


def test_a_bad_flag_prints_one_line_per_node(toy, tmp_path):
    """A flag refused once the process group is up: fail() destroys it before exiting (else about one exit in four
    aborts with 'terminate called without an active exception')."""
    procs = launch(['--data-path', toy, '--out', tmp_path / 'run', *TINY, '--precision', 'fp8'])
    outs = finish(procs)
    assert all(p.returncode for p in procs)
    one_line_per_node(outs, "--precision 'fp8'")
    assert not (tmp_path / 'run').exists()


def test_argparse_errors_are_one_line(capsys, monkeypatch):
    """What argparse refuses (before any process group) is one line, from each node's first process only."""
    import train_vanilla
    for local_rank, expect in (('0', ["error: argument --lr: invalid float value: 'fast' (see --help)"]),
                               ('1', [])):
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        with pytest.raises(SystemExit) as e:
            train_vanilla.main(['--lr', 'fast'])
        captured = capsys.readouterr()
        assert e.value.code == 2 and captured.err.splitlines() == expect and captured.out == '', captured


def test_hot_path_items():
    """Per-channel latent statistics are built once per device (no host-to-device copies per micro-batch), and a
    restored optimizer keeps this run's AdamW implementation (load_state_dict would copy the checkpoint's)."""
    meta = {'latent_mean': [0.1, 0.2], 'latent_std': [1.0, 2.0], 'latent_scale': 1.0}
    m, s, _ = sit.latent_norm(meta, 'cpu')
    assert m is sit.latent_norm(dict(meta), torch.device('cpu'))[0] and s.shape == (1, 2, 1, 1)
    assert torch.equal(s.flatten(), torch.tensor([1.0, 2.0]))
    net = torch.nn.Linear(3, 2)
    saved = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=False)
    net(torch.randn(4, 3)).sum().backward()
    saved.step()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    ckpt = dict(model=net.state_dict(), ema=net.state_dict(), opt=saved.state_dict(), step=1, rng=[sit.rng_state(
        torch.device('cpu'))], config={'seed': 0}, path='x.pt')
    sit.restore(ckpt, net, copy.deepcopy(net), opt, torch.device('cpu'), lambda msg: None)
    assert opt.param_groups[0]['fused'] is True and opt.param_groups[0]['foreach'] is None
    assert torch.equal(opt.state[net.weight]['exp_avg'], saved.state[net.weight]['exp_avg'])


def test_sample_py_on_a_node_without_the_checkpoint_stops(toy, tmp_path):
    """sample.py: every rank loads --ckpt; a node that does not see it stops the job in one line per node (it used
    to fail alone, leaving the other node waiting in the first collective)."""
    out = tmp_path / 'runs' / 'run'
    run(toy, out, '--max-steps', '1')
    # a file: parse_args resolves a run folder to its newest checkpoint before the process group exists
    outs = finish(launch(['--ckpt', out / 'checkpoints' / '0000001.pt', '--num-samples', '4', '--mode', 'ode', '--num-steps', '2',
                          '--sample-dir', tmp_path / 's'], node1=private_view(tmp_path / 'runs'), script='sample.py'))
    one_line_per_node(outs, '--ckpt and the sample folder must be on a file system all nodes share')
    assert not (tmp_path / 's').exists()
