"""Latent spaces beyond SD-VAE: our AutoencoderKL built from diffusers configs (SD, SD3, FLUX, SDXL-style) against
diffusers' own on the same random weights, each normalisation against the formula diffusers' pipelines (or
LightningDiT) use, the round trip through sample_latents / decode_latents, ReaLS's mean_std.json, prepare.py's
per-channel statistics. Tiny VAEs: blocks (32, 64), one resnet each, so 2x downsampling."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

import prepare
import sit

diffusers = pytest.importorskip('diffusers')

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=('DownEncoderBlock2D',) * 2,
            up_block_types=('UpDecoderBlock2D',) * 2, norm_num_groups=32, sample_size=32)
CONFIGS = {  # the normalisation fields as the released configs set them
    'sd': dict(latent_channels=4),
    'sd3': dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                shift_factor=0.0609),
    'flux': dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                 shift_factor=0.1159),
    'sdxl': dict(latent_channels=4, scaling_factor=0.5, latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
                 latents_std=[8.4927, 5.9022, 6.5498, 5.2299]),  # per channel, as Playground v2.5's VAE
}


def diffusers_vae(folder, seed=0, **cfg):
    """diffusers' AutoencoderKL with perturbed random weights (GroupNorm's ones and zeros too), saved as a folder."""
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(**TINY, **cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * (p.std().item() if p.numel() > 1 else 1.0) * torch.randn_like(p))
    m.save_pretrained(str(folder))
    return m


@pytest.fixture(scope='module')
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp('vaes')
    return {name: (diffusers_vae(root / name, **cfg), str(root / name)) for name, cfg in CONFIGS.items()}


def pipeline_normalise(cfg, z):
    """What diffusers' pipelines feed the denoiser for a VAE latent z (SDXL: latents_mean / std; SD3, FLUX: shift)."""
    if cfg.latents_mean is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
        return (z - mean) * cfg.scaling_factor / std
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def pipeline_denormalise(cfg, x):
    if cfg.latents_mean is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
        return x * std / cfg.scaling_factor + mean
    return x / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def meta_of(vae, resolution=32):
    return dict(autoencoder='x', resolution=resolution, latent_channels=vae.latent_channels,
                latent_size=resolution // vae.factor, **prepare.shipped_norm(vae))


@pytest.mark.parametrize('name', list(CONFIGS))
def test_matches_diffusers(vaes, name):
    m, folder = vaes[name]
    vae = sit.load_vae(folder)
    C = CONFIGS[name]['latent_channels']
    assert (vae.latent_channels, vae.factor) == (C, 2) and (vae.quant_conv is None) == (name in ('sd3', 'flux'))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = m.encode(x).latent_dist
        moments = prepare.vae_encode_moments(vae, (x + 1) * 127.5)                   # (2, 2C, 16, 16)
        assert moments.shape == (2, 2 * C, 16, 16)
        torch.testing.assert_close(moments[:, :C], dist.mean, rtol=1e-4, atol=1e-4 * dist.mean.abs().max().item())
        torch.testing.assert_close(moments[:, C:], dist.std, rtol=1e-4, atol=1e-4 * dist.std.abs().max().item())
        z = torch.randn(2, C, 4, 4)
        ref = m.decode(z).sample
        torch.testing.assert_close(vae.decode(z), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        # the normalisation dataset.json would record: what the pipeline's denoiser sees, and decoding it back
        meta = meta_of(vae)
        zero_std = torch.cat([dist.mean, torch.zeros_like(dist.mean)], 1)          # the latent is exactly the mean
        want = pipeline_normalise(m.config, dist.mean)
        torch.testing.assert_close(sit.sample_latents(zero_std, meta), want, rtol=1e-5, atol=1e-5)
        xn = torch.randn(2, C, 4, 4)
        got = sit.decode_latents(xn, meta, vae).int()
        ref = sit.to_uint8(m.decode(pipeline_denormalise(m.config, xn)).sample).int()
        assert (got - ref).abs().max() <= 1 and (got != ref).float().mean() < 0.01  # fp order can cross an integer


def test_round_trips_and_old_datasets():
    """sample_latents normalises, decode_latents inverts, for every form; and a dataset.json with latent_scale only
    (every dataset prepared before) gives bit-identical latents and pixels to the former z * scale."""
    torch.manual_seed(0)
    C = 3
    z = torch.rand(5, C, 4, 4) * 1.8 - 0.9                                          # pixels in [-0.9, 0.9]
    moments = torch.cat([z, torch.zeros_like(z)], 1)
    forms = {'old': dict(latent_scale=0.18215),
             'scalar': dict(latent_scale=1.5305, latent_shift=0.0609),
             'channel': dict(latent_mean=[0.3, -0.2, 0.05], latent_std=[0.5, 2.0, 0.25], latent_scale=1.0),
             'channel_scaled': dict(latent_mean=[0.3, -0.2, 0.05], latent_std=[0.5, 2.0, 0.25], latent_scale=0.5)}
    for name, meta in forms.items():
        x = sit.sample_latents(moments, meta)
        mean = torch.tensor(meta.get('latent_mean', [meta.get('latent_shift', 0.0)] * C)).view(1, C, 1, 1)
        std = torch.tensor(meta.get('latent_std', [1.0] * C)).view(1, C, 1, 1)
        torch.testing.assert_close(x, (z - mean) / std * meta['latent_scale'], msg=name)
        back = sit.decode_latents(x, dict(meta, autoencoder='identity'), round=True)
        assert torch.equal(back, sit.to_uint8(z, round=True)), name
    mean, std = torch.randn(8, 4, 2, 2), torch.rand(8, 4, 2, 2)
    torch.manual_seed(1)
    new = sit.sample_latents(torch.cat([mean, std], 1), forms['old'])
    torch.manual_seed(1)
    assert torch.equal(new, (mean + std * torch.randn_like(mean)) * 0.18215)
    assert torch.equal(sit.decode_latents(new, forms['old']), sit.to_uint8(new / 0.18215))


def test_pickled_bin_folder(vaes, tmp_path):
    """A folder saved before diffusers' safetensors default: diffusion_pytorch_model.bin beside config.json."""
    m = vaes['sd3'][0]
    m.save_pretrained(str(tmp_path / 'bin'), safe_serialization=False)
    assert sorted(os.listdir(tmp_path / 'bin')) == ['config.json', 'diffusion_pytorch_model.bin']
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(sit.load_vae(str(tmp_path / 'bin')).decode(z), m.decode(z).sample,
                                   rtol=1e-4, atol=1e-4)


def with_file(src, dst, name, content):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, name), 'w') as f:
        json.dump(content, f)
    return str(dst)


def test_mean_std_json(vaes, tmp_path):
    """ReaLS's folder: mean_std.json beside the weights wins over the config; (z - mean) / std, scale 1."""
    folder = vaes['sd'][1]
    mean, std = [0.1, -0.2, 0.3, -0.4], [2.0, 3.0, 4.0, 5.0]
    layouts = {'list': {'mean': mean, 'std': std},
               'nested': {'latents_mean': [[[[v]] for v in mean]], 'latents_std': [[[[v]] for v in std]]},
               'scalar': {'mean': 0.5, 'std': 2.0}}
    for name, content in layouts.items():
        vae = sit.load_vae(with_file(folder, tmp_path / name, 'mean_std.json', content))
        norm = prepare.shipped_norm(vae)
        m, s = (mean, std) if name != 'scalar' else ([0.5] * 4, [2.0] * 4)
        assert (norm['latent_mean'], norm['latent_std'], norm['latent_scale']) == (m, s, 1.0), name
        assert norm['latent_norm_from'].endswith('mean_std.json')
    bad = {'count': ({'mean': mean[:3], 'std': std}, '4 (one per latent channel)'),
           'keys': ({'mu': mean, 'sigma': std}, "['mu', 'sigma']"),
           'negative': ({'mean': mean, 'std': [1, -1, 1, 1]}, 'positive')}
    for name, (content, words) in bad.items():
        msg = one_line_error(lambda f: prepare.shipped_norm(sit.load_vae(f)),
                             with_file(folder, tmp_path / f'bad_{name}', 'mean_std.json', content))
        assert 'mean_std.json' in msg and words in msg, msg


def test_one_line_errors(vaes, tmp_path):
    folder = vaes['flux'][1]
    weights_only = tmp_path / 'weights_only'
    weights_only.mkdir()
    shutil.copy(os.path.join(folder, sit.VAE_FILE), weights_only)
    assert 'has no config.json' in one_line_error(sit.load_vae, str(weights_only))
    cfg = json.load(open(os.path.join(folder, 'config.json')))
    attn = with_file(folder, tmp_path / 'attn', 'config.json',
                     dict(cfg, down_block_types=['AttnDownEncoderBlock2D'] * 2))
    assert 'AttnDownEncoderBlock2D' in one_line_error(sit.load_vae, attn)
    both = with_file(folder, tmp_path / 'both', 'config.json',
                     dict(cfg, latents_mean=[0.0] * 16, latents_std=[1.0] * 16))
    assert 'both shift_factor and latents_mean' in one_line_error(lambda f: prepare.shipped_norm(sit.load_vae(f)), both)
    # a dataset of 4-channel latents with this 16-channel VAE as its decoder
    meta = dict(autoencoder=folder, resolution=32, latent_channels=4, latent_size=16, latent_scale=1.0)
    msg = one_line_error(sit.load_autoencoder, meta, 'cpu')
    assert '16-channel' in msg and '4-channel' in msg and '--vae' in msg
    (tmp_path / 'data').mkdir()
    json.dump(dict(format=sit.DATASET_FORMAT, latent_channels=4, latent_mean=[0.0] * 3, latent_std=[1.0] * 3,
                   latent_scale=1.0), open(tmp_path / 'data' / 'dataset.json', 'w'))
    assert 'latent_channels (4)' in one_line_error(sit.read_dataset_meta, str(tmp_path / 'data'))


def test_hub_names(vaes, monkeypatch):
    """owner/name[/folder] through the hub cache; the stabilityai/sd-vae-ft-* names fetch only their weights."""
    import huggingface_hub
    calls = []

    def fake_download(repo_id, filename, subfolder=None):
        calls.append((repo_id, subfolder, filename))
        return os.path.join(vaes['flux'][1] if subfolder else vaes['sd'][1], filename)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    vae = sit.load_vae('owner/pipeline/vae')
    assert calls == [('owner/pipeline', 'vae', 'config.json'), ('owner/pipeline', 'vae', sit.VAE_FILE)]
    assert vae.latent_channels == 16 and prepare.shipped_norm(vae)['latent_shift'] == 0.1159
    calls.clear()
    monkeypatch.setattr(sit, 'SD_VAE_CONFIG', dict(sit.SD_VAE_CONFIG, block_out_channels=[32, 64], layers_per_block=1))
    assert prepare.shipped_norm(sit.load_vae('stabilityai/sd-vae-ft-mse'))['latent_scale'] == 0.18215
    assert calls == [('stabilityai/sd-vae-ft-mse', None, sit.VAE_FILE)]

    def offline(repo_id, filename, subfolder=None):
        raise OSError('offline')

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', offline)
    msg = one_line_error(sit.load_vae, 'owner/pipeline/vae')
    assert 'hf download owner/pipeline vae/config.json vae/diffusion_pytorch_model.safetensors' in msg
    assert '--vae DIR/vae' in msg


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet') / 'train'
    rng = np.random.default_rng(0)
    for c in ('n01', 'n02'):
        (root / c).mkdir(parents=True)
        for i in range(3):
            smooth = np.linspace(0, 200, 24)[None, :, None] + rng.integers(0, 55, (24, 24, 3))
            Image.fromarray(smooth.astype(np.uint8)).save(root / c / f'{i}.png')
    return root


def run_prepare(src, out, vae, *extra):
    prepare.main(['imagenet', '--src', str(src), '--out', str(out), '--vae', vae, '--resolution', '8',
                  '--batch-size', '2', '--chunk-size', '4', '--num-workers', '0', *extra])


def test_prepare_flux_like_and_computed_stats(vaes, images, tmp_path):
    folder = vaes['flux'][1]
    run_prepare(images, tmp_path / 'vae', folder)
    meta = sit.read_dataset_meta(str(tmp_path / 'vae'))
    assert (meta['latent_channels'], meta['latent_size'], meta['autoencoder']) == (16, 4, folder)
    assert (meta['latent_scale'], meta['latent_shift']) == (0.3611, 0.1159)
    moments = np.load(tmp_path / 'vae' / 'moments.npy')
    assert moments.shape == (6, 32, 4, 4)

    run_prepare(images, tmp_path / 'dataset', folder, '--latent-norm', 'dataset')
    meta = sit.read_dataset_meta(str(tmp_path / 'dataset'))
    assert meta['latent_scale'] == 1.0 and 'latent_shift' not in meta and len(meta['latent_mean']) == 16
    assert np.array_equal(np.load(tmp_path / 'dataset' / 'moments.npy'), moments)
    # independent check: the latents training draws, normalised, have mean 0 and std 1 in every channel
    torch.manual_seed(0)
    draws = torch.cat([sit.sample_latents(torch.from_numpy(moments), meta) for _ in range(400)])  # (2400, 16, 4, 4)
    assert draws.mean((0, 2, 3)).abs().max() < 0.02 and (draws.std((0, 2, 3)) - 1).abs().max() < 0.02

    # the set trains as is, with SiT-T/1 on its 16x4x4 latents (8 px images: the preview's 50 steps stay cheap),
    # and previews decode through the recorded VAE
    import train_vanilla
    train_vanilla.main(['--data-path', str(tmp_path / 'dataset'), '--out', str(tmp_path / 'run'), '--model', 'SiT-T/1',
                        '--global-batch', '4', '--max-steps', '2', '--sample-every', '2', '--preview-cfg', '1',
                        '--num-workers', '0'])
    with Image.open(tmp_path / 'run' / 'preview_0000002.png') as grid:
        assert grid.size == (2 * 66 + 2, 4 * 66 + 2)                 # 2 classes x 4 rows, 8 px enlarged to 64

