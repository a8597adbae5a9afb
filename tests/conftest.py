"""Shared test helpers: the repo on sys.path, a small toy dataset, the one-line-error check and a torchrun runner."""
import os
import socket
import subprocess
import sys

import pytest

# the repo is a flat folder of scripts: make `import sit`, `import train_vanilla`, ... work from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope='session')
def toy(tmp_path_factory):
    """The toy set at 16 px, 12 images per class (120 images), with a toy teacher trained for 3 steps: a few steps of
    any training script."""
    import prepare
    path = tmp_path_factory.mktemp('data') / 'toy'
    prepare.prepare_toy(str(path), per_class=12, resolution=16, seed=0)
    prepare.prepare_toy_teacher(str(path), seed=0, epochs=1, batch_size=40)  # 3 steps: what --preset toy loads
    return str(path)


def one_line_error(fn, *args, **kwargs):
    """fn must exit through sit.fail: SystemExit with one line starting 'error: '. Returns the line."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(tmp_path, module, args, nproc=2, env=None, timeout=300):
    """Run `module.main(args)` under torchrun with nproc CPU processes; each rank saves the returned model's state
    dict to tmp_path/rank<r>.pt. Returns the CompletedProcess (stdout/stderr captured as text)."""
    script = tmp_path / f'run_{module}.py'
    script.write_text(
        'import os, sys, torch\n'
        f'sys.path.insert(0, {ROOT!r})\n'
        f'import {module}\n'
        f'model = {module}.main(sys.argv[1:])\n'
        f'torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, "rank%s.pt" % os.environ["RANK"]))\n')
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}',
           str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))


def tiny_method_flags(train):
    """Flags that make a method's extra networks tiny (a random toy teacher: 4 blocks of width 128; a small
    projector), for the keys that the script's config has."""
    small = dict(enc='toy', enc_ckpt='random', encoder_depth='2', projector_dim='32', attn_student='2,3',
                 attn_teacher='2,3')
    return [x for k, v in small.items() if k in train.config for x in ('--' + k.replace('_', '-'), v)]
