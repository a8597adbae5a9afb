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
