"""prepare.py imagenet / repa on tiny generated folders, with a random-weight SD-VAE at 16 px (2x2 latents)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import prepare
import sit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 16  # small: the full-size SD-VAE encoder runs on a shared CPU
# class folder -> [(file name, PIL mode, (width, height), format)]; folders created out of order on purpose
FOLDER = {
    'n03000003': [('p.png', 'P', (200, 330), 'PNG'), ('q.JPEG', 'RGB', (256, 256), 'JPEG'),
                  ('o.JPEG', 'RGB', (333, 500), 'JPEG')],
    'n01000001': [('z.JPEG', 'CMYK', (400, 300), 'JPEG'), ('x.png', 'RGBA', (260, 300), 'PNG'),
                  ('y.JPEG', 'RGB', (300, 400), 'JPEG')],
    'n02000002': [('b.JPEG', 'L', (280, 280), 'JPEG'), ('a.JPEG', 'RGB', (320, 240), 'PNG'),  # a PNG named .JPEG
                  ('c.JPEG', 'RGB', (300, 400), 'JPEG')],
}


def write_folder(root, spec, seed=0):
    rng = np.random.default_rng(seed)
    for cls, files in spec.items():
        os.makedirs(root / cls, exist_ok=True)
        for name, mode, (w, h), fmt in files:
            # smooth gradients + noise: JPEG-friendly, and every crop position looks different
            base = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
            rgb = np.clip(base + rng.integers(0, 55, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(rgb).convert(mode).save(root / cls / name, format=fmt)
    (root / sorted(spec)[0] / 'notes.txt').write_text('not an image: ignored')


@pytest.fixture(scope='module')
def vae_file(tmp_path_factory):
    """A random-init SD-VAE saved as safetensors. In-process runs get the same module back from sit.load_vae
    (which would re-initialise and reload 84M parameters each time); the torchrun test loads the file for real."""
    safetensors_torch = pytest.importorskip('safetensors.torch')
    torch.manual_seed(0)
    vae = sit.AutoencoderKL().eval().requires_grad_(False)
    path = str(tmp_path_factory.mktemp('vae') / 'vae.safetensors')
    safetensors_torch.save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path)
    load = sit.load_vae
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sit, 'load_vae', lambda name, device='cpu': vae if name == path else load(name, device))
        yield path


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet') / 'train'
    write_folder(root, FOLDER)
    return root


def run(src, out, vae, *extra):
    prepare.main(['imagenet', '--src', str(src), '--out', str(out), '--vae', vae, '--resolution', str(R),
                  '--batch-size', '2', '--chunk-size', '4', '--num-workers', '0', *extra])


def load(out):
    return {k: np.load(os.path.join(out, f'{k}.npy')) for k in ('images', 'moments', 'labels')}


@pytest.fixture(scope='module')
def prepared(folder, vae_file, tmp_path_factory):
    out = tmp_path_factory.mktemp('out') / 'in32'
    run(folder, out, vae_file)
    return out


def test_imagenet_folder(folder, vae_file, prepared):
    ds = sit.PreparedDataset(str(prepared), images=True)
    meta = ds.meta
    names = sorted(FOLDER)
    assert meta['class_names'] == names and meta['num_classes'] == 3 and meta['count'] == 9 == len(ds)
    assert (meta['resolution'], meta['latent_size'], meta['latent_channels']) == (R, R // 8, 4)
    # the decoder recorded is the VAE that encoded (--autoencoder not given), with SD's scalar normalisation
    assert meta['autoencoder'] == meta['encoder'] == vae_file
    assert (meta['latent_scale'], meta['latent_shift']) == (0.18215, 0.0) and 'latent_mean' not in meta
    assert sorted(os.listdir(prepared)) == ['dataset.json', 'images.npy', 'labels.npy', 'moments.npy']
    files = [os.path.join(folder, c, f) for c in names for f in sorted(n for n, *_ in FOLDER[c])]
    images = []
    for i, f in enumerate(files):
        x, m, y = ds[i]
        assert y == i // 3  # sorted folders -> 0..K-1, files sorted within a class
        with Image.open(f) as im:
            crop = prepare.center_crop_arr(im, R).transpose(2, 0, 1)  # (3, R, R), whatever the mode (CMYK, RGBA, P, L)
        assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), crop), f
        images.append(x)
    # the moments are the VAE's on exactly those crops (computed here in one batch of 9, there in batches of 2)
    ref = prepare.vae_encode_moments(sit.load_vae(vae_file), torch.stack(images))
    got = torch.from_numpy(load(prepared)['moments'])
    assert got.dtype == torch.float32 and got.shape == (9, 8, R // 8, R // 8)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert (got[:, 4:] > 0).all()


def test_two_ranks_equal_one(folder, vae_file, prepared, tmp_path):
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'prepare.py',
           'imagenet', '--src', str(folder), '--out', str(out), '--vae', vae_file, '--resolution', str(R),
           '--batch-size', '2', '--chunk-size', '2', '--num-workers', '1']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert 'img/s' in r.stdout and 'ETA' in r.stdout and '2 rank(s)' in r.stdout
    a, b = load(prepared), load(out)
    assert np.array_equal(a['images'], b['images']) and np.array_equal(a['labels'], b['labels'])
    # same batches, but 1 thread vs 2: float sums may be ordered differently
    assert np.allclose(a['moments'], b['moments'], rtol=1e-5, atol=1e-5 * np.abs(a['moments']).max())
    assert json.load(open(out / 'dataset.json')) == json.load(open(prepared / 'dataset.json'))


def test_resume_after_crash(folder, vae_file, prepared, tmp_path, monkeypatch):
    out = tmp_path / 'resumed'
    encode, encoded = prepare.vae_encode_moments, []

    def crash_on_third_batch(vae, x, batch_size=32):
        if len(encoded) == 2:  # chunk 0 (2 batches of 2) is on disk, chunk 1 is under way
            raise RuntimeError('simulated crash')
        encoded.append(len(x))
        return encode(vae, x, batch_size)

    monkeypatch.setattr(prepare, 'vae_encode_moments', crash_on_third_batch)
    with pytest.raises(RuntimeError, match='simulated crash'):
        run(folder, out, vae_file)
    assert json.load(open(out / 'progress_rank0.json')) == [0]
    with pytest.raises(SystemExit, match='no dataset.json'):  # a half-prepared folder is never read
        sit.PreparedDataset(str(out))
    with pytest.raises(SystemExit, match=r'unfinished preparation with other files or settings \(files, count\)'):
        run(folder, out, vae_file, '--limit', '2')

    def count(vae, x, batch_size=32):
        encoded.append(len(x))
        return encode(vae, x, batch_size)

    monkeypatch.setattr(prepare, 'vae_encode_moments', count)
    encoded.clear()
    run(folder, out, vae_file, '--batch-size', '3')  # the batch size may change on resume
    assert sum(encoded) == 5  # only chunks 1 (4 images) and 2 (1 image)
    a, b = load(prepared), load(out)
    assert all(np.array_equal(a[k], b[k]) for k in ('images', 'labels'))
    assert np.allclose(a['moments'], b['moments'], rtol=1e-5, atol=1e-5 * np.abs(a['moments']).max())
    assert not any(f.startswith(('progress', 'prepare_state')) for f in os.listdir(out))
    encoded.clear()
    run(folder, out, vae_file)  # finished: nothing to do
    assert encoded == []


def test_bad_files(folder, vae_file, tmp_path, capsys):
    src = tmp_path / 'train'
    write_folder(src, {'n01': FOLDER['n01000001'][:1], 'n02': FOLDER['n02000002'][:2]})
    (src / 'n01' / 'broken.JPEG').write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(SystemExit) as e:
        run(src, tmp_path / 'fail', vae_file)
    msg = str(e.value)
    assert '\n' not in msg and str(src / 'n01' / 'broken.JPEG') in msg and '--skip-bad' in msg, msg
    assert not os.path.exists(tmp_path / 'fail' / 'images.npy')
    good = (src / 'n02' / 'b.JPEG').read_bytes()
    (src / 'n02' / 'truncated.JPEG').write_bytes(good[:len(good) // 2])  # PIL opens it but cannot decode it all
    capsys.readouterr()
    run(src, tmp_path / 'skip', vae_file, '--skip-bad')
    lines = capsys.readouterr().out.splitlines()
    assert sum('skipping unreadable image' in l and 'broken.JPEG' in l for l in lines) == 1
    assert sum('skipping unreadable image' in l and 'truncated.JPEG' in l for l in lines) == 1
    assert open(tmp_path / 'skip' / 'bad_files.txt').read().split() == ['n01/broken.JPEG', 'n02/truncated.JPEG']
    ds = sit.PreparedDataset(str(tmp_path / 'skip'), images=True)
    assert len(ds) == 3 and load(tmp_path / 'skip')['labels'].tolist() == [0, 1, 1]
    with Image.open(src / 'n02' / 'b.JPEG') as im:
        assert np.array_equal(ds[2][0].numpy(), prepare.center_crop_arr(im, R).transpose(2, 0, 1))


def test_limit_and_classes(folder, vae_file, prepared, tmp_path):
    paths, labels, names = prepare.list_image_folder(str(folder), classes='2', limit=2)
    assert names == ['n01000001', 'n02000002'] and labels == [0, 0, 1, 1]
    assert [os.path.relpath(p, folder) for p in paths] == ['n01000001/x.png', 'n01000001/y.JPEG',
                                                           'n02000002/a.JPEG', 'n02000002/b.JPEG']
    paths, labels, names = prepare.list_image_folder(str(folder), classes='n03000003,n01000001')
    assert names == ['n01000001', 'n03000003'] and labels == [0] * 3 + [1] * 3
    with pytest.raises(SystemExit, match="no folder 'n09'"):
        prepare.list_image_folder(str(folder), classes='n01000001,n09')
    run(folder, tmp_path / 'sub', vae_file, '--classes', 'n03000003', '--limit', '1')
    ds = sit.PreparedDataset(str(tmp_path / 'sub'), images=True)
    assert ds.meta['class_names'] == ['n03000003'] and ds.meta['num_classes'] == 1 and len(ds) == 1
    full = load(prepared)
    assert np.array_equal(ds[0][0].numpy(), full['images'][6]) and ds[0][2] == 0  # n03000003/o.JPEG


def test_repa_folder(tmp_path):
    src, rng = tmp_path / 'repa', np.random.default_rng(0)
    images, moments, labels = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), [], [2, 0, 1, 2, 0]
    img_labels, feat_labels = [], []
    for i, y in enumerate(labels):
        (src / 'images' / '00000').mkdir(parents=True, exist_ok=True)
        (src / 'vae-sd' / '00000').mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(src / 'images' / '00000' / f'img{i:08d}.png')
        m = np.concatenate([rng.normal(size=(4, 2, 2)), rng.uniform(0.01, 1, (4, 2, 2))]).astype(np.float32)
        np.save(src / 'vae-sd' / '00000' / f'img-mean-std-{i:08d}.npy', m)  # cat[mean, std], as REPA's encode
        moments.append(m)
        img_labels.append([f'00000/img{i:08d}.png', y])
        feat_labels.append([f'00000/img-mean-std-{i:08d}.npy', y])
    json.dump({'labels': img_labels}, open(src / 'images' / 'dataset.json', 'w'))
    json.dump({'labels': feat_labels[::-1]}, open(src / 'vae-sd' / 'dataset.json', 'w'))  # order must not matter
    names = tmp_path / 'train'
    for c in ('n2', 'n0', 'n1'):
        (names / c).mkdir(parents=True)
    prepare.main(['repa', '--src', str(src), '--out', str(tmp_path / 'out'), '--class-names', str(names),
                  '--num-workers', '0'])
    ds = sit.PreparedDataset(str(tmp_path / 'out'), images=True)
    assert (ds.meta['resolution'], ds.meta['latent_size'], ds.meta['num_classes'], len(ds)) == (16, 2, 3, 5)
    assert ds.meta['class_names'] == ['n0', 'n1', 'n2']
    for i in range(5):
        x, m, y = ds[i]
        assert np.array_equal(x.numpy(), images[i].transpose(2, 0, 1)) and np.array_equal(m.numpy(), moments[i])
        assert y == labels[i]
    # a logvar half (negative) is refused rather than read as a std
    np.save(src / 'vae-sd' / '00000' / 'img-mean-std-00000003.npy', -np.ones((8, 2, 2), np.float32))
    with pytest.raises(SystemExit, match='not cat\\[mean, std\\]'):
        prepare.main(['repa', '--src', str(src), '--out', str(tmp_path / 'out2'), '--num-workers', '0'])


@pytest.mark.parametrize('script', ['train_vanilla', 'train_repa'])
def test_trainers_read_it_and_preview_through_the_vae(prepared, vae_file, tmp_path, script):
    """The prepared ImageNet-style folder trains as is; the preview grid decodes with the dataset's VAE."""
    import importlib
    train = importlib.import_module(script)
    extra = ['--enc', 'dinov2-s', '--enc-ckpt', 'random', '--encoder-depth', '1'] if script == 'train_repa' else []
    train.main(['--data-path', str(prepared), '--out', str(tmp_path / 'run'), '--model', 'SiT-T/2', '--vae', vae_file,
                '--global-batch', '4', '--max-steps', '2', '--sample-every', '2', '--num-workers', '0', *extra])
    with Image.open(tmp_path / 'run' / 'preview_0000002.png') as grid:
        S = R * max(1, 64 // R)                                   # tiny images are enlarged in the grid
        assert grid.size == (3 * (S + 2) + 2, 4 * (S + 2) + 2)   # 3 classes x 4 rows of R px decoded images


def test_signal_finishes_the_chunk_and_exits(folder, vae_file, prepared, tmp_path, monkeypatch, capsys):
    """SIGTERM (or SIGUSR1, Ctrl-C) during encoding: the chunk at hand is finished and recorded, the run returns
    normally (exit 0) without dataset.json, and the same command then does only the remaining chunks."""
    import signal
    encode, encoded = prepare.vae_encode_moments, []

    def signal_in_third_batch(vae, x, batch_size=32):
        encoded.append(len(x))
        if len(encoded) == 3:                                               # chunk 1 (of 0, 1, 2) is under way
            os.kill(os.getpid(), signal.SIGTERM)
        return encode(vae, x, batch_size)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(prepare, 'vae_encode_moments', signal_in_third_batch)
    out = tmp_path / 'stopped'
    try:
        run(folder, out, vae_file)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert 'stopped by signal: 2 of 3 chunks are done' in capsys.readouterr().out
    assert sum(encoded) == 8 and not (out / 'dataset.json').exists()        # chunks 0 and 1, whole
    encoded.clear()
    run(folder, out, vae_file)
    assert sum(encoded) == 1                                                # chunk 2 only
    a, b = load(prepared), load(out)
    assert all(np.array_equal(a[k], b[k]) for k in ('images', 'labels'))
