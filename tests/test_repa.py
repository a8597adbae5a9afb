"""train_repa.py: the alignment loss by hand, REPA's checkpoint layout, and a short toy run in this process (the
2-process mechanics are the template's, tested with train_vanilla)."""
import json

import pytest
import torch

import sit
import train_repa

TINY = ['--model', 'SiT-T/8', '--global-batch', '8', '--lr', '1e-3', '--ema-decay', '0.9', '--num-workers', '0',
        '--sample-every', '0', '--ckpt-every', '1000', '--enc', 'dinov2-s', '--enc-ckpt', 'random',
        '--encoder-depth', '2', '--projector-dim', '64']


def test_alignment_loss_by_hand():
    torch.manual_seed(0)
    model = sit.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=4,
                    z_dims=[12], projector_dim=16, encoder_depth=2)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, y, target = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4]), torch.randn(3, 16, 12)
    torch.manual_seed(1)
    loss, terms = train_repa.compute_loss(model, x, y, target, 0.5)
    # by hand: same t and eps, hidden state after block 2 through the projector, -cos per token
    torch.manual_seed(1)
    t, eps = torch.rand(3), torch.randn(3, 3, 8, 8)
    lv, lp = 0.0, 0.0
    for i in range(3):
        xt = (1 - t[i]) * x[i:i + 1] + t[i] * eps[i:i + 1]
        h = model.x_embedder(xt) + model.pos_embed
        c = model.t_embedder(t[i:i + 1]) + model.y_embedder(y[i:i + 1])
        for b in model.blocks[:2]:
            h, _ = b(h, c)
        z = model.projectors[0](h)[0].double()                              # (16, 12)
        tg = target[i].double()
        cos = (z * tg).sum(-1) / (z.norm(dim=-1) * tg.norm(dim=-1))
        lp += -cos.mean() / 3
        lv += ((model(xt, t[i:i + 1], y[i:i + 1])[0] - (eps[i:i + 1] - x[i:i + 1])) ** 2).mean() / 3
    assert torch.allclose(terms['proj'].double(), lp, atol=1e-6)
    assert torch.allclose(terms['loss_v'].double(), lv.double(), atol=1e-6)
    assert torch.allclose(loss.double(), lv + 0.5 * lp, atol=1e-6)


def test_toy_run_and_checkpoint_layout(toy, tmp_path, capsys):
    out = tmp_path / 'repa'
    train_repa.main(['--data-path', toy, '--out', str(out), *TINY, '--max-steps', '24', '--log-every', '4'])
    assert 'RANDOM weights' in capsys.readouterr().err                        # the loud warning
    logged = [json.loads(l) for l in open(out / 'metrics.jsonl')]
    assert logged[-1]['loss'] < logged[0]['loss'] and logged[-1]['proj'] < logged[0]['proj']
    assert all(abs(m['loss'] - (m['loss_v'] + 0.5 * m['proj'])) < 1e-4 for m in logged)
    ckpt = torch.load(sit.latest_checkpoint(str(out)), weights_only=True)
    proj = sorted(k for k in ckpt['ema'] if k.startswith('projectors.'))
    assert proj == [f'projectors.0.{i}.{w}' for i in (0, 2, 4) for w in ('bias', 'weight')]   # REPA's names
    assert ckpt['ema']['projectors.0.4.weight'].shape == (384, 64)          # -> ViT-S width
    assert ckpt['config']['method'] == 'repa' and ckpt['model_args']['encoder_depth'] == 2


def test_teacher_errors(toy, tmp_path):
    with pytest.raises(SystemExit, match='teacher weights not found'):
        train_repa.main(['--data-path', toy, '--out', str(tmp_path / 'x'), *TINY, '--enc-ckpt', str(tmp_path / 'no.pth')])
    with pytest.raises(SystemExit, match='--encoder-depth 9 is outside'):
        train_repa.main(['--data-path', toy, '--out', str(tmp_path / 'x'), *TINY, '--encoder-depth', '9'])
