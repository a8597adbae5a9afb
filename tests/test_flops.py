"""benchmark.py's FLOP counts against a hand count, layer by layer (a multiply-add = 2 FLOPs)."""
import os
import signal

import torch

import benchmark
import sit


def hand_count(depth, D, T, p, C, freq=256):
    """Multiply-adds of one SiT forward per image: (matrix products, attention). Per image: the patch embedding,
    the timestep MLP, adaLN of each block and of the final layer; per token and block: qkv, proj, a 4x MLP;
    q k^T and attn @ v: 2 T^2 D per block; the final linear map."""
    linear = T * p * p * C * D + freq * D + D * D + depth * (6 * D * D + 12 * T * D * D) + 2 * D * D + T * D * p * p * C
    return linear, depth * 2 * T * T * D


def test_forward_and_step_against_a_hand_count():
    """SiT-S/2 at ImageNet 256 (32x32x4 latents): forward = 2 x multiply-adds exactly. That includes the CPU
    attention kernel, which torch's counter alone misses. A step's backward counts 2x the forward of every matrix
    product but the two whose input needs no gradient (patch embedding, the timestep MLP's first layer), and 2.5x
    for attention (torch's formula for flash attention's backward counts the recomputed scores)."""
    linear, attn = hand_count(12, 384, 256, 2, 4)
    assert benchmark.forward_flops('SiT-S/2') == 2 * (linear + attn)
    model = sit.build_model('SiT-T/2', input_size=16, in_channels=3, num_classes=10)
    with benchmark.flop_counter() as fc:
        model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))[0].sum().backward()
    linear, attn = hand_count(6, 128, 64, 2, 3)
    assert fc.get_total_flops() / 2 == 2 * (3 * linear + 3.5 * attn) - 2 * (64 * 2 * 2 * 3 * 128 + 256 * 128)


def test_training_steps_of_the_scripts(toy, tmp_path):
    """One real step of train_vanilla.py counts what the network's forward and backward count (the loss, clipping,
    AdamW and the EMA have no matrix products), no teacher; REPA adds its projector (D -> P -> P -> z, forward and
    backward: 3x) and a teacher, counted apart. Checkpoint writing and the signal handlers are put back."""
    handler = signal.getsignal(signal.SIGTERM)
    linear, attn = hand_count(6, 128, 64, 2, 3)
    vanilla = 2 * (3 * linear + 3.5 * attn) - 2 * (64 * 2 * 2 * 3 * 128 + 256 * 128)
    assert benchmark.step_flops('vanilla', [], toy, str(tmp_path / 'v'), 'SiT-T/2') == (vanilla, 0)
    student, teacher = benchmark.step_flops('repa', ['--enc', 'dinov2-s', '--encoder-depth', '2', '--projector-dim',
                                                     '32'], toy, str(tmp_path / 'r'), 'SiT-T/2')
    assert student - vanilla == 3 * 2 * 64 * (128 * 32 + 32 * 32 + 32 * 384) and teacher > 0
    assert sit.save_training_state.__name__ == 'save_training_state' and signal.getsignal(signal.SIGTERM) == handler
    assert not os.path.exists(tmp_path / 'v' / 'checkpoints' / '0000001.pt')


def test_inception_flops():
    """The number docs/evaluation.md uses: fid.py's Inception on one 299 px image, 11.5 GFLOPs (a multiply-add = 2)."""
    import fid
    net = fid.InceptionV3().eval()
    with torch.no_grad(), benchmark.flop_counter() as fc:
        net(torch.zeros(1, 3, 299, 299))
    assert round(fc.get_total_flops() / 1e9, 1) == 11.5


def test_vae_decoder_flops():
    """The number docs/evaluation.md uses: the SD-VAE decoder from one 4x32x32 latent to 256 px, 0.6 TFLOPs."""
    with torch.device('meta'):
        vae = sit.AutoencoderKL()
    with torch.no_grad(), benchmark.flop_counter() as fc:
        vae.decode(torch.zeros(1, 4, 32, 32, device='meta'))
    assert round(fc.get_total_flops() / 1e12, 1) == 0.6


def test_committed_benchmark_reports_are_what_the_command_writes():
    """docs/benchmark/*.md are benchmark.py --report files: the command, its date and machine, then the printed lines,
    each of which reads back into benchmark.py's own line formats (so no number in them was typed by hand)."""
    import glob
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reports = sorted(glob.glob(os.path.join(root, 'docs', 'benchmark', '*.md')))
    assert len(reports) >= 3
    for path in reports:
        text = open(path).read()
        head = re.fullmatch(r'`python benchmark\.py ([^`]*)` on (\d{4}-\d\d-\d\d), ([^\n]+):\n\n```\n(.*)\n```\n', text, re.S)
        assert head, path
        for line in head.group(4).splitlines():
            flops = re.fullmatch(r'  (.{9}) +([\d.]+) G student \+ +([\d.]+) G teacher', line)
            times = re.fullmatch(r'  (.{9}) +([\d.]+)x  \[([\d.]+), ([\d.]+)\] +([\d.]+) ms/step +([\d.]+) TFLOP/s', line)
            if flops:
                label, student, teacher = flops.group(1).strip(), float(flops.group(2)), float(flops.group(3))
                assert benchmark.flops_line(label, student * 1e9, teacher * 1e9) == line
            elif times:
                label, *v = times.group(1).strip(), *map(float, times.groups()[1:])
                assert benchmark.time_line(label, *v) == line
            else:
                assert re.match(r'\S', line), (path, line)               # a heading line: the model, batch, rounds
