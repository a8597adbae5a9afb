import math
import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import one_line_error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sit import DINOV2, Teacher, load_teacher

GRID = 4  # 56 px teacher input keeps ViT-S/14 fast on CPU


def says(msg, *words):
    assert all(w in msg for w in words), msg


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(0)
    return load_teacher('dinov2-s', weights='random', grid=GRID)


@pytest.fixture(scope='module')
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_frozen_shapes(teacher, images):
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.resolution == 56 and teacher.grid == GRID and teacher.dim == 384
    out = teacher(images)
    assert set(out) == {'patch', 'cls'}
    assert out['patch'].shape == (2, GRID * GRID, 384) and out['cls'].shape == (2, 384)
    assert out['patch'].dtype == torch.float32 and not out['patch'].requires_grad


def test_fp16_teacher(teacher, images):
    """fp16=True (what training in mixed precision uses): the forward runs under fp16 autocast, targets and
    logits come back in fp32 and close to the fp32 teacher's; fp16=False stays exact fp32 even inside an
    enclosing bf16 autocast (the training loop's)."""
    half = Teacher(teacher.vit, GRID, fp16=True)
    ref, got = teacher(images, attn_blocks=(1,)), half(images, attn_blocks=(1,))
    assert got['patch'].dtype == got['attn'][0].dtype == torch.float32
    assert not torch.equal(got['patch'], ref['patch'])                     # fp16 really ran
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(got['patch'], ref['patch']) < 3e-3 and rel(got['attn'][0], ref['attn'][0]) < 3e-3
    with torch.autocast('cpu', dtype=torch.bfloat16):
        shielded = teacher(images)
    assert torch.equal(shielded['patch'], ref['patch'])


def test_preprocess_by_hand(teacher, images):
    # bicubic weights sum to 1, so resizing the raw 0..255 image then normalizing is the same map in another order
    up = F.interpolate(images.double(), size=(56, 56), mode='bicubic', align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.double).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.double).view(1, 3, 1, 1)
    ref = (up / 255 - mean) / std
    got = teacher.preprocess(images)
    assert got.shape == (2, 3, 56, 56) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=0)  # float32 vs float64
    torch.testing.assert_close(teacher.preprocess(images.float()), got)  # uint8 and float 0..255 agree


def test_tokens_match_timm(teacher, images):
    out = teacher(images)
    feats = teacher.vit.forward_features(teacher.preprocess(images))
    assert teacher.vit.num_prefix_tokens == 1  # no-register DINOv2
    torch.testing.assert_close(out['patch'], feats[:, 1:])
    torch.testing.assert_close(out['cls'], feats[:, 0])
    # other input sizes are resized to the same 56 px grid
    big = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8)
    assert teacher(big)['patch'].shape == (1, GRID * GRID, 384)


def test_attention_logits(teacher, images):
    check_attention_logits(teacher, images, (7, 2))


def check_attention_logits(teacher, images, chosen):
    """The logits of the chosen blocks are q k^T / sqrt(d) built by hand, and their softmax is timm's attention."""
    out = teacher(images, attn_blocks=chosen)
    assert len(out['attn']) == len(chosen)
    got = dict(zip(chosen, out['attn']))
    T = teacher.grid * teacher.grid
    vit = teacher.vit
    # reference: walk timm's blocks by hand and build q k^T / sqrt(d) from the raw qkv weight matrix
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(teacher.preprocess(images))))
    for i, blk in enumerate(vit.blocks):
        if i in chosen:
            a = blk.attn
            H, d = a.num_heads, a.head_dim
            h = blk.norm1(x)                                      # (N, L, D)
            N, L, D = h.shape
            qkv = h @ a.qkv.weight.T + a.qkv.bias                 # (N, L, 3D) laid out [q | k | v], heads inside
            q, k, v = (t.view(N, L, H, d).transpose(1, 2) for t in qkv.split(D, dim=-1))
            ref = q @ k.transpose(-2, -1) / math.sqrt(d)          # (N, H, L, L)
            assert got[i].shape == (len(images), H, 1 + T, 1 + T)
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)
            # softmax of the returned logits must be the attention timm really uses (a wrong scale fails here)
            o = (got[i].softmax(-1) @ v).transpose(1, 2).reshape(N, L, D)
            torch.testing.assert_close(a.proj(o), a(h), atol=1e-5, rtol=1e-4)
        x = blk(x)


def test_only_asked_blocks_pay(teacher, images):
    """qkv runs once per block (the logits reuse its output), and only the asked blocks carry a logits hook."""
    calls, hooked = [0] * len(teacher.vit.blocks), [0] * len(teacher.vit.blocks)

    def count(m, a, o, i):
        calls[i] += 1
        hooked[i] = len(m._forward_hooks) - 1                   # hooks besides this counter
    hooks = [b.attn.qkv.register_forward_hook(lambda m, a, o, i=i: count(m, a, o, i))
             for i, b in enumerate(teacher.vit.blocks)]
    try:
        assert 'attn' not in teacher(images)
        assert calls == [1] * 12 and hooked == [0] * 12
        calls[:] = [0] * 12
        out = teacher(images, attn_blocks=[5, 0, 5])
        assert calls == [1] * 12 and hooked == [1 if i in (0, 5) else 0 for i in range(12)]
    finally:
        for h in hooks:
            h.remove()
    assert len(out['attn']) == 3 and out['attn'][0] is out['attn'][2]  # same order as asked
    assert not teacher.vit.blocks[5].attn.qkv._forward_hooks  # hooks are removed after each call


def test_random_weights_warn(capsys):
    load_teacher('dinov2-s', weights='random', grid=2)
    err = capsys.readouterr().err
    assert 'RANDOM' in err and 'mechanics check' in err


def test_local_weights(tmp_path, teacher):
    # a checkpoint saved at DINOv2's native 518 px (37x37 pos-embed) must load into the 4x4 grid teacher
    src = timm.create_model(DINOV2['dinov2-s'], pretrained=False, num_classes=0)
    path = tmp_path / 'dinov2_s.pth'
    torch.save(src.state_dict(), path)
    t = load_teacher('dinov2-s', weights=str(path), grid=GRID)
    assert t.vit.pos_embed.shape == (1, 1 + GRID * GRID, 384)
    torch.testing.assert_close(t.vit.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    missing = str(tmp_path / 'missing.pth')
    says(one_line_error(lambda: load_teacher('dinov2-s', weights=missing, grid=GRID)), 'missing.pth')


def test_unknown_name():
    says(one_line_error(lambda: load_teacher('dinov3-b', weights='random')), 'dinov3-b', *DINOV2)


def test_offline_hub(monkeypatch):
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        if pretrained:
            raise OSError('We could not connect to huggingface.co\nmore detail')
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, 'create_model', fake)
    msg = one_line_error(lambda: load_teacher('dinov2-b', grid=GRID))
    says(msg, 'timm/vit_base_patch14_dinov2.lvd142m', '--enc-ckpt')


def test_grid_mismatch(teacher, images):
    vit = timm.create_model(DINOV2['dinov2-s'], pretrained=False, num_classes=0, img_size=56)
    says(one_line_error(lambda: Teacher(vit, grid=5)(images)), '5x5')  # ViT built for 4x4, caller expects 5x5
    vit16 = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=64)
    says(one_line_error(lambda: Teacher(vit16, grid=4)(images)), '14 px')  # 16 px patches are not DINOv2's 14
