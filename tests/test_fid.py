"""Tests for fid.py. CPU only, random weights (no downloads): python -m pytest -q tests/test_fid.py"""

import json
import math
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid  # noqa: E402

# -----------------------------------------------------------------------------
# helpers

def randomize_(net, seed=0):
    """Random weights that keep activations O(1) through ~50 layers (PyTorch's default init makes
    pool3 ~1e-8, which would make every comparison below vacuous)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda shape: torch.randn(shape, generator=g)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(rand(m.weight.shape) * math.sqrt(2 / m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * rand(m.weight.shape))
                m.bias.copy_(0.1 * rand(m.bias.shape))
                m.running_mean.copy_(0.1 * rand(m.running_mean.shape))
                m.running_var.copy_(1 + 0.5 * rand(m.running_var.shape).abs())
            elif isinstance(m, nn.Linear):
                m.weight.copy_(rand(m.weight.shape) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * rand(m.bias.shape))
    return net.eval()

@pytest.fixture(scope='module')
def weights(tmp_path_factory):  # a random-weight stand-in for pt_inception-2015-12-05-6726825d.pth
    path = tmp_path_factory.mktemp('weights') / 'random_inception.pth'
    torch.save(randomize_(fid.InceptionV3()).state_dict(), path)
    return str(path)

@pytest.fixture(scope='module')
def net(weights):
    return fid.load_inception(weights)

class FakeInception(nn.Module):
    """InceptionV3's interface at a fraction of the cost, for tests of the plumbing around it."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # (N, 3, 299, 299) -> pool (N, 2048), spatial (N, 2023)
        f = F.adaptive_avg_pool2d(x, 27).flatten(1)  # (N, 2187)
        return f[:, :2048], f[:, :2023]

def images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)

def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)

def save_pngs(folder, imgs):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(os.path.join(folder, f'{i:03d}.png'))
    return str(folder)

def one_line_exit(excinfo, *words):
    msg = str(excinfo.value)
    assert '\n' not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg

# -----------------------------------------------------------------------------
# Inception network

def test_inception_matches_pytorch_fid(monkeypatch):
    pfi = pytest.importorskip('pytorch_fid.inception')
    # pytorch-fid's own torchvision-layout network, randomized; its "download" returns these weights
    tv = randomize_(pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None), seed=1)
    sd = tv.state_dict()
    monkeypatch.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: sd)
    theirs = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()  # FIDInception* blocks
    fc = pfi.fid_inception_v3().fc  # the 1008-way classifier the wrapper drops
    ours = fid.InceptionV3().eval()
    ours.load_state_dict(sd, strict=True)
    hooked = {}
    theirs.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: hooked.setdefault('b1', o))  # Mixed_6d
    x = torch.randn(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)  # same normalised input
    with torch.no_grad():
        pool, spatial = ours(x)
        ref_pool = theirs(x)[0].flatten(1)
        ref_logits = fc(ref_pool)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    assert pool.std() > 0.01  # non-degenerate features
    torch.testing.assert_close(pool, ref_pool, rtol=1e-4, atol=1e-5 * ref_pool.abs().max().item())
    torch.testing.assert_close(ours.fc(pool), ref_logits, rtol=1e-4, atol=1e-5 * ref_logits.abs().max().item())
    torch.testing.assert_close(spatial, hooked['b1'][:, :7].permute(0, 2, 3, 1).flatten(1), rtol=1e-4, atol=1e-5)

def test_sfid_features_are_channels_last_mixed_6d_branch1x1(net):
    acts = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: acts.append(o))
    x = torch.randn(1, 3, 299, 299, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    with torch.no_grad():
        _, spatial = net(x)
    hook.remove()
    a = acts[-1]  # (1, 192, 17, 17) after BN+ReLU
    assert a.shape == (1, 192, 17, 17) and spatial.shape == (1, 7 * 17 * 17)
    assert (a >= 0).all()
    expect = np.transpose(a[:, :7].numpy(), (0, 2, 3, 1)).reshape(1, -1)  # NHWC flatten, as TF
    np.testing.assert_array_equal(spatial.numpy(), expect)
    for c, h, w in [(0, 0, 1), (6, 16, 3), (3, 5, 11)]:
        assert spatial[0, (h * 17 + w) * 7 + c] == a[0, c, h, w]
    assert not np.array_equal(spatial.numpy(), a[:, :7].reshape(1, -1).numpy())  # NCHW order would differ

# -----------------------------------------------------------------------------
# Preprocessing

def hand_resize(a, oh, ow):
    """TF1 legacy bilinear by hand: src = dst * in/out, floor + lerp, clamp at the border."""
    H, W = a.shape
    out = np.zeros((oh, ow))
    for i in range(oh):
        sy = i * H / oh
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, H - 1); fy = sy - y0
        for j in range(ow):
            sx = j * W / ow
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, W - 1); fx = sx - x0
            top = a[y0, x0] + (a[y0, x1] - a[y0, x0]) * fx
            bot = a[y1, x0] + (a[y1, x1] - a[y1, x0]) * fx
            out[i, j] = top + (bot - top) * fy
    return out

@pytest.mark.parametrize('src,dst', [((5, 7), (3, 4)), ((4, 4), (9, 6)), ((3, 5), (3, 5)), ((6, 2), (13, 3))])
def test_tf1_resize_matches_hand_formula(src, dst):
    a = np.random.default_rng(0).uniform(0, 255, src)
    ours = fid.tf1_resize(torch.tensor(a, dtype=torch.float32)[None, None], dst)[0, 0].numpy()
    np.testing.assert_allclose(ours, hand_resize(a, *dst), atol=1e-3)

# outputs of TensorFlow 2.21's tf.compat.v1.image.resize_bilinear(align_corners=False) on these inputs
TF_A = [[241, 160, 175, 229, 148], [198, 213, 57, 14, 76], [72, 223, 233, 1, 127], [210, 33, 204, 30, 119]]
TF_A_7x3 = [[241.0, 170.0, 202.0], [216.42857360839844, 135.14285278320312, 106.38094329833984],
            [180.0, 126.23811340332031, 35.857139587402344], [107.99998474121094, 195.19049072265625, 40.619041442871094],
            [111.4285888671875, 206.047607421875, 47.761898040771484], [190.2857208251953, 158.80950927734375, 57.285709381103516],
            [210.0, 147.0, 59.66666030883789]]
TF_B = [[209, 77, 87, 71, 184, 65, 253], [113, 122, 129, 149, 141, 130, 254], [206, 202, 179, 159, 87, 253, 119],
        [55, 216, 41, 219, 156, 29, 11], [113, 9, 36, 131, 248, 119, 206], [234, 210, 161, 112, 131, 68, 127]]
TF_B_4x3 = [[209.0, 81.66667175292969, 104.66668701171875], [159.5, 154.0, 165.66665649414062],
            [55.0, 100.33332061767578, 71.3333511352539], [173.5, 106.16666412353516, 125.5000228881836]]

@pytest.mark.parametrize('src,expect', [(TF_A, TF_A_7x3), (TF_B, TF_B_4x3)])
def test_tf1_resize_is_bit_exact_with_tensorflow(src, expect):
    x = torch.tensor(src, dtype=torch.float32)[None, None]
    out = fid.tf1_resize(x, (len(expect), len(expect[0])))[0, 0]
    assert torch.equal(out, torch.tensor(expect, dtype=torch.float32))

def test_tf1_resize_differs_from_half_pixel_interpolate():
    x = torch.rand(1, 3, 32, 32) * 255
    ours = fid.tf1_resize(x, (299, 299))
    half_pixel = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    assert ours.shape == half_pixel.shape == (1, 3, 299, 299)
    assert (ours - half_pixel).abs().max() > 10
    # first output pixel is exactly the first input pixel (no half-pixel shift), the last is clamped
    assert torch.equal(ours[..., 0, 0], x[..., 0, 0])
    pre = fid.inception_preprocess(x)
    assert pre.min() >= -1 and pre.max() < 1

# -----------------------------------------------------------------------------
# FD-DINOv2 network: DINOv2's own position-embedding interpolation

DINOV2_S = 'vit_small_patch14_dinov2.lvd142m'  # the smallest DINOv2, same 37x37 grid at 518 px as ViT-L

def dinov2_interpolate_pos_encoding(pos_embed, w, h, patch_size=14, offset=0.1):
    """DINOv2's DinoVisionTransformer.interpolate_pos_encoding as the torch.hub models run it
    (interpolate_antialias=False, interpolate_offset=0.1), step by step: pos_embed (1, 1 + M*M, D) for an
    input of w x h pixels (w = dim 2 of the image, as there) -> (1, 1 + (w/p)*(h/p), D)."""
    N = pos_embed.shape[1] - 1
    w0, h0 = w // patch_size, h // patch_size
    if w0 * h0 == N and w == h:
        return pos_embed
    M, dim = int(math.sqrt(N)), pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, M, M, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    grid = F.interpolate(grid, mode='bicubic', antialias=False,
                         scale_factor=(float(w0 + offset) / M, float(h0 + offset) / M))  # (1, D, w0, h0)
    assert grid.shape[-2:] == (w0, h0)
    return torch.cat([pos_embed[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, w0 * h0, dim)], 1)

def smooth_pos_embed(dim, M=37, seed=0):  # (1, 1 + M*M, dim): a few waves per channel, smooth as a trained one
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, M), torch.linspace(0, 1, M), indexing='ij')
    f = torch.randn(dim, 3, generator=g) * 3
    waves = torch.sin(f[:, 0, None, None] * x + f[:, 1, None, None] * y + f[:, 2, None, None])  # (dim, M, M)
    return torch.cat([torch.randn(1, 1, dim, generator=g), waves.flatten(1).T[None]], 1)

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

def test_dinov2_pos_embed_is_dinov2s_interpolation_not_timms():
    from timm.layers import resample_abs_pos_embed  # timm's load-time resampling at img_size=224
    g = torch.Generator().manual_seed(0)
    for pe in (torch.randn(1, 1 + 37 * 37, 32, generator=g), smooth_pos_embed(32)):
        ref = dinov2_interpolate_pos_encoding(pe, 224, 224)  # (1, 257, 32)
        ours = fid.dinov2_pos_embed(pe, 16)
        assert ours.shape == ref.shape == (1, 257, 32)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(fid.dinov2_pos_embed(pe[:, 1:], 16, num_prefix=0), ref[:, 1:], rtol=0, atol=1e-6)
        assert fid.dinov2_pos_embed(pe, 37) is pe  # native size: used as it is, as DINOv2 does
        # what timm's img_size=224 load did (exact size, antialiased) fails the check above by far
        assert rel(resample_abs_pos_embed(pe, (16, 16), num_prefix_tokens=1), ref) > 0.01
    # on a smooth embedding nearly all of the gap is the scale-factor offset, not the antialiasing
    assert rel(resample_abs_pos_embed(pe, (16, 16), num_prefix_tokens=1, antialias=False), ref) > 0.01

def test_dinov2_features_match_dinov2s_forward(tmp_path, monkeypatch):
    timm = pytest.importorskip('timm')
    create = timm.create_model  # ViT-S/14 cut to 2 blocks, also inside fid.load_dinov2: 6x faster on a CPU
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: create(*a, depth=2, **k))
    vit = timm.create_model(DINOV2_S, pretrained=False, num_classes=0).eval()  # native 518 px, 37x37 grid
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights with O(1) activations (timm's init: 0.02 std, layer scales 1e-5)
        vit.pos_embed.copy_(smooth_pos_embed(384) + 0.3 * torch.randn(1, 1 + 37 * 37, 384, generator=g))
        vit.cls_token.normal_(generator=g)
        for name, p in vit.named_parameters():
            if name.endswith('gamma'):
                p.uniform_(0.5, 1, generator=g)
            elif name.endswith('weight') and p.ndim > 1:  # linear layers and the patch projection
                p.normal_(std=p[0].numel() ** -0.5, generator=g)
    torch.save(vit.state_dict(), tmp_path / 'vits.pth')
    imgs = torch.stack([torch.rand(3, 40, 40, generator=g), torch.linspace(0, 1, 40).expand(3, 40, 40)]) * 255
    x = fid.dinov2_preprocess(imgs)  # (2, 3, 224, 224): noise and a smooth ramp
    with torch.no_grad():
        # the forward of DINOv2's own ViT, with timm's blocks for its identical blocks
        t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (2, 256, 384)
        t = torch.cat([vit.cls_token.expand(2, -1, -1), t], 1)  # (2, 257, 384)
        t = t + dinov2_interpolate_pos_encoding(vit.pos_embed, x.shape[2], x.shape[3])
        ref = vit.norm(vit.blocks(t))[:, 0]  # (2, 384) CLS after the final norm
        ours = fid.load_dinov2(DINOV2_S, str(tmp_path / 'vits.pth'))(x)
        timm_224 = timm.create_model(DINOV2_S, pretrained=True, img_size=224, num_classes=0,
                                     pretrained_cfg_overlay=dict(file=str(tmp_path / 'vits.pth'))).eval()(x)
    assert ours.shape == (2, 384) and rel(ref[0], ref[1]) > 0.1  # features that depend on the image
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert rel(timm_224, ref) > 5e-3  # 1.4%: the previous network (timm's resampling at load) fails the check above

# -----------------------------------------------------------------------------
# Metrics

def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    a[[1, 4]] = 0  # singular covariances still give the closed form
    b[[1, 2]] = 0
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expect, rel=1e-10)

def test_frechet_distance_matches_sqrtm_and_survives_rank_deficiency():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 20)), rng.normal(size=(400, 20)) @ rng.normal(size=(20, 20)) + 0.5
    (m1, s1), (m2, s2) = fid.gaussian_stats(x), fid.gaussian_stats(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expect = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-8)
    # 5 points in 50-d: covariances of rank 4
    (m1, s1), (m2, s2) = fid.gaussian_stats(rng.normal(size=(5, 50))), fid.gaussian_stats(rng.normal(size=(5, 50)))
    d = fid.frechet_distance(m1, s1, m2, s2)
    assert isinstance(d, float) and np.isfinite(d) and d > 0
    assert abs(fid.frechet_distance(m1, s1, m1, s1)) < 1e-8  # identical singular statistics -> 0

def test_inception_score_constructed_logits():
    assert fid.inception_score(np.tile([1.0, 5.0, -2.0], (30, 1))) == pytest.approx(1.0)
    for n in (2, 4, 10):
        logits = 60.0 * np.eye(n)[np.arange(40) % n]  # confident, classes equally often
        assert fid.inception_score(logits) == pytest.approx(n, rel=1e-6)
    # splits are contiguous: each half is confident about one class -> IS 1 per split
    logits = 60.0 * np.eye(2)[np.repeat([0, 1], 20)]
    assert fid.inception_score(logits, split_size=20) == pytest.approx(1.0, rel=1e-6)
    assert fid.inception_score(logits, split_size=40) == pytest.approx(2.0, rel=1e-6)

def brute_radii(x, k=3):  # distance to the k-th nearest other point
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]

def test_precision_recall_constructed_sets():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 8)).astype(np.float32)
    near = ref[:100] + 1e-3 * rng.normal(size=(100, 8)).astype(np.float32)
    far = ref[:100] + 100
    assert fid.precision_recall(ref, near, batch=7)[0] == 1.0
    assert fid.precision_recall(ref, far, batch=7) == (0.0, 0.0)
    p, _ = fid.precision_recall(ref, np.concatenate([near[:60], far[:40]]), batch=16)
    assert p == pytest.approx(0.6)
    assert fid.precision_recall(ref, ref.copy()) == (1.0, 1.0)
    # against a brute-force k-NN ball membership on general point sets
    a, b = rng.normal(size=(60, 5)).astype(np.float32), rng.normal(size=(45, 5)).astype(np.float32) + 0.7
    d = ((b[:, None] - a[None]) ** 2).sum(-1)  # (45, 60)
    prec = (d <= brute_radii(a)[None]).any(1).mean()
    rec = (d.T <= brute_radii(b)[None]).any(1).mean()
    p, r = fid.precision_recall(a, b, batch=8)
    assert (p, r) == (pytest.approx(prec), pytest.approx(rec))
    assert 0 < p < 1 and 0 < r < 1

# -----------------------------------------------------------------------------
# Inputs

def test_npz_and_png_folder_agree(tmp_path, net):
    imgs = images(5, size=24, seed=3)
    npz = save_npz(tmp_path / 'a.npz', arr_0=imgs)
    np.savez_compressed(tmp_path / 'c.npz', arr_0=imgs)
    folder = save_pngs(tmp_path / 'pngs', imgs)
    for path in (npz, str(tmp_path / 'c.npz'), folder):
        np.testing.assert_array_equal(fid.load_images(path), imgs)
        n, batches, _ = fid.open_input(path)
        assert n == 5 and [len(b) for b in batches(2)] == [2, 2, 1]
    # features through the whole pipeline (2 images: each Inception forward is ~0.5 s on CPU)
    npz, folder = save_npz(tmp_path / 'two.npz', arr_0=imgs[:2]), save_pngs(tmp_path / 'two', imgs[:2])
    f_npz = fid.compute_features(npz, net, batch_size=1)
    f_png = fid.compute_features(folder, net, batch_size=2)
    assert f_npz['pool'].shape == (2, 2048) and f_npz['spatial'].shape == (2, 2023)
    for k in ('pool', 'spatial'):
        np.testing.assert_allclose(f_npz[k], f_png[k], rtol=1e-5, atol=1e-5 * np.abs(f_npz[k]).max())

def test_malformed_inputs_give_one_clear_line(tmp_path, weights):
    good = save_npz(tmp_path / 'good.npz', arr_0=images(4))
    cases = [
        (save_npz(tmp_path / 'float.npz', arr_0=images(4).astype(np.float32) / 255), ['dtype float32', 'uint8']),
        (save_npz(tmp_path / 'nchw.npz', arr_0=images(4).transpose(0, 3, 1, 2).copy()), ['NHWC', 'transpose']),
        (save_npz(tmp_path / 'gray.npz', arr_0=images(4)[..., 0]), ['NHWC']),
        (save_npz(tmp_path / 'named.npz', images=images(4)), ['no arr_0', 'images']),
        (str(tmp_path / 'missing.npz'), ['no such file']),
    ]
    (tmp_path / 'junk.npz').write_text('not a zip')
    cases.append((str(tmp_path / 'junk.npz'), ['not an .npz']))
    os.makedirs(tmp_path / 'empty')
    cases.append((str(tmp_path / 'empty'), ['no .png']))
    for path, words in cases:
        with pytest.raises(SystemExit) as e:
            fid.evaluate(path, good, inception_weights=weights)
        one_line_exit(e, *words)
    with pytest.raises(SystemExit) as e:  # a covariance needs 2 images; fails before any network runs
        fid.evaluate(save_npz(tmp_path / 'one.npz', arr_0=images(1)), good, inception_weights=weights)
    one_line_exit(e, 'at least 2')
    mixed = save_pngs(tmp_path / 'mixed', list(images(2, 16)) + list(images(1, 20)))
    with pytest.raises(SystemExit) as e:
        fid.load_images(mixed)
    one_line_exit(e, '002.png', 'differs')

def test_weights_errors_are_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))  # nothing cached
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(SystemExit) as e:
        fid.load_inception()
    one_line_exit(e, 'URLError', fid.INCEPTION_URL, '--inception-weights')
    with pytest.raises(SystemExit) as e:
        fid.load_inception(str(tmp_path / 'nope.pth'))
    one_line_exit(e, 'no such file')
    torch.save({'fc.weight': torch.zeros(3)}, tmp_path / 'wrong.pth')
    with pytest.raises(SystemExit) as e:
        fid.load_inception(str(tmp_path / 'wrong.pth'))
    one_line_exit(e, 'cannot load Inception weights', 'wrong.pth', '--inception-weights')

def test_inception_state_dict_mismatch_names_the_keys(tmp_path):
    sd = fid.InceptionV3().state_dict()
    del sd['Mixed_7c.branch_pool.bn.running_var']  # removed
    sd['AuxLogits.fc.weight'] = torch.zeros(10, 768)  # extra, as in torchvision's Inception
    sd['fc.bias'] = torch.zeros(1000)  # ImageNet-1k head instead of TF's 1008 classes
    torch.save(sd, tmp_path / 'tv.pth')
    with pytest.raises(SystemExit) as e:
        fid.load_inception(str(tmp_path / 'tv.pth'))
    one_line_exit(e, 'tv.pth', '1 missing keys', 'Mixed_7c.branch_pool.bn.running_var', '1 unexpected',
                  'AuxLogits.fc.weight', '1 of wrong shape', 'fc.bias (1000,) for (1008,)', '--inception-weights')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(SystemExit) as e:
        fid.load_inception(str(tmp_path / 'tensor.pth'))
    one_line_exit(e, 'not a state dict')

def test_bad_input_fails_before_any_weights_or_features(tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError('weights loaded or features computed before both inputs were checked')
    for name in ('compute_features', 'load_inception', 'load_dinov2', '_npz_batches', '_png_batches'):
        monkeypatch.setattr(fid, name, forbidden)
    good = save_npz(tmp_path / 'samples.npz', arr_0=images(4))
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / '000.png').write_text('not a png')
    bad_refs = [(str(tmp_path / 'missing_ref.npz'), ['missing_ref.npz', 'no such file']),
                (save_npz(tmp_path / 'float.npz', arr_0=images(4).astype(np.float32)), ['float.npz', 'uint8']),
                (save_npz(tmp_path / 'one.npz', arr_0=images(1)), ['one.npz', 'at least 2']),
                (str(tmp_path / 'junk'), ['000.png', 'cannot read'])]
    for ref, words in bad_refs:
        for features in ('inception', 'dinov2'):
            with pytest.raises(SystemExit) as e:
                fid.main([good, ref, '--features', features])
            one_line_exit(e, *words)
    with pytest.raises(SystemExit) as e:  # and a bad SAMPLES with a good REF
        fid.main([str(tmp_path / 'missing_samples'), good])
    one_line_exit(e, 'missing_samples', 'no such file')

def forbid_features(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError('weights loaded or features computed before both inputs were checked')
    for name in ('compute_features', 'load_inception', 'load_dinov2', '_npz_batches', '_png_batches'):
        monkeypatch.setattr(fid, name, forbidden)

def test_statistics_files_need_a_whole_numeric_pair(tmp_path, monkeypatch):
    """A reference with sigma but no mu printed 'FID: n/a' and exited 0; an object or string mu gave a traceback;
    half an sFID pair beside images would mix stored and computed statistics. Each is one line naming the file and
    the keys, on either side, before any features run."""
    forbid_features(monkeypatch)
    mu, sigma = np.arange(8.0), np.eye(8)
    good = save_npz(tmp_path / 'good.npz', mu=mu, sigma=sigma)
    bad = [(dict(sigma=sigma), ['sigma float64 (8, 8)', 'no mu']),
           (dict(mu=np.array([object()] * 8), sigma=sigma), ['mu object (8,)']),
           (dict(mu=np.array(['0.5'] * 8), sigma=sigma), ['mu <U3 (8,)']),
           (dict(mu=mu, sigma=np.eye(9)), ['sigma float64 (9, 9)']),
           (dict(mu=sigma, sigma=sigma), ['mu float64 (8, 8)']),
           (dict(arr_0=images(4), mu=mu, sigma=sigma, mu_s=mu), ['mu_s/sigma_s', 'no sigma_s'])]
    for i, (arrays, words) in enumerate(bad):
        path = save_npz(tmp_path / f'bad{i}.npz', **arrays)
        for argv in ([good, path], [path, good]):
            with pytest.raises(SystemExit) as e:
                fid.main(argv)
            one_line_exit(e, f'bad{i}.npz', '(D,) and (D, D)', *words)
    assert fid.evaluate(good, save_npz(tmp_path / 'ints.npz', mu=np.zeros(8, int), sigma=np.eye(8, dtype=int)))['fid'] \
        == pytest.approx(float(mu @ mu))                                    # integer statistics are numbers too

def test_other_dimensions_name_the_shapes_compared(tmp_path):
    a = save_npz(tmp_path / 'a.npz', mu=np.zeros(4), sigma=np.eye(4))
    b = save_npz(tmp_path / 'b.npz', mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(SystemExit) as e:
        fid.main([a, b])
    one_line_exit(e, 'FID', '(4,)/(4, 4)', '(8,)/(8, 8)')

def test_every_image_size_is_checked_before_features(tmp_path, monkeypatch):
    """One image of another size anywhere in a folder, on either side, fails from the PNG headers before any
    features run (it used to surface after all of that side's features)."""
    forbid_features(monkeypatch)
    good = save_pngs(tmp_path / 'good', images(3, 16))
    mixed = save_pngs(tmp_path / 'mixed', list(images(2, 16)) + list(images(1, 20)) + list(images(2, 16)))
    for argv in ([good, mixed], [mixed, good]):
        with pytest.raises(SystemExit) as e:
            fid.main(argv)
        one_line_exit(e, '002.png', 'size 20x20 differs', '000.png (16x16)', 'resize')
    assert fid._image_size(os.path.join(good, '000.png')) == (16, 16) == Image.open(os.path.join(good, '000.png')).size
    Image.fromarray(images(1, 20)[0]).save(tmp_path / 'good' / '003.png', format='JPEG')  # a JPEG named .png
    with pytest.raises(SystemExit) as e:
        fid.main([good, good])
    one_line_exit(e, '003.png', 'size 20x20 differs')

def test_statistics_only_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid, 'load_inception', lambda weights=None: FakeInception().eval())
    rng = np.random.default_rng(0)
    pool, spatial = rng.normal(size=(50, 2048)), rng.normal(size=(50, 2023))
    (mu, sigma), (mu_s, sigma_s) = fid.gaussian_stats(pool), fid.gaussian_stats(spatial)
    ref = save_npz(tmp_path / 'ref_stats.npz', mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    fid.main([ref, ref])  # both sides statistics only: FID/sFID, and notes for the rest
    out = capsys.readouterr().out
    assert 'FID: 0.0000' in out and 'sFID: 0.0000' in out and 'Inception Score: n/a' in out and 'note:' in out
    # images vs statistics-only ref: IS from the samples, precision/recall need the reference images
    res = fid.evaluate(save_npz(tmp_path / 's.npz', arr_0=images(4)), ref)
    assert np.isfinite(res['fid']) and np.isfinite(res['sfid']) and res['inception_score'] >= 1
    assert res['precision'] is None and res['recall'] is None
    assert any('reference images' in n for n in res['notes'])
    # only mu/sigma: sFID is n/a with a note
    res = fid.evaluate(save_npz(tmp_path / 's.npz', arr_0=images(4)), save_npz(tmp_path / 'r.npz', mu=mu, sigma=sigma))
    assert np.isfinite(res['fid']) and res['sfid'] is None and any('sFID' in n for n in res['notes'])

def test_adm_style_reference_uses_stored_statistics(tmp_path, monkeypatch):
    # like VIRTUAL_imagenet256_labeled.npz: images and statistics; as ADM, the statistics give FID/sFID
    # and the images give precision/recall
    net = FakeInception().eval()
    monkeypatch.setattr(fid, 'load_inception', lambda weights=None: net)
    rng = np.random.default_rng(0)
    stored = dict(mu=rng.normal(size=2048), sigma=np.diag(rng.uniform(1, 2, 2048)),
                  mu_s=rng.normal(size=2023), sigma_s=np.diag(rng.uniform(1, 2, 2023)))
    ref = save_npz(tmp_path / 'VIRTUAL.npz', arr_0=images(8, seed=2), **stored)
    smp = save_npz(tmp_path / 'samples.npz', arr_0=images(8, seed=1))
    res = fid.evaluate(smp, ref, cache=False)
    fs, fr = fid.compute_features(smp, net), fid.compute_features(ref, net)
    assert res['fid'] == pytest.approx(fid.frechet_distance(*fid.gaussian_stats(fs['pool']), stored['mu'], stored['sigma']))
    assert res['sfid'] == pytest.approx(fid.frechet_distance(*fid.gaussian_stats(fs['spatial']), stored['mu_s'], stored['sigma_s']))
    assert (res['precision'], res['recall']) == fid.precision_recall(fr['pool'], fs['pool'])
    logits = torch.from_numpy(fs['pool']) @ net.fc.weight.detach().T  # no bias
    assert res['inception_score'] == pytest.approx(fid.inception_score(logits))
    assert res['notes'] == []

# -----------------------------------------------------------------------------
# End to end

def test_cli_end_to_end_and_cache(tmp_path, weights):
    a = save_npz(tmp_path / 'a.npz', arr_0=images(6, seed=1))  # 6 + 6 tiny images: k=3 P/R needs > 3
    b = save_npz(tmp_path / 'b.npz', arr_0=images(6, seed=2))
    cmd = [sys.executable, os.path.join(ROOT, 'fid.py'), a, b, '--inception-weights', weights, '--json']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for k in ('fid', 'sfid', 'inception_score', 'precision', 'recall'):
        assert isinstance(res[k], float) and np.isfinite(res[k]), (k, res)
    assert res['fid'] > 0 and res['inception_score'] >= 1 and 0 <= res['precision'] <= 1
    assert (res['num_samples'], res['num_ref']) == (6, 6)
    assert 'WARNING' in proc.stderr  # 6 images for 2048-d features
    # the reference's features were cached beside it and are served without a network ...
    cache = b + '.inception.stats.npz'
    assert os.path.exists(cache)
    model_id = fid.weights_id(weights, fid.INCEPTION_URL)
    def no_net():
        raise AssertionError('network used despite the cache')
    stats = fid.input_statistics(b, 'inception', no_net, model_id=model_id, cache=True)
    assert stats['pool'].shape == (6, 2048) and stats['n'] == 6
    # ... but not when the file or the weights change
    with pytest.raises(AssertionError):
        fid.input_statistics(b, 'inception', no_net, model_id=('other.pth', 1, 2), cache=True)
    save_npz(b, arr_0=images(6, seed=5))
    with pytest.raises(AssertionError):
        fid.input_statistics(b, 'inception', no_net, model_id=model_id, cache=True)

def test_dinov2_random_weights(tmp_path, capsys):
    a = save_npz(tmp_path / 'a.npz', arr_0=images(3, size=16, seed=1))
    b = save_pngs(tmp_path / 'b', images(3, size=16, seed=2))
    fid.main([a, b, '--features', 'dinov2', '--dinov2-model', 'vit_small_patch14_dinov2.lvd142m',
              '--dinov2-weights', 'random', '--json'])
    res = json.loads(capsys.readouterr().out)
    assert isinstance(res['fd_dinov2'], float) and np.isfinite(res['fd_dinov2']) and res['fd_dinov2'] > 0
    assert 'fid' not in res and not os.path.exists(b + '.dinov2.stats.npz')  # random weights: no cache
    x = fid.dinov2_preprocess(torch.full((2, 3, 16, 16), 255.0))
    assert x.shape == (2, 3, 224, 224)
    torch.testing.assert_close(x[0, :, 5, 5], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_committed_crosscheck_reports_are_what_the_commands_write():
    """docs/crosscheck/*.md are the --report files of tests/crosscheck_adm.py and tests/crosscheck_dinov2.py: the
    command, date and machine, then the printed lines, whose differences follow from the numbers beside them (so no
    number in them was typed by hand)."""
    import glob
    import re
    from conftest import ROOT
    reports = sorted(glob.glob(os.path.join(ROOT, 'docs', 'crosscheck', '*.md')))
    assert [os.path.basename(p) for p in reports] == ['adm-small.md', 'adm-standard.md', 'dinov2.md']
    for path in reports:
        head = re.fullmatch(r'`python tests/(crosscheck_\w+)\.py ([^`]*)` on (\d{4}-\d\d-\d\d), ([^\n]+):\n\n```\n(.*)\n```\n',
                            open(path).read(), re.S)
        assert head, path
        rows = 0
        for line in head.group(5).splitlines():
            adm = re.fullmatch(r'\| ([^|]+) \| ([-\d.e+]+) \| ([-\d.e+]+) \| ([-+\d.e]+) \| ([-\d.e+]+) \|', line)
            vit = re.fullmatch(r'ViT-[SL]/14 (no registers|4 registers ) position embedding (\S+) \((\S+)\)  CLS features '
                               r'(\S+) \((\S+)\)  fid.compute_features (\S+) \((\S+)\)', line)
            if adm:
                a, b, d, r = (float(adm.group(i)) for i in (2, 3, 4, 5))   # printed to 10, 10, 3, 2 digits
                assert abs(d - (b - a)) <= 0.006 * abs(d) + 2e-9 * abs(a), line
                assert abs(r - abs(d) / abs(a)) <= 0.06 * r, line
                rows += 1
            elif vit:
                rows += 1
        assert rows == (8 if 'adm' in path else 4), path
