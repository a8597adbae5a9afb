"""train_vanilla.py end to end on tiny toy data: the loss, DDP, exact resume, signals and the clear errors."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import prepare
import sit
import train_vanilla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'SiT-T/8', '--global-batch', '16', '--lr', '1e-3', '--ema-decay', '0.9', '--log-every', '2',
        '--num-workers', '0', '--sample-every', '0', '--ckpt-every', '1000']


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'toy'
    prepare.prepare_toy(str(path), per_class=12, resolution=16, seed=0)   # 120 images: 7 steps per epoch
    return str(path)


def run(toy, out, *extra):
    return train_vanilla.main(['--data-path', toy, '--out', str(out), *TINY, *extra])


def test_loss_is_written_out():
    """compute_loss = mean over all non-batch dims of (v_pred - (eps - x))^2, x_t = (1 - t) x + t eps."""
    torch.manual_seed(0)
    model = sit.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    torch.manual_seed(1)
    loss, terms = train_vanilla.compute_loss(model, x, y)
    torch.manual_seed(1)
    t = torch.rand(5)
    eps = torch.randn(5, 3, 8, 8)
    by_hand = 0.0
    for i in range(5):
        xt = (1 - t[i]) * x[i] + t[i] * eps[i]
        v = model(xt[None], t[i:i + 1], y[i:i + 1])[0][0]
        by_hand += ((v - (eps[i] - x[i])) ** 2).mean() / 5
    assert terms == {} and torch.allclose(loss, by_hand, atol=1e-6)


def test_velocity_sign_and_endpoints():
    """An oracle that returns eps - x (recovered from x_t) has zero loss; x - eps (SiT's sign) does not."""
    x = torch.randn(6, 3, 8, 8)

    def oracle(sign):
        def model(x_t, t, y):
            t_ = t.view(-1, 1, 1, 1)
            eps = (x_t - (1 - t_) * x) / t_          # x_t = (1 - t) x + t eps
            return sign * (eps - x), {}
        return model
    torch.manual_seed(0)
    assert train_vanilla.compute_loss(oracle(+1), x, None)[0] < 1e-8
    torch.manual_seed(0)
    assert train_vanilla.compute_loss(oracle(-1), x, None)[0] > 1.0


def test_exact_resume_and_weights_only(toy, tmp_path):
    """8 steps straight == 4 steps, resume, 4 steps (crossing an epoch boundary), bit for bit."""
    a = run(toy, tmp_path / 'a', '--max-steps', '8')
    run(toy, tmp_path / 'b', '--max-steps', '4')
    b = run(toy, tmp_path / 'b', '--max-steps', '8', '--resume', str(tmp_path / 'b'))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    ca = torch.load(tmp_path / 'a' / 'checkpoints' / '0000008.pt', weights_only=True)
    cb = torch.load(tmp_path / 'b' / 'checkpoints' / '0000008.pt', weights_only=True)
    assert all(torch.equal(v, cb['ema'][k]) for k, v in ca['ema'].items())
    assert ca['step'] == 8 and type(ca['config']) is dict and ca['config']['method'] == 'vanilla'
    group = ca['opt']['param_groups'][0]    # the paper's AdamW: constant lr, betas (0.9, 0.999), eps 1e-8, no decay
    assert (group['lr'], group['betas'], group['eps'], group['weight_decay']) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert train_vanilla.config['lr'] == 1e-4 and train_vanilla.config['ema_decay'] == 0.9999
    # and the run folder has what it promises
    assert {'config.json', 'log.txt', 'metrics.jsonl', 'train_vanilla.py'} <= set(os.listdir(tmp_path / 'a'))
    logged = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl')]
    assert [m['step'] for m in logged] == [2, 4, 6, 8] and {'loss', 'grad_norm', 'img_per_s'} <= set(logged[0])


def test_clear_errors(toy, tmp_path):
    with pytest.raises(SystemExit, match="dataset folder '.*nowhere' does not exist"):
        run(str(tmp_path / 'nowhere'), tmp_path / 'x')
    with pytest.raises(SystemExit, match="unknown model 'SiT-Q/2'"):
        run(toy, tmp_path / 'x', '--model', 'SiT-Q/2')
    odd = tmp_path / 'toy12'
    prepare.prepare_toy(str(odd), per_class=2, resolution=12)
    with pytest.raises(SystemExit, match='latent size 12 is not divisible by the patch size of SiT-T/8'):
        run(str(odd), tmp_path / 'x')


def test_dataset_model_mismatch(toy, tmp_path):
    other = tmp_path / 'toy32'
    prepare.prepare_toy(str(other), per_class=2, resolution=32)
    run(toy, tmp_path / 'r', '--max-steps', '1')
    with pytest.raises(SystemExit, match='built for .* but the data at'):
        run(str(other), tmp_path / 'r', '--max-steps', '2', '--resume', str(tmp_path / 'r'))
    ckpt = torch.load(tmp_path / 'r' / 'checkpoints' / '0000001.pt', weights_only=True)
    ckpt['config']['method'] = 'repa'
    torch.save(ckpt, tmp_path / 'repa.pt')
    with pytest.raises(SystemExit, match='is a repa checkpoint, not vanilla; resume it with train_repa.py'):
        run(toy, tmp_path / 'r', '--max-steps', '2', '--resume', str(tmp_path / 'repa.pt'))
    with pytest.raises(SystemExit, match=r'resume would change lr \(0.001 -> 0.002\)'):
        run(toy, tmp_path / 'r', '--max-steps', '2', '--resume', str(tmp_path / 'r'), '--lr', '2e-3')
    with pytest.raises(SystemExit, match="checkpoint '.*missing.pt' does not exist"):
        run(toy, tmp_path / 'r', '--resume', str(tmp_path / 'missing.pt'))


def test_torchrun_two_ranks(toy, tmp_path):
    """2 processes (gloo): the loss falls and both ranks end with identical weights."""
    script = tmp_path / 'wrap.py'
    script.write_text(
        'import os, sys, torch\nsys.path.insert(0, %r)\nimport train_vanilla\n'
        'model = train_vanilla.main(sys.argv[1:])\n'
        'torch.save(model.state_dict(), os.path.join(%r, "rank%%s.pt" %% os.environ["RANK"]))\n'
        % (ROOT, str(tmp_path)))
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533', str(script),
           '--data-path', toy, '--out', str(out), *TINY, '--max-steps', '30', '--log-every', '5', '--sample-every', '30']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 rank(s)' in r.stdout and os.path.exists(out / 'preview_0000030.png')
    w0, w1 = (torch.load(tmp_path / f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert all(torch.equal(v, w1[k]) for k, v in w0.items())
    losses = [json.loads(l)['loss'] for l in open(out / 'metrics.jsonl')]
    assert losses[-1] < 0.9 * losses[0], losses


def test_sigterm_saves_and_exits(toy, tmp_path):
    out = tmp_path / 'sig'
    cmd = [sys.executable, os.path.join(ROOT, 'train_vanilla.py'), '--data-path', toy, '--out', str(out), *TINY,
           '--max-steps', '100000', '--log-every', '1']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in p.stdout:                    # wait until training is under way
        if 'step 3/' in line:
            break
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 0, rest
    assert 'stopped by signal' in rest
    ckpt = sit.latest_checkpoint(str(out))
    step = torch.load(ckpt, weights_only=True)['step']
    assert step >= 3 and ckpt.endswith(f'{step:07d}.pt')
