"""train_vanilla.py end to end on tiny toy data: the loss, DDP, exact resume, signals and the clear errors."""
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_method_flags, torchrun

import prepare
import sit
import train_vanilla

SCRIPTS = sorted(f[:-3] for f in os.listdir(ROOT) if f.startswith('train_') and f.endswith('.py'))
TINY = ['--model', 'SiT-T/8', '--global-batch', '16', '--lr', '1e-3', '--ema-decay', '0.9', '--log-every', '2',
        '--num-workers', '0', '--sample-every', '0', '--ckpt-every', '1000']


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
    """2 processes (gloo) with 2 accumulation steps: the loss falls and both ranks end with identical weights (a
    missing all-reduce on the last micro-batch, or one on every micro-batch, would show here)."""
    out = tmp_path / 'ddp'
    r = torchrun(tmp_path, 'train_vanilla', ['--data-path', toy, '--out', out, *TINY, '--max-steps', '30',
                                             '--log-every', '5', '--sample-every', '30', '--grad-accum', '2'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 rank(s)' in r.stdout and 'global batch 16 = 2 x 2 x 4' in r.stdout
    assert os.path.exists(out / 'preview_0000030.png')
    w0, w1 = (torch.load(tmp_path / f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert all(torch.equal(v, w1[k]) for k, v in w0.items())
    losses = [json.loads(l)['loss'] for l in open(out / 'metrics.jsonl')]
    assert losses[-1] < 0.9 * losses[0], losses


def content_keyed_loss(model, x, y):
    """train_vanilla's loss with t and eps derived from each sample's content instead of the RNG, so how a batch is
    split into micro-batches cannot change what is drawn."""
    t = torch.sigmoid(10 * x.mean(dim=(1, 2, 3)))                            # (N,)
    eps = torch.sin(7 * x + 1)                                               # (N, C, H, W)
    t_ = t.view(-1, 1, 1, 1)
    v_pred, _ = model((1 - t_) * x + t_ * eps, t, y)
    return ((v_pred.float() - (eps - x)) ** 2).mean(), {}


def test_grad_accum_gives_the_same_update(toy, tmp_path, monkeypatch):
    """--grad-accum 2 with half the micro-batch = one batch of 16, to float tolerance (clip, AdamW and EMA once
    per optimizer step; the loss is scaled by 1/N). The logged loss is the mean over the micro-batches."""
    monkeypatch.setattr(train_vanilla, 'compute_loss', content_keyed_loss)
    flags = ['--max-steps', '3', '--label-dropout', '0', '--log-every', '3', '--grad-clip', '0.05']
    a = run(toy, tmp_path / 'a', *flags)
    b = run(toy, tmp_path / 'b', *flags, '--grad-accum', '2')
    c = run(toy, tmp_path / 'c', *flags, '--grad-accum', '4', '--global-batch', '8')   # another batch: differs
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6, rtol=1e-5), k
    assert any(not torch.allclose(v, c.state_dict()[k], atol=1e-4) for k, v in a.state_dict().items())
    ma, mb = (json.loads(open(tmp_path / d / 'metrics.jsonl').read()) for d in 'ab')
    assert ma['loss'] == pytest.approx(mb['loss'], rel=1e-5)
    assert ma['grad_norm'] == pytest.approx(mb['grad_norm'], rel=1e-5)        # AdamW alone would hide a 2x
    ema = [torch.load(tmp_path / d / 'checkpoints' / '0000003.pt', weights_only=True)['ema'] for d in 'ab']
    assert all(torch.allclose(v, ema[1][k], atol=1e-6, rtol=1e-5) for k, v in ema[0].items())


def test_grad_accum_resume_is_exact(toy, tmp_path):
    a = run(toy, tmp_path / 'a', '--max-steps', '8', '--grad-accum', '2')
    run(toy, tmp_path / 'b', '--max-steps', '3', '--grad-accum', '2')
    b = run(toy, tmp_path / 'b', '--max-steps', '8', '--grad-accum', '2', '--resume', str(tmp_path / 'b'))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize('script', SCRIPTS)
def test_toy_preset_runs(toy, tmp_path, script):
    """What the README's demo runs: each script's --preset toy, for one step (and its checkpoint)."""
    train = __import__(script)
    train.main(['--preset', 'toy', '--data-path', toy, '--out', str(tmp_path / 'run'), '--max-steps', '1',
                '--sample-every', '0'])
    ckpt = torch.load(sit.latest_checkpoint(str(tmp_path / 'run')), weights_only=True)
    assert ckpt['step'] == 1 and ckpt['config']['model'] == 'SiT-T/2' and ckpt['config']['global_batch'] == 64


@pytest.mark.parametrize('script', SCRIPTS)
def test_bf16_autocast_path_runs_on_cpu(toy, tmp_path, script, capsys):
    """--precision bf16 runs the CUDA code path on the CPU: bf16 autocast of the student, fp16 of a teacher, the
    preview under autocast, the checkpoint. A dtype mismatch there fails here, not first on a GPU."""
    train = __import__(script)
    model = train.main(['--data-path', toy, '--out', str(tmp_path / 'run'), *TINY, *tiny_method_flags(train),
                        '--precision', 'bf16', '--max-steps', '2', '--sample-every', '2'])
    assert '(bf16)' in capsys.readouterr().out
    assert os.path.exists(tmp_path / 'run' / 'preview_0000002.png')
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # fp32 masters


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


# -----------------------------------------------------------------------------
# the config block: named defaults, presets, --key value overrides, --help from the comments

def test_parse_config_presets_overrides_and_types(capsys):
    parse = lambda *argv: sit.parse_config(train_vanilla.config, train_vanilla.presets, list(argv), 'doc',
                                           train_vanilla.__file__)
    assert parse() == train_vanilla.config                                  # the paper's settings
    cfg = parse('--preset', 'toy', '--max-steps', '5', '--lr', '3e-4')
    assert (cfg['model'], cfg['global_batch'], cfg['max_steps'], cfg['lr']) == ('SiT-T/2', 64, 5, 3e-4)
    assert parse('--compile', 'true')['compile'] is True and parse('--compile', 'False')['compile'] is False
    for bad in (['--compile', 'yes'], ['--compile', '1'], ['--no-such-key', '1'], ['--lr', 'fast'],
                ['--preset', 'huge']):
        with pytest.raises(SystemExit) as e:
            parse(*bad)
        assert e.value.code == 2, bad                                       # argparse's usage error
    with pytest.raises(SystemExit):
        parse('--wandb', 'yes')
    assert "expected true or false, got 'yes'" in capsys.readouterr().err  # the message says what is accepted


def test_help_reads_the_config_comments(capsys):
    with pytest.raises(SystemExit) as e:
        train_vanilla.main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())                          # argparse wraps lines
    assert e.value.code == 0
    assert '--grad-accum INT micro-batches per optimizer step' in out and '(default: 1)' in out
    assert '--compile BOOLEAN torch.compile the model (CUDA) (default: False)' in out
    assert 'toy: data_path=data/toy' in out and '--method' not in out


@pytest.mark.parametrize('script', ['train_vanilla', 'train_repa', 'train_haste', 'train_reg', 'train_carflow'])
def test_every_script_prints_its_help(script, capsys):
    # a config comment with a '%' (CAR-Flow's "0.44%") once crashed argparse's help formatting
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert e.value.code == 0 and '--lr FLOAT' in out
    if script == 'train_carflow':
        assert '0.44%' in out
