"""FD-DINOv2's network (fid.load_dinov2) against facebookresearch/dinov2's own model code, same random weights.

Not part of the test suite (it needs DINOv2's repository, and ViT-L takes minutes): docs/measurements.md gives the
commands and the numbers. For each size and each variant (without registers, with 4), this builds DINOv2's own
torch.hub backbone (dinov2/hub/backbones.py, pretrained=False: the hub's constructor arguments), gives every
parameter seeded random values, saves them in DINOv2's key layout (.pth) and loads that file through
fid.load_dinov2, then feeds both the same 224 px input (fid.dinov2_preprocess of random uint8 images) and compares
the position embedding each adds for a 16x16 grid and the final-norm CLS features (FD-DINOv2's features), and
fid.compute_features on the images as an .npz (the whole path from uint8 images).

  python tests/crosscheck_dinov2.py --dinov2 PATH/TO/dinov2 [--sizes s,l] [--report FILE]
"""
import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault('XFORMERS_DISABLED', '1')  # DINOv2's layers then use plain torch attention
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fid  # noqa: E402
import sit  # noqa: E402

TIMM = {('s', False): 'vit_small_patch14_dinov2.lvd142m', ('s', True): 'vit_small_patch14_reg4_dinov2.lvd142m',
        ('l', False): 'vit_large_patch14_dinov2.lvd142m', ('l', True): 'vit_large_patch14_reg4_dinov2.lvd142m'}


def randomize(m, seed):
    """Seeded random values for every parameter (norms, biases, layer scales and tokens too), and a position
    embedding with a smooth part, as trained ones have, so a wrong resampling rule shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k == 'pos_embed':  # (1, 1 + 37 * 37, D)
                smooth = F.interpolate(torch.randn(1, p.shape[-1], 6, 6, generator=g), size=(37, 37), mode='bicubic',
                                       align_corners=True)
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
                p[:, 1:] += 0.5 * smooth.permute(0, 2, 3, 1).reshape(1, 37 * 37, -1)
            elif 'norm' in k and k.endswith('weight'):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif k.endswith('gamma'):
                p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=g))
            else:
                p.copy_((0.5 if k in ('cls_token', 'register_tokens', 'mask_token') else 0.02)
                        * torch.randn(p.shape, generator=g))
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dinov2', required=True, help='a clone of https://github.com/facebookresearch/dinov2')
    p.add_argument('--sizes', default='s,l')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--report', metavar='FILE', help='also write the result as markdown (command, date, machine)')
    args = p.parse_args()
    lines = []

    def say(line):  # printed now, and kept for --report
        print(line, flush=True)
        lines.append(line)
    sys.path.insert(0, args.dinov2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "xFormers is not available"
        from dinov2.hub import backbones
    g = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randint(0, 256, (8, 3, 256, 256), generator=g, dtype=torch.uint8)       # (8, 3, 256, 256)
    x = fid.dinov2_preprocess(images.float())                                               # (8, 3, 224, 224)
    say(f'torch {torch.__version__}; 8 random images, 224 px; max |ours - DINOv2| (relative to max |DINOv2|)')
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, 'images.npz')
        np.savez(npz, arr_0=images.permute(0, 2, 3, 1).numpy())
        for size in args.sizes.split(','):
            for reg in (False, True):
                hub = getattr(backbones, f'dinov2_vit{size}14' + ('_reg' if reg else ''))(pretrained=False).eval()
                randomize(hub, args.seed)
                path = os.path.join(tmp, 'weights.pth')
                torch.save(hub.state_dict(), path)
                ours = fid.load_dinov2(TIMM[size, reg], path)
                with torch.no_grad():
                    want_pos = hub.interpolate_pos_encoding(torch.zeros(1, 1 + 256, hub.embed_dim), 224, 224)
                    want = hub.forward_features(x)['x_norm_clstoken']                        # (8, D)
                    got = ours(x)
                pipe = torch.from_numpy(fid.compute_features(npz, ours, 'dinov2', batch_size=3)['dinov2'])
                rel = lambda a, b: f'{(a - b).abs().max().item():.2e} ({((a - b).abs().max() / b.abs().max()).item():.1e})'
                say(f"ViT-{size.upper()}/14 {'4 registers' if reg else 'no registers':12s} position embedding "
                      f"{rel(ours.pos_embed[:, -256:], want_pos[:, 1:])}  CLS features {rel(got, want)}  fid.compute_features "
                      f"{rel(pipe.float(), want)}")
    if args.report:
        sit.write_report(args.report, 'python tests/crosscheck_dinov2.py ' + ' '.join(sys.argv[1:]), lines)


if __name__ == '__main__':
    main()
