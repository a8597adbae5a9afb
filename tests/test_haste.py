"""train_haste.py: the attention loss by hand, the CLS row and column dropped before the softmax, the switch at
exactly tau (counted teacher calls, crossing tau and resumed past it), and a 2-process run across tau."""
import json

import pytest
import torch
from conftest import one_line_error, torchrun

import sit
import train_haste

TINY = ['--model', 'SiT-T/8', '--global-batch', '8', '--lr', '1e-3', '--ema-decay', '0.9', '--num-workers', '0',
        '--sample-every', '0', '--ckpt-every', '1000', '--enc', 'dinov2-s', '--enc-ckpt', 'random',
        '--encoder-depth', '2', '--projector-dim', '64', '--attn-student', '1,2', '--attn-teacher', '10,11',
        '--log-every', '1']


def test_attention_loss_by_hand():
    """Student 3 heads, teacher 2: heads 0 and 1 pair; per pair -sum_k p_t log p_s, mean over batch, heads, rows."""
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    t = [torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)]
    by_hand = 0.0
    for sp, tp in zip(s, t):
        total = 0.0
        for n in range(2):
            for h in range(2):
                for q in range(4):
                    p = torch.exp(tp[n, h, q]) / torch.exp(tp[n, h, q]).sum()
                    ps = torch.exp(sp[n, h, q]) / torch.exp(sp[n, h, q]).sum()
                    total += -(p * torch.log(ps)).sum()
        by_hand += total / (2 * 2 * 4) / 2
    assert torch.allclose(train_haste.attention_loss(s, t), by_hand, atol=1e-5)


def test_gradient_vanishes_where_student_matches_teacher():
    torch.manual_seed(0)
    t = torch.randn(2, 2, 5, 5)
    s = torch.cat([t + 3.0, torch.randn(2, 1, 5, 5)], dim=1).requires_grad_()  # + a constant per row: same softmax
    train_haste.attention_loss([s], [t]).backward()
    assert s.grad.abs().max() < 1e-6                                         # extra student heads get none either
    s2 = torch.randn(2, 3, 5, 5, requires_grad=True)
    train_haste.attention_loss([s2], [t]).backward()
    assert s2.grad[:, :2].abs().max() > 1e-3 and s2.grad[:, 2].abs().max() == 0


class Spy:
    """Counts teacher forwards and records, per SiT training forward, whether it asked for projections or logits."""

    def __init__(self, monkeypatch):
        self.teacher, self.student, self.attn_in = 0, [], []
        teacher_forward, sit_forward, loss = sit.Teacher.forward, sit.SiT.forward, train_haste.attention_loss

        def count_teacher(module, *a, **k):
            self.teacher += 1
            return teacher_forward(module, *a, **k)

        def record_sit(module, *a, return_zs=False, attn_blocks=(), **k):
            self.student.append((return_zs, tuple(attn_blocks)))
            return sit_forward(module, *a, return_zs=return_zs, attn_blocks=attn_blocks, **k)

        def record_loss(student, teacher):
            self.attn_in.append(teacher)
            return loss(student, teacher)
        monkeypatch.setattr(sit.Teacher, 'forward', count_teacher)
        monkeypatch.setattr(sit.SiT, 'forward', record_sit)
        monkeypatch.setattr(train_haste, 'attention_loss', record_loss)


def test_switch_at_exactly_tau_and_resume_past_it(toy, tmp_path, monkeypatch, capsys):
    spy = Spy(monkeypatch)
    out = tmp_path / 'run'
    run = lambda *a: train_haste.main(['--data-path', toy, '--out', str(out), *TINY, '--tau', '3', *a])
    model = run('--max-steps', '5', '--ckpt-every', '4')
    assert spy.teacher == 3                                                 # optimizer steps 0, 1, 2 (step < tau)
    assert spy.student == [(True, (1, 2))] * 3 + [(False, ())] * 2          # then no projector, no logits
    assert 'phase II from step 3' in capsys.readouterr().out
    logged = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [m['attn'] > 0 for m in logged] == [True] * 3 + [False] * 2 and logged[4]['proj'] == 0
    assert all(p.grad is None for p in model.projectors.parameters())      # not in the phase II graph
    # the teacher's logits reach the loss without the CLS row and column, over the patch keys only
    grid = 16 // 8
    assert spy.attn_in[0][0].shape == (8, 6, grid ** 2, grid ** 2)
    # resumed past tau (from the checkpoint at step 4): phase II from the first step, no teacher call at all
    spy.teacher, spy.student = 0, []
    (out / 'checkpoints' / '0000005.pt').unlink()
    run('--max-steps', '6', '--ckpt-every', '4')
    assert spy.teacher == 0 and spy.student == [(False, ())] * 2


def test_cls_is_dropped_before_the_softmax(toy, tmp_path, monkeypatch):
    """What the loss gets is the teacher's pre-softmax logits[:, :, 1:, 1:]: its softmax over the patch keys sums
    to 1 per row; a softmax over all 1 + T keys, then cut, would not."""
    spy = Spy(monkeypatch)
    captured = []
    real = sit.Teacher.forward
    monkeypatch.setattr(sit.Teacher, 'forward', lambda m, *a, **k: captured.append(real(m, *a, **k)) or captured[-1])
    train_haste.main(['--data-path', toy, '--out', str(tmp_path / 'r'), *TINY, '--max-steps', '1'])
    full, seen = captured[0]['attn'][0], spy.attn_in[0][0]                  # (N, H, 1 + T, 1 + T), (N, H, T, T)
    assert torch.equal(seen, full[:, :, 1:, 1:])
    assert torch.allclose(seen.softmax(-1).sum(-1), torch.ones(()), atol=1e-6)
    assert (full.softmax(-1)[:, :, 1:, 1:].sum(-1) < 0.999).any()


def test_every_flag_is_checked_before_the_teacher_is_built(toy, tmp_path, monkeypatch, capsys):
    """A mistyped flag is refused in one line before any teacher is built or fetched (DINOv2-g is 1.1B parameters,
    and offline a download error would hide the flag's), and nothing is written."""
    def forbidden(*a, **k):
        raise AssertionError('the teacher was built before the flags were checked')
    monkeypatch.setattr(sit, 'load_teacher', forbidden)
    base = ['--data-path', toy, '--out', str(tmp_path / 'x'), *TINY]
    for flags, word in [(['--attn-student', '1,9'], '--attn-student'),     # SiT-T has blocks 0..5
                        (['--attn-teacher', '11'], '--attn-teacher'),       # one index for two student blocks
                        (['--attn-teacher', '10,12'], '--attn-teacher'),    # ViT-S has blocks 0..11
                        (['--enc', 'dinov2-l', '--attn-teacher', '23,24'], '0..23'),  # the depth follows --enc
                        (['--enc', 'dinov2-q'], '--enc'),
                        (['--encoder-depth', '7'], '--encoder-depth'),
                        (['--tau', '-5'], '--tau')]:                       # it trained plain SiT labelled HASTE
        assert word in one_line_error(train_haste.main, base + flags), flags
    # the toy preset: the flag's error, not the random-teacher banner
    one_line_error(train_haste.main, ['--preset', 'toy', '--data-path', toy, '--out', str(tmp_path / 'x'),
                                      '--attn-teacher', '10,12'])
    assert capsys.readouterr() == ('', '') and not (tmp_path / 'x').exists()
    with pytest.raises(AssertionError, match='teacher was built'):  # ViT-L's last blocks pass the check
        train_haste.main(base + ['--enc', 'dinov2-l', '--attn-teacher', '22,23'])


def test_tau_zero_is_announced_before_the_teacher(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sit, 'load_teacher', lambda *a, **k: sit.fail('stop here'))
    one_line_error(train_haste.main, ['--data-path', toy, '--out', str(tmp_path / 'x'), *TINY, '--tau', '0'])
    out = capsys.readouterr().out
    assert '--tau 0' in out and 'no projection or attention loss at all' in out and 'plain SiT' in out
    one_line_error(train_haste.main, ['--data-path', toy, '--out', str(tmp_path / 'x'), *TINY, '--tau', '1'])
    assert '--tau' not in capsys.readouterr().out


def test_teacher_depths_are_timms():
    """sit.teacher_depth (what --attn-teacher is checked against) is the block count of each DINOv2 timm builds
    (on the meta device: no weights, no memory) and of the toy teacher."""
    timm = pytest.importorskip('timm')
    assert set(sit.DINOV2_DEPTH) == set(sit.DINOV2)
    for name, arch in sit.DINOV2.items():
        with torch.device('meta'):
            assert len(timm.create_model(arch, pretrained=False, num_classes=0).blocks) == sit.teacher_depth(name)
    assert sit.teacher_depth('toy', 'random') == len(sit.build_toy_vit(8).blocks)


def test_two_ranks_cross_tau(toy, tmp_path):
    """DDP is re-wrapped at tau once the projector stops requiring grad: no unused-parameter error, identical
    weights on both ranks, the alignment terms zero from tau on."""
    out = tmp_path / 'run'
    r = torchrun(tmp_path, 'train_haste', ['--data-path', toy, '--out', out, *TINY, '--tau', '3', '--max-steps', '6'])
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert all(torch.equal(v, w1[k]) for k, v in w0.items())
    logged = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [m['attn'] == 0 for m in logged] == [False] * 3 + [True] * 3


def test_teacher_blocks_count_from_the_end():
    """'-2,-1' (the toy preset's --attn-teacher) is the teacher's last two blocks whatever its depth: the toy
    teacher's 2, 3 and DINOv2-S's 10, 11; out of range is one line."""
    assert sit.parse_blocks('-2,-1', 4, '--attn-teacher') == (2, 3)
    assert sit.parse_blocks('-2,-1', 12, '--attn-teacher') == (10, 11) == sit.parse_blocks('10,11', 12, 'x')
    assert '-12..-1' in one_line_error(sit.parse_blocks, '-13', 12, '--attn-teacher')
