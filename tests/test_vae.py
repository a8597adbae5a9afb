import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
V = importlib.import_module('sit')
import prepare  # noqa: E402

safetensors_torch = pytest.importorskip('safetensors.torch')


def relerr(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
    """diffusers' SD AutoencoderKL with perturbed random weights, saved as safetensors."""
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
        up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256).eval()
    with torch.no_grad():  # perturb everything, incl. GroupNorm's ones/zeros, so no parameter is trivial
        for p in m.parameters():
            s = p.std().item() if p.numel() > 1 and p.std() > 0 else 1.0
            p.add_(0.1 * s * torch.randn_like(p))
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    path = tmp_path_factory.mktemp('vae') / 'diffusion_pytorch_model.safetensors'
    safetensors_torch.save_file(sd, str(path))
    m.save_config(str(path.parent))  # config.json beside the weights: a diffusers folder
    return m, sd, path


def test_matches_diffusers(ref):
    m, _, path = ref
    vae = V.load_vae(str(path))
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        dist = m.encode(x).latent_dist
        moments = prepare.vae_encode_moments(vae, (x + 1) * 127.5)  # its input is 0..255
        assert moments.shape == (1, 8, 8, 8)
        assert relerr(moments[:, :4], dist.mean) < 1e-4
        assert relerr(moments[:, 4:], dist.std) < 1e-4
        assert relerr(vae.decode(z), m.decode(z).sample) < 1e-4
    # loading the directory reads config.json and picks up diffusion_pytorch_model.safetensors
    folder = V.load_vae(str(path.parent))
    assert torch.equal(folder.quant_conv.weight, vae.quant_conv.weight)
    assert prepare.shipped_norm(folder)['latent_scale'] == prepare.shipped_norm(vae)['latent_scale'] == 0.18215


def test_deprecated_attention_names(ref, tmp_path):
    _, sd, path = ref
    old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    renamed = {}
    for k, v in sd.items():
        for new, dep in old.items():
            k = k.replace(f'.attentions.0.{new}.', f'.attentions.0.{dep}.')
        renamed[k] = v
    assert any('.query.' in k for k in renamed) and not any('.to_q.' in k for k in renamed)
    safetensors_torch.save_file(renamed, str(tmp_path / 'old.safetensors'))
    torch.save(renamed, tmp_path / 'old.pt')
    a, b, c = (V.load_vae(str(p)) for p in (path, tmp_path / 'old.safetensors', tmp_path / 'old.pt'))
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(a.decode(z), b.decode(z)) and torch.equal(a.decode(z), c.decode(z))


def test_batched_helpers(ref):
    vae = V.load_vae(str(ref[2]))
    imgs = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    mom = prepare.vae_encode_moments(vae, imgs, batch_size=2)
    assert mom.shape == (3, 8, 2, 2) and mom.dtype == torch.float32
    want = prepare.vae_encode_moments(vae, imgs, batch_size=3)                 # one batch
    assert torch.allclose(mom, want, rtol=1e-4, atol=1e-5)
    z = torch.randn(3, 4, 2, 2)
    out = V.vae_decode_to_uint8(vae, z, batch_size=2)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    with torch.no_grad():
        want = ((vae.decode(z).clamp(-1, 1) + 1) * 127.5).floor()  # truncation, as REPA's generate.py
    assert (out.float() - want).abs().max() <= 1  # batching may move a value across an integer


def test_wrong_state_dict(ref, tmp_path):
    sd = dict(ref[1])
    sd.pop('decoder.conv_out.weight')
    sd['encoder.foo.weight'] = torch.zeros(1)
    sd['quant_conv.bias'] = torch.zeros(3)
    p = tmp_path / 'bad.safetensors'
    safetensors_torch.save_file(sd, str(p))
    msg = one_line_error(V.load_vae, str(p))
    assert 'decoder.conv_out.weight' in msg and 'encoder.foo.weight' in msg and 'quant_conv.bias' in msg


def test_missing_file_and_offline_hub(tmp_path, monkeypatch):
    assert 'no such file' in one_line_error(V.load_vae, str(tmp_path / 'nope.safetensors'))
    msg = one_line_error(V.load_vae, str(tmp_path))  # empty dir
    assert 'no config.json and no diffusion_pytorch_model.safetensors' in msg
    # a repo id with the hub offline and an empty cache (env vars are read at import: use a fresh process)
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, '-c', f"import {V.__name__}; {V.__name__}.load_vae('stabilityai/sd-vae-ft-ema')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ''
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'stabilityai/sd-vae-ft-ema' in err[0] and 'hf download' in err[0], r.stderr
    # no huggingface_hub at all
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
    assert 'pip install huggingface_hub' in one_line_error(V.load_vae, 'stabilityai/sd-vae-ft-ema')


def ref_center_crop(img, s):
    """Independent restatement of ADM's center_crop_arr, cropping with PIL instead of slicing."""
    from PIL import Image
    img = img.convert('RGB')
    w, h = img.size
    while w >= 2 * s and h >= 2 * s:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    r = s / min(w, h)
    w, h = round(w * r), round(h * r)
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - s) // 2, (h - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)))


@pytest.mark.parametrize('w,h', [(500, 375), (375, 500), (1030, 600), (40, 90), (64, 64), (333, 64)])
def test_center_crop_arr(w, h):
    from PIL import Image
    rng = np.random.default_rng(w * 1000 + h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = prepare.center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref_center_crop(img, 64))


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK'])
def test_center_crop_non_rgb(mode):
    from PIL import Image
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)
    assert img.mode == mode
    out = prepare.center_crop_arr(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref_center_crop(img, 32))
