"""The toy lab's pieces: the toy teacher (prepare.py toy --teacher, sit.load_teacher('toy')) and the toy FD
(prepare.py toy --fd, fid.py --features toy)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error
from test_teacher import check_attention_logits

import fid
import prepare
import sit
import train_haste
import train_reg
import train_repa


@pytest.fixture(scope='module')
def teacher(toy):
    return sit.load_teacher('toy', grid=8, data_path=toy)


@pytest.fixture(scope='module')
def images():
    return torch.from_numpy(prepare.draw_toy_set(1, 16, seed=5)[0][:3])  # (3, 3, 16, 16) uint8


# -----------------------------------------------------------------------------
# the toy teacher

def test_toy_teacher_interface(teacher, images):
    """SiT-T/2's 8x8 token grid on 16 px images, a class token, and per-block logits as DINOv2's (same checks)."""
    assert isinstance(teacher, sit.Teacher) and not any(p.requires_grad for p in teacher.parameters())
    assert len(teacher.vit.blocks) == sit.TOY_TEACHER['depth'] and teacher.dim == sit.TOY_TEACHER['embed_dim']
    out = teacher(images)
    assert out['patch'].shape == (3, 64, 128) and out['cls'].shape == (3, 128)
    feats = teacher.vit.forward_features(teacher.preprocess(images))
    torch.testing.assert_close(out['patch'], feats[:, 1:])
    torch.testing.assert_close(out['cls'], feats[:, 0])
    check_attention_logits(teacher, images, (3, 0))


def test_toy_teacher_is_deterministic_and_saved_exactly(toy, teacher):
    """Training again with the conftest's seed and schedule gives the saved weights bit for bit; another seed not."""
    x, y = np.load(os.path.join(toy, 'images.npy')), np.load(os.path.join(toy, 'labels.npy'))
    again = prepare.train_toy_teacher(x, y, grid=8, seed=0, epochs=1, batch_size=40, log=lambda s: None)
    saved = teacher.vit.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in again.state_dict().items())
    other = prepare.train_toy_teacher(x, y, grid=8, seed=1, epochs=1, batch_size=40, log=lambda s: None)
    assert not torch.equal(other.blocks[0].attn.qkv.weight, saved['blocks.0.attn.qkv.weight'])
    with open(os.path.join(toy, 'teacher.json')) as f:
        assert json.load(f)['grid'] == 8


def test_toy_teacher_errors(toy, tmp_path, capsys):
    msg = one_line_error(lambda: sit.load_teacher('toy', grid=8, data_path=str(tmp_path)))
    assert f'python prepare.py toy --out {tmp_path} --teacher' in msg and '--enc-ckpt random' in msg
    msg = one_line_error(lambda: sit.load_teacher('toy', grid=4, data_path=toy))
    assert '8x8' in msg and '4x4' in msg
    t = sit.load_teacher('toy', weights='random', grid=8)
    assert 'RANDOM' in capsys.readouterr().err and len(t.vit.blocks) == sit.TOY_TEACHER['depth']


def test_toy_presets_use_the_toy_teacher(toy, tmp_path, capsys):
    """REPA, HASTE and REG's toy preset align with the trained toy teacher (no random-weights warning); HASTE's
    teacher blocks exist in it. One HASTE step (teacher tokens and logits) runs on the conftest's toy teacher."""
    for train in (train_repa, train_haste, train_reg):
        assert train.presets['toy']['enc'] == 'toy' and train.presets['toy']['enc_ckpt'] == ''
    blocks = sit.parse_blocks(train_haste.presets['toy']['attn_teacher'], sit.TOY_TEACHER['depth'], '--attn-teacher')
    assert list(blocks) == [2, 3]  # the toy teacher's last two ('-2,-1'), as the paper's are ViT-B's last four
    train_haste.main(['--preset', 'toy', '--data-path', toy, '--out', str(tmp_path / 'run'), '--max-steps', '1',
                      '--global-batch', '8', '--sample-every', '0'])
    assert 'RANDOM' not in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the toy FD

def blur(x, sigma):  # uint8 (N, 3, R, R) -> Gaussian blur, reflect padding
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1.) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(torch.float64)
    x = torch.from_numpy(x).double()
    x = F.pad(x, (r, r, r, r), mode='reflect')
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def noise(x, std, seed=0):
    rng = np.random.default_rng(seed)
    return (x + rng.normal(0, std, x.shape)).round().clip(0, 255).astype(np.uint8)


def grey(x):  # the right shapes without their colours
    return np.repeat(np.round(x.astype(np.float64).mean(1, keepdims=True)), 3, axis=1).astype(np.uint8)


def corrupted(per_class, seed):
    """name -> uint8 (N, 3, 16, 16): a second held-out set and its corruptions, mildest first within each kind."""
    x, _ = prepare.draw_toy_set(per_class, 16, seed)
    return {'held-out': x, 'blur 0.5': blur(x, 0.5), 'blur 1': blur(x, 1.0), 'blur 2': blur(x, 2.0),
            'noise 8': noise(x, 8), 'noise 24': noise(x, 24), 'noise 64': noise(x, 64), 'grey': grey(x),
            'shape/colour swapped': prepare.draw_toy_set(per_class, 16, seed, colours='next')[0]}


def save_npz(path, x):
    np.savez(path, arr_0=x.transpose(0, 2, 3, 1))  # (N, H, W, 3), what fid.py reads
    return str(path)


@pytest.fixture(scope='module')
def toy_fd(tmp_path_factory):
    """A toy FD network trained briefly (fewer images and epochs than prepare.py's), its reference set on disk."""
    d = tmp_path_factory.mktemp('fd')
    net = prepare.train_toy_fd(seed=1, per_class=150, epochs=3, log=lambda s: None)
    prepare._save_net(net, str(d / 'fd.safetensors'), dict(width=16, classes=10, resolution=16))
    return net, save_npz(d / 'fd_ref.npz', prepare.draw_toy_set(100, 16, seed=2)[0])


def test_toy_fd_is_the_frechet_distance_of_toynet_features(toy_fd, tmp_path):
    net, ref = toy_fd
    x = corrupted(30, seed=3)['blur 1']
    res = fid.evaluate(save_npz(tmp_path / 's.npz', x), ref, features='toy', device='cpu', cache=False)
    with torch.no_grad():
        a, b = (net(torch.from_numpy(v).float()).double().numpy()                     # (N, 64) each
                for v in (x, fid.load_images(ref).transpose(0, 3, 1, 2)))
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # closed form by an independent route: tr sqrt(S1 S2) from the eigenvalues of S1 S2 (real, nonnegative)
    tr = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    expect = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr
    assert res['fd_toy'] == pytest.approx(expect, rel=1e-6) and res['num_samples'] == 300


def test_toy_fd_behaves_as_a_metric(toy_fd, tmp_path):
    """A second held-out set is near 0; the corruptions score above it, more so the stronger they are (noise of std
    8 of 255 is below what the toy FD sees, so it is only ordered against the stronger noise)."""
    _, ref = toy_fd
    fd = {name: fid.evaluate(save_npz(tmp_path / f'{i}.npz', x), ref, features='toy', device='cpu')['fd_toy']
          for i, (name, x) in enumerate(corrupted(100, seed=3).items())}  # REF's features: once, then cached
    assert all(fd['held-out'] < 0.1 * fd[k] for k in ('blur 1', 'blur 2', 'noise 64', 'grey')), fd
    assert all(fd['held-out'] < 0.6 * fd[k] for k in ('blur 0.5', 'noise 24', 'shape/colour swapped')), fd
    assert fd['blur 0.5'] < fd['blur 1'] < fd['blur 2'] and fd['noise 8'] < fd['noise 24'] < fd['noise 64'], fd


def test_toy_fd_command_line_and_errors(toy_fd, tmp_path, capsys):
    _, ref = toy_fd
    fid.main([save_npz(tmp_path / 's.npz', corrupted(10, seed=4)['held-out']), ref, '--features', 'toy', '--json',
              '--no-cache'])
    assert json.loads(capsys.readouterr().out)['fd_toy'] > 0
    big = save_npz(tmp_path / 'big.npz', np.zeros((4, 3, 32, 32), np.uint8))
    with pytest.raises(SystemExit, match='trained on 16x16'):
        fid.evaluate(big, ref, features='toy', device='cpu', cache=False)
    with pytest.raises(SystemExit, match='prepare.py toy --out DATA --fd'):
        fid.evaluate(big, ref, features='toy', toy_weights=str(tmp_path / 'none.safetensors'), cache=False)


def test_draw_toy_set_is_the_toy_set(toy):
    """draw_toy_set (the teacher's held-out sets, the FD reference) draws exactly as prepare_toy writes."""
    x, y = prepare.draw_toy_set(12, 16, seed=0)
    assert np.array_equal(x, np.load(os.path.join(toy, 'images.npy')))
    assert np.array_equal(y, np.load(os.path.join(toy, 'labels.npy')))


def corner_spread(x):
    """Per image, the largest difference between a corner pixel and the mean of the four corners (no shape reaches
    a corner): 0 on a plain background. uint8 (N, 3, R, R) -> (N,)"""
    c = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].astype(float)                   # (N, 3, 4)
    return np.abs(c - c.mean(2, keepdims=True)).max(axis=(1, 2))


def test_textured_background_is_the_harder_variant(tmp_path, monkeypatch, capsys):
    """prepare.py toy --background textured: clutter behind every shape (the corners differ), the shapes in their
    class colours on top, recorded in dataset.json so that a plain set is not taken for it; the toy FD's network and
    reference set are drawn on the same background."""
    out = tmp_path / 'textured'
    prepare.main(['toy', '--out', str(out), '--per-class', '3', '--background', 'textured'])
    x, y = prepare.draw_toy_set(3, 16, seed=0, background='textured')
    assert np.array_equal(np.load(out / 'images.npy'), x) and np.array_equal(np.load(out / 'labels.npy'), y)
    assert json.loads((out / 'dataset.json').read_text())['toy']['background'] == 'textured'
    assert corner_spread(x).min() > 10 and corner_spread(prepare.draw_toy_set(3, 16, seed=0)[0]).max() < 1
    # the shapes are pasted over the clutter in their class colours (+-20 per channel, as on the plain background)
    red = np.array(prepare.TOY_CLASSES[0][2])[:, None, None]
    for k in range(5):
        disc = prepare.draw_toy(0, np.random.default_rng(k), 16, background='textured').astype(int)  # (3, 16, 16)
        assert (np.abs(disc - red).max(0) <= 25).sum() >= 20                    # a disc of radius >= 4.5 px
    assert 'does not hold this toy set' in one_line_error(prepare.main, ['toy', '--out', str(out), '--per-class', '3'])
    seen = {}

    def tiny_fd(seed, resolution, background):
        seen['background'] = background
        return fid.ToyNet(8, 10, resolution)
    monkeypatch.setattr(prepare, 'train_toy_fd', tiny_fd)
    prepare.prepare_toy_fd(str(out))
    assert seen['background'] == 'textured'
    assert json.loads((out / 'fd.json').read_text())['background'] == 'textured'
    assert corner_spread(np.load(out / 'fd_ref.npz')['arr_0'][:200].transpose(0, 3, 1, 2)).min() > 10


# -----------------------------------------------------------------------------
# the teacher cache (prepare.py teacher-cache, --enc-cache)

def test_teacher_cache_trains_exactly_as_the_live_teacher(toy, tmp_path):
    """The teacher's outputs made once, then three steps of HASTE (patch tokens, and the attention logits until
    tau) and of REG (its class token) with --enc-cache: the same losses and the same weights, bit for bit, as with
    the live toy teacher. The batches are shuffled, so each image's row is found by its bytes."""
    cache = prepare.prepare_teacher_cache(toy, 'toy', out=str(tmp_path / 'cache'), log=lambda s: None)
    common = ['--preset', 'toy', '--data-path', toy, '--max-steps', '3', '--global-batch', '16', '--sample-every', '0',
              '--log-every', '1']
    for train, extra in ((train_haste, ['--tau', '2']), (train_reg, [])):
        runs = [str(tmp_path / f"{train.config['method']}-{kind}") for kind in ('live', 'cached')]
        live = train.main(common + extra + ['--out', runs[0]]).state_dict()
        cached = train.main(common + extra + ['--out', runs[1], '--enc-cache', cache]).state_dict()
        assert all(torch.equal(live[k], cached[k]) for k in live), train.config['method']
        logs = [[{k: v for k, v in json.loads(line).items() if k != 'img_per_s'}
                 for line in open(os.path.join(r, 'metrics.jsonl'))] for r in runs]
        assert logs[0] == logs[1] and len(logs[0]) == 3
    with open(os.path.join(cache, 'cache.json')) as f:
        meta = json.load(f)
    assert meta['attn_blocks'] == [2, 3] and meta['count'] == 120 and meta['teacher'].startswith('toy (teacher.')


def test_teacher_cache_of_dinov2_gives_the_live_losses(toy, tmp_path):
    """The lab's teacher, DINOv2-S (random weights from a file), live and from its cache: the training losses of
    HASTE (patch tokens and attention logits, before tau) and REG (patch and class tokens) agree to float rounding.
    Not bit for bit as with the toy teacher: the cache ran the ViT on batches of 50, training on batches of 16."""
    import timm
    from safetensors.torch import save_file
    weights = str(tmp_path / 'dinov2_s.safetensors')
    torch.manual_seed(0)
    save_file(timm.create_model(sit.DINOV2['dinov2-s'], pretrained=False, num_classes=0).state_dict(), weights)
    enc = ['--enc', 'dinov2-s', '--enc-ckpt', weights]
    cache = prepare.prepare_teacher_cache(toy, 'dinov2-s', weights, out=str(tmp_path / 'cache'), log=lambda s: None)
    common = ['--preset', 'toy', '--data-path', toy, '--global-batch', '16', '--sample-every', '0', '--log-every', '1']
    for train, extra in ((train_haste, ['--max-steps', '2', '--tau', '2']), (train_reg, ['--max-steps', '1'])):
        runs = [str(tmp_path / f"{train.config['method']}-{kind}") for kind in ('live', 'cached')]
        train.main(common + enc + extra + ['--out', runs[0]])
        train.main(common + enc + extra + ['--out', runs[1], '--enc-cache', cache])
        logs = [[json.loads(line) for line in open(os.path.join(r, 'metrics.jsonl'))] for r in runs]
        keys = [k for k in logs[0][0] if k not in ('step', 'img_per_s')]
        assert {'loss', 'loss_v', 'proj'} <= set(keys), keys            # the total and each term (HASTE's attn)
        for live, cached in zip(*logs):
            for k in keys:
                assert cached[k] == pytest.approx(live[k], rel=1e-5, abs=1e-7), (train.config['method'], k)


def test_teacher_cache_refuses_what_it_does_not_hold(toy, tmp_path):
    cache = prepare.prepare_teacher_cache(toy, 'toy', out=str(tmp_path / 'cache'), log=lambda s: None)
    other = tmp_path / 'other'
    other.mkdir()
    for f in ('teacher.safetensors', 'teacher.json'):
        (other / f).write_bytes(open(os.path.join(toy, f), 'rb').read() + (b' ' if f.endswith('json') else b''))
    (other / 'teacher.safetensors').write_bytes((other / 'teacher.safetensors').read_bytes()[:-1] + b'\x00')
    msg = one_line_error(sit.load_teacher, 'toy', str(other / 'teacher.safetensors'), grid=8, data_path=toy, cache=cache)
    assert 'made for another teacher' in msg and 'sha1' in msg
    assert 'grid 8 (this run: 4)' in one_line_error(sit.load_teacher, 'toy', grid=4, data_path=toy, cache=cache)
    assert 'cannot be cached' in one_line_error(sit.load_teacher, 'toy', 'random', grid=8, cache=cache)
    assert 'no teacher cache there' in one_line_error(sit.load_teacher, 'toy', grid=8, data_path=toy,
                                                      cache=str(tmp_path))
    cached = sit.load_teacher('toy', grid=8, data_path=toy, cache=cache)
    images = torch.from_numpy(np.load(os.path.join(toy, 'images.npy'))[[5, 3]])
    assert cached(images)['patch'].shape == (2, 64, sit.TOY_TEACHER['embed_dim'])
    assert 'not in the teacher cache' in one_line_error(cached, images.flip(-1))     # an augmented image
    assert 'blocks [2, 3], not [0]' in one_line_error(cached, images, attn_blocks=(0,))
