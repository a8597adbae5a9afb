"""sit.py: the backbone against the published layout and counts, the samplers against closed forms."""
import json
import math
import os

import numpy as np
import pytest
import torch

import sample
import sit

DATA = os.path.join(os.path.dirname(__file__), 'data')


# -----------------------------------------------------------------------------
# backbone

@pytest.mark.parametrize('name,kwargs,count', [
    ('SiT-XL/2', {}, 675_111_184),                     # REPA's SiT-XL/2 without its projector
    ('SiT-B/2', {}, 130_500_112),
    ('SiT-XL/2', {'z_dims': [768]}, 683_242_512),      # with REPA's projector, as REPA's own model counts
    ('SiT-XL/2', {'learn_sigma': True}, 675_129_632),  # DiT-XL/2 / original SiT-XL/2 (8 output channels)
])
def test_parameter_counts(name, kwargs, count):
    with torch.device('meta'):
        model = sit.SiT_models[name](**kwargs)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize('fixture,kwargs,extra', [
    ('repa_sit_xl2.json', {}, {'projectors.'}),                      # REPA EMA into a model without projector
    ('repa_sit_xl2.json', {'z_dims': [768]}, set()),
    ('sit_xl2.json', {'learn_sigma': True}, set()),                   # the original SiT release
])
def test_released_layouts_load(fixture, kwargs, extra):
    """Key names and shapes recorded from the official REPA and SiT model code (tests/data/*.json)."""
    with open(os.path.join(DATA, fixture)) as f:
        shapes = json.load(f)
    with torch.device('meta'):
        model = sit.SiT_models['SiT-XL/2'](**kwargs)
    sd = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert missing == []
    assert {k.split('.')[0] + '.' for k in unexpected} == extra
    ours = model.state_dict()
    assert all(list(ours[k].shape) == shapes[k] for k in ours)


def tiny(**kw):
    torch.manual_seed(0)
    return sit.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=4, num_classes=5,
                   **kw)


def test_zero_output_at_init():
    model = tiny()
    v, aux = model(torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 1, 5]))
    assert v.shape == (3, 3, 8, 8) and aux == {}
    assert torch.count_nonzero(v) == 0            # adaLN-Zero: the final linear starts at zero


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_pos_embed_is_mae_layout():
    """DiT's numpy reference: first half of the channels from the column index, second half from the row."""
    dim, g = 16, 4
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    def emb1d(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    cols, rows = np.meshgrid(np.arange(g), np.arange(g))
    expected = np.concatenate([emb1d(cols.reshape(-1)), emb1d(rows.reshape(-1))], axis=1)
    assert np.allclose(sit.sincos_pos_embed(dim, g).numpy(), expected, atol=1e-6)


def test_attention_logits_and_sdpa_path_agree():
    model = perturbed(tiny()).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    v0, _ = model(x, t, y)
    v1, aux = model(x, t, y, attn_blocks=(2, 0))
    assert torch.allclose(v0, v1, atol=1e-5)      # the explicit softmax path computes the same attention
    # block 0's logits by hand from its own qkv weights
    blk = model.blocks[0]
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    shift, scale = blk.adaLN_modulation(c).chunk(6, dim=1)[:2]
    a = sit.modulate(blk.norm1(h), shift, scale)
    q, k, _ = blk.attn.qkv(a).chunk(3, dim=-1)
    q = q.view(2, -1, 4, 16).transpose(1, 2)
    k = k.view(2, -1, 4, 16).transpose(1, 2)
    assert len(aux['attn']) == 2 and aux['attn'][0].shape == (2, 4, 16, 16)
    assert torch.allclose(aux['attn'][1], q @ k.transpose(-1, -2) / 4.0, atol=1e-5)


def test_projector_taps_encoder_depth():
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    for depth in (1, 3):
        model = perturbed(tiny(z_dims=[7], projector_dim=32, encoder_depth=depth)).eval()
        hidden = []
        handles = [b.register_forward_hook(lambda m, i, o: hidden.append(o[0])) for b in model.blocks]
        _, aux = model(x, t, y, return_zs=True)
        for hd in handles:
            hd.remove()
        assert torch.allclose(aux['zs'][0], model.projectors[0](hidden[depth - 1]), atol=1e-6)
        assert not torch.allclose(aux['zs'][0], model.projectors[0](hidden[depth]), atol=1e-3)


def test_learn_sigma_returns_first_channels():
    model = perturbed(tiny(learn_sigma=True)).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    v, _ = model(x, t, y)
    full = model.unpatchify(model.final_layer(*_trunk(model, x, t, y))[0])
    assert v.shape == (2, 3, 8, 8) and torch.allclose(v, full[:, :3])


def _trunk(model, x, t, y):
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for b in model.blocks:
        h, _ = b(h, c)
    return h, c


def test_ema_update():
    a, b = perturbed(tiny()), perturbed(tiny())
    expect = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    sit.update_ema(a, b, 0.9)
    assert all(torch.allclose(p, e) for p, e in zip(a.parameters(), expect))


# -----------------------------------------------------------------------------
# samplers against the exact velocity field of Gaussian data

class GaussianVelocity(torch.nn.Module):
    """E[eps - x | x_t] for x ~ N(m_y, s_y^2) per dimension, eps ~ N(0, 1), x_t = (1 - t) x + t eps."""

    def __init__(self, means, stds):
        super().__init__()
        self.m, self.s = torch.tensor(means), torch.tensor(stds)
        self.num_classes = len(means) - 1                   # the last row plays the null class
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0]))
        m, s2 = self.m[y].view(-1, 1), self.s[y].view(-1, 1) ** 2
        t = t.view(-1, 1).double()
        var = (1 - t) ** 2 * s2 + t ** 2                     # Var x_t
        cov = t - (1 - t) * s2                               # Cov(v, x_t)
        return (-m + cov / var * (x - (1 - t) * m)).float(), {}


def gaussian_case(n=20000):
    torch.manual_seed(0)
    model = GaussianVelocity([2.0, -1.0, 0.0], [0.5, 1.5, 1.0])
    y = torch.arange(n) % 2
    return model, torch.randn(n, 2), y


@pytest.mark.parametrize('sampler,kwargs', [
    (sit.euler_sampler, dict(num_steps=200)),
    (sit.euler_sampler, dict(num_steps=20, heun=True)),
    (sit.euler_maruyama_sampler, dict(num_steps=250)),
    (sit.heun_sde_sampler, dict(num_steps=30)),
])
def test_samplers_reach_gaussian_target(sampler, kwargs):
    """Mean and std of each class within 4 standard errors (+ a 1% discretisation allowance)."""
    model, z, y = gaussian_case()
    x = sampler(model, z, y, **kwargs)
    for k, (m, s) in enumerate([(2.0, 0.5), (-1.0, 1.5)]):
        xk = x[y == k]
        se = s / math.sqrt(xk.numel())
        assert abs(xk.mean().item() - m) < 4 * se + 0.01 * s
        assert abs(xk.std().item() - s) < 4 * se / math.sqrt(2) + 0.01 * s


def test_ode_is_exact_transport():
    """With the exact field, the ODE maps each noise sample to m + s * eps (the Gaussian's linear transport)."""
    model, z, y = gaussian_case(2000)
    x = sit.euler_sampler(model, z, y, num_steps=400)
    m, s = model.m[y].view(-1, 1), model.s[y].view(-1, 1)
    assert (x - (m + s * z)).abs().max() < 0.02


def test_sde_noise_matters_and_last_step_is_mean():
    model, z, y = gaussian_case(4000)
    torch.manual_seed(1)
    a = sit.euler_maruyama_sampler(model, z, y, num_steps=50)
    torch.manual_seed(2)
    b = sit.euler_maruyama_sampler(model, z, y, num_steps=50)
    assert (a - b).abs().mean() > 0.1                  # stochastic
    # steps: 49 noisy ones on linspace(1, 0.04, 50), then the mean step 0.04 -> 0 at t = 0.04
    assert [c[0] for c in model.calls[-50:]] == pytest.approx(list(np.linspace(1, 0.04, 50)))


# -----------------------------------------------------------------------------
# the original SiT repository's SDE sampler, written out plainly in its own convention (t = 0 noise, t = 1 data,
# the network predicts dx/dt = x - eps): our samplers on a flip_time-wrapped SiT-convention model must take its steps

class SiTGaussian(torch.nn.Module):
    """GaussianVelocity as a network trained in SiT's direction would predict it: v_sit(x, t) = -v_ours(x, 1 - t)."""

    def __init__(self, ours):
        super().__init__()
        self.ours, self.num_classes = ours, ours.num_classes

    def forward(self, x, t, y):
        return -self.ours(x, 1 - t, y)[0], {}


def sit_sde_by_hand(v_sit, z, y, num_steps, heun, cfg_scale=1.0, cfg_channels=0, last_step_size=0.04):
    """SiT's sample_sde with diffusion form 'sigma' (norm 1) and last step 'Mean': grid linspace(0, 1 - 0.04, N)
    in float32, N - 1 steps of size dt, then x + drift * 0.04 at t = 0.96. Linear path: alpha_t = t, sigma_t = 1 - t,
    score = (t v - x) / (1 - t), drift = v + sigma_t * score, noise sqrt(2 sigma_t) dW with dW = randn * sqrt(dt),
    drawn at the start of each step. CFG as forward_with_cfg: the first cfg_channels channels guided (0: all), the
    rest conditional; guidance only above scale 1 (sample_ddp.py's using_cfg)."""
    null = torch.full_like(y, 2)

    def velocity(x, t):
        tv = torch.full((x.shape[0],), t)
        vc = v_sit(x, tv, y)[0]
        if cfg_scale <= 1:
            return vc
        vu = v_sit(x, tv, null)[0]
        k = cfg_channels or x.shape[1]
        return torch.cat([(vu + cfg_scale * (vc - vu))[:, :k], vc[:, k:]], dim=1)

    def drift(x, t):
        v = velocity(x, t)
        return v + (1 - t) * (t * v - x) / (1 - t)

    ts = torch.linspace(0, 1 - last_step_size, num_steps)
    dt = float(ts[1] - ts[0])
    x = z.clone()
    for t in ts[:-1].tolist():
        dw = torch.randn(x.size()) * math.sqrt(dt)
        if heun:
            xhat = x + math.sqrt(2 * (1 - t)) * dw
            k1 = drift(xhat, t)
            k2 = drift(xhat + dt * k1, t + dt)
            x = xhat + 0.5 * dt * (k1 + k2)
        else:
            x = x + drift(x, t) * dt + math.sqrt(2 * (1 - t)) * dw
    return x + drift(x, float(ts[-1])) * last_step_size


@pytest.mark.parametrize('heun', [False, True])
@pytest.mark.parametrize('cfg_scale,cfg_channels', [(1.0, 0), (1.5, 3)])
def test_sde_is_sits_own_sampler(heun, cfg_scale, cfg_channels):
    """Euler: our (REPA's) Euler-Maruyama SDE is SiT's default SDE step for step; Heun: SiT's --sampling-method
    Heun. Same noise (one draw per step from the same seed), same time grid, same last step, and the network
    evaluation count sit.num_evaluations states (N, or 2N - 1). 4-d Gaussians, so 3 of 4 channels are guided."""
    gauss = GaussianVelocity([2.0, -1.0, 0.0], [0.5, 1.5, 1.0])
    z, y, n = torch.randn(400, 4, generator=torch.Generator().manual_seed(0)), torch.arange(400) % 2, 12
    torch.manual_seed(5)
    ours = sit.sample(sample.flip_time(SiTGaussian(gauss)), z, y, mode='sde', num_steps=n, heun=heun,
                      cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    ours_calls, gauss.calls = gauss.calls, []
    torch.manual_seed(5)
    ref = sit_sde_by_hand(SiTGaussian(gauss), z, y, n, heun, cfg_scale, cfg_channels)
    evals = 2 * n - 1 if heun else n
    assert len(ours_calls) == evals and sample.num_evaluations(n, heun) == evals
    assert {bs for _, bs in ours_calls} == {800 if cfg_scale > 1 else 400}  # CFG: one doubled batch per evaluation
    ref_calls = gauss.calls[::2] if cfg_scale > 1 else gauss.calls     # by hand: cond and null calls apart
    assert [t for t, _ in ours_calls] == pytest.approx([t for t, _ in ref_calls], abs=1e-6)  # the same grid
    assert ours_calls[-1][0] == pytest.approx(0.04)                   # the mean step at SiT's t = 0.96
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    torch.manual_seed(5)
    other = sit.sample(sample.flip_time(SiTGaussian(gauss)), z, y, mode='sde', num_steps=n, heun=not heun,
                       cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    assert (other - ref).abs().max() > 1e-2                           # the test tells the two steppers apart


def test_cfg_channels_guides_the_first_channels_only():
    """SiT's forward_with_cfg on independent Gaussian dimensions: channels 0-2 of a 3-channel-guided sample are
    those of the fully guided one, channel 3 that of the unguided one. Plus the one-line refusals."""
    model = GaussianVelocity([2.0, -1.0, 0.0], [0.5, 1.5, 1.0])
    z, y = torch.randn(300, 4), torch.arange(300) % 2
    kw = dict(mode='ode', num_steps=8, cfg_scale=3.0, guidance_high=0.7)
    part = sit.sample(model, z, y, cfg_channels=3, **kw)
    full, plain = sit.sample(model, z, y, **kw), sit.sample(model, z, y, **dict(kw, cfg_scale=1.0))
    assert torch.allclose(part[:, :3], full[:, :3], atol=1e-6) and torch.allclose(part[:, 3], plain[:, 3], atol=1e-6)
    assert (full[:, 3] - plain[:, 3]).abs().max() > 0.1
    with pytest.raises(SystemExit):
        sit.sample(model, z, y, cfg_channels=5, **kw)


def test_guidance_only_above_one():
    """REPA's, REG's and SiT's rule: a scale below 1 does not guide (the conditional sampler, no doubled batch)."""
    model, z, y = gaussian_case(200)
    low = sit.euler_sampler(model, z, y, num_steps=6, cfg_scale=0.5)
    assert all(bs == 200 for _, bs in model.calls)
    assert torch.equal(low, sit.euler_sampler(model, z, y, num_steps=6))


def euler_by_hand(model, z, y, ts, velocity):
    x = z.clone()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity(x, torch.full((x.shape[0],), t0), t0)
    return x


def test_cfg_scale_one_is_no_cfg():
    """Scale 1 inside a guidance interval is the plain conditional sampler, without a doubled batch."""
    model, z, y = gaussian_case(500)
    x = sit.euler_sampler(model, z, y, num_steps=10, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0)
    assert all(bs == 500 for _, bs in model.calls)
    ref = euler_by_hand(model, z, y, np.linspace(1, 0, 11), lambda x, tv, t: model(x, tv, y)[0])
    assert torch.allclose(x, ref, atol=1e-5)
    # and it is not what an unconditional sampler gives
    null = torch.full_like(y, 2)
    assert not torch.allclose(x, euler_by_hand(model, z, y, np.linspace(1, 0, 11),
                                               lambda x, tv, t: model(x, tv, null)[0]), atol=1e-2)


def test_heun_decides_the_interval_once_per_step():
    """REPA's rule: both evaluations of a Heun step are guided iff t_cur is in the interval (t_next is not looked
    at). With the interval's upper end between t_cur and t_next of a step, the other rule gives another answer."""
    model, z, y = gaussian_case(300)
    s, hi, n = 3.0, 0.65, 5                            # grid 1, .8, .6, .4, .2, 0: step .8 -> .6 straddles .65
    x = sit.euler_sampler(model, z, y, num_steps=n, heun=True, cfg_scale=s, guidance_high=hi)
    null = torch.full_like(y, 2)

    def v(x, t, guided):
        tv = torch.full((x.shape[0],), t)
        vc, vu = model(x, tv, y)[0], model(x, tv, null)[0]
        return vu + s * (vc - vu) if guided else vc

    def heun(rule):
        ref, ts = z.clone(), np.linspace(1, 0, n + 1)
        for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
            d0 = v(ref, t0, t0 <= hi)
            nxt = ref + (t1 - t0) * d0
            if i < n - 1:                                  # no correction on the last step
                nxt = ref + (t1 - t0) * 0.5 * (d0 + v(nxt, t1, (t0 if rule == 'cur' else t1) <= hi))
            ref = nxt
        return ref
    assert torch.allclose(x, heun('cur'), atol=1e-5)
    assert not torch.allclose(x, heun('next'), atol=1e-3)


def test_cfg_formula_and_interval():
    model, z, y = gaussian_case(300)
    s, lo, hi = 3.0, 0.25, 0.75  # off the time grid: no float ties at the ends
    x = sit.euler_sampler(model, z, y, num_steps=10, cfg_scale=s, guidance_low=lo, guidance_high=hi)
    # reference Euler loop, guidance written out by hand
    ref, ts = z.clone(), np.linspace(1, 0, 11)
    null = torch.full_like(y, 2)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        tv = torch.full((300,), t0)
        vc = model(ref, tv, y)[0]
        v = model(ref, tv, null)[0] + s * (vc - model(ref, tv, null)[0]) if lo <= t0 <= hi else vc
        ref = ref + (t1 - t0) * v
    assert torch.allclose(x, ref, atol=1e-5)
    doubled = sorted(round(t, 6) for t, bs in model.calls[:10] if bs == 600)
    assert doubled == [0.3, 0.4, 0.5, 0.6, 0.7]      # only inside the interval
    no_guidance = sit.euler_sampler(model, z, y, num_steps=10)
    assert not torch.allclose(x, no_guidance, atol=1e-2)


def test_score_from_velocity():
    """Linear path: score(x_t) = -E[eps | x_t] / t; check on the Gaussian case against the density's gradient."""
    model, _, _ = gaussian_case()
    x, t, y = torch.randn(100, 2), 0.37, torch.zeros(100, dtype=torch.long)
    v = model(x, torch.full((100,), t), y)[0]
    m, s2 = 2.0, 0.25
    var = (1 - t) ** 2 * s2 + t ** 2
    assert torch.allclose(sit.score_from_velocity(v, x, t), -(x - (1 - t) * m) / var, atol=1e-5)


def test_flip_time_converts_sit_convention():
    ours = perturbed(tiny()).eval()

    class SiTConvention(torch.nn.Module):  # a model trained with t = 0 noise, v = x - eps
        num_classes = 5

        def forward(self, x, t, y):
            v, aux = ours(x, 1 - t, y)
            return -v, aux
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.allclose(sample.flip_time(SiTConvention())(x, t, y)[0], ours(x, t, y)[0], atol=1e-6)


# -----------------------------------------------------------------------------
# prepared dataset

def test_dataset_errors(tmp_path):
    with pytest.raises(SystemExit, match='does not exist.*prepare.py imagenet --src IMAGENET/train --out'):
        sit.PreparedDataset(str(tmp_path / 'nowhere'))
    with pytest.raises(SystemExit, match=r'does not exist.*`python prepare.py toy --out .*my-toy`'):
        sit.PreparedDataset(str(tmp_path / 'my-toy'))
    with pytest.raises(SystemExit, match='no dataset.json'):
        sit.PreparedDataset(str(tmp_path))
    import prepare
    prepare.prepare_toy(str(tmp_path / 'toy'), per_class=2, resolution=16)
    ds = sit.PreparedDataset(str(tmp_path / 'toy'), images=True)
    img, m, y = ds[3]
    assert img.dtype == torch.uint8 and m.shape == (6, 16, 16) and 0 <= y < 10
    assert torch.allclose(m[:3], img.float() / 127.5 - 1, atol=1e-6) and m[3:].abs().max() == 0
    images = tmp_path / 'toy' / 'images.npy'                              # cut short, as by a full disk
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"images.npy' is truncated or corrupt .*re-run prepare.py"):
        sit.PreparedDataset(str(tmp_path / 'toy'), images=True)
    np.save(tmp_path / 'toy' / 'labels.npy', np.zeros(7, dtype=np.int64))
    with pytest.raises(SystemExit, match=r'labels.npy.*shape \(7,\).*\(20,\)'):
        sit.PreparedDataset(str(tmp_path / 'toy'))
    os.remove(tmp_path / 'toy' / 'moments.npy')
    with pytest.raises(SystemExit, match='moments.npy.*missing'):
        sit.PreparedDataset(str(tmp_path / 'toy'))


def test_drop_labels():
    torch.manual_seed(0)
    y = torch.randint(0, 7, (20000,))
    d = sit.drop_labels(y, 0.1, 7)
    dropped = d != y
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert (d[dropped] == 7).all() and torch.equal(sit.drop_labels(y, 0.0, 7), y)


def test_sample_latents_and_decode():
    torch.manual_seed(0)
    mean, std = torch.randn(4000, 1, 2, 2), torch.full((4000, 1, 2, 2), 0.5)
    z = sit.sample_latents(torch.cat([mean, std], 1), dict(latent_scale=0.18215))
    r = z / 0.18215 - mean
    assert abs(r.std().item() - 0.5) < 0.02 and abs(r.mean().item()) < 0.02
    meta = dict(latent_scale=1.0, autoencoder='identity')
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 2, 3)
    # clamp, (x + 1) * 127.5, then truncate as REPA's generate.py (0 -> 127.5 -> 127) or round (-> 128)
    assert sit.decode_latents(x, meta).flatten().tolist() == [0, 0, 127, 254, 255, 255]
    assert sit.decode_latents(x, meta, round=True).flatten().tolist() == [0, 0, 128, 255, 255, 255]


def test_toy_is_deterministic_and_class_conditional(tmp_path):
    import prepare
    prepare.prepare_toy(str(tmp_path / 'a'), per_class=6, resolution=32, seed=3)
    prepare.prepare_toy(str(tmp_path / 'b'), per_class=6, resolution=32, seed=3)
    a = np.load(tmp_path / 'a' / 'images.npy')
    assert np.array_equal(a, np.load(tmp_path / 'b' / 'images.npy'))
    labels = np.load(tmp_path / 'a' / 'labels.npy')
    assert np.bincount(labels).tolist() == [6] * 10
    # the class colour is what the brightest pixels look like
    for k, (_, _, colour) in enumerate(prepare.TOY_CLASSES):
        imgs = a[labels == k].astype(float)                              # (6, 3, 32, 32)
        bright = imgs.sum(1) > imgs.sum(1).reshape(6, -1).max(1)[:, None, None] * 0.8
        mean_col = np.stack([imgs[:, c][bright] for c in range(3)], 1).mean(0)
        assert np.abs(mean_col - np.array(colour)).max() < 45, (k, mean_col, colour)


def test_patch_size_one():
    """SiT-*/1 for f16 latents (16x16 at 256 px, e.g. 16 or 32 channels): one token per latent pixel."""
    assert all(f'SiT-{s}/1' in sit.SiT_models for s in sit.SIZES)
    model = sit.build_model('SiT-T/1', input_size=4, in_channels=16, num_classes=3)
    assert model.x_embedder.proj.kernel_size == (1, 1) and model.pos_embed.shape[1] == 16
    v, _ = model(torch.randn(2, 16, 4, 4), torch.rand(2), torch.tensor([0, 3]))
    assert v.shape == (2, 16, 4, 4)


def test_sit_py_reads_top_to_bottom():
    """sit.py defines every module-level name before the first top-level statement that uses it, and the research
    part (model, samplers, data, teacher) ends where the infrastructure banner starts."""
    import ast
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'sit.py')
    src = open(path).read()
    tree = ast.parse(src)
    defined = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else getattr(node, 'targets', [])
        for t in targets:
            for n in ([t] if not isinstance(t, ast.Tuple) else t.elts):
                defined.setdefault(getattr(n, 'name', getattr(n, 'id', None)), node.lineno)
    late = [(node.lineno, sub.id) for node in tree.body for sub in ast.walk(node)
            if isinstance(sub, ast.Name) and defined.get(sub.id, 0) > node.lineno]
    assert late == []
    banner = src[:src.index('# INFRASTRUCTURE')].count('\n') + 1
    research = ('SiT', 'build_model', 'sample', 'PreparedDataset', 'load_teacher')
    plumbing = ('setup_distributed', 'open_run', 'save_training_state', 'StopFlag', 'Logger', 'load_vae')
    assert max(defined[n] for n in research) < banner < min(defined[n] for n in plumbing)
