"""Training throughput: meddiff's training step against a minimal hand-written PyTorch loop.

Both loops run in this process, over the same model architecture and the same batches, alternating
rounds so that machine noise hits both alike. Reported: samples/s of each, our overhead as a ratio
(target ≤ 1.05), a step-time breakdown (data, forward, backward, optimiser) for ours, the model
FLOPs of one training step (``torch.utils.flop_counter``), the achieved FLOP/s, and that as a
fraction of a plain ``torch.matmul`` peak measured in the same run (and, on CUDA, of the H200's
~790 TFLOP/s bf16 peak). Runs unchanged on CPU and CUDA (``--device cuda --bf16`` on a GPU).

    python bench/train_throughput.py [--steps 20] [--batch-size 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_tiny_processed

from meddiff.config import Params, apply_overrides
from meddiff.data.batches import model_inputs, to_batch
from meddiff.model.latent_stack import LatentStack
from meddiff.training.loop import build_model
from meddiff.training.masking import sample_modality_mask
from meddiff.training.objective import compute_losses


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a plain square ``torch.matmul`` on this device: the roof our step is compared to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    parser.add_argument("--output", default=None, help="write the result JSON here too")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        data = make_tiny_processed(Path(tmp) / "p", n=args.batch_size * 4, side=args.side)
    params = apply_overrides(Params(), [f"train.batch_size={args.batch_size}"])
    torch.manual_seed(0)
    ours = build_model(data, params).to(device).train()
    plain = build_model(data, params).to(device).train()
    plain.load_state_dict(ours.state_dict())
    batches = [
        to_batch(data, np.arange(i * args.batch_size, (i + 1) * args.batch_size), device) for i in range(4)
    ]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    breakdown = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step_ours(batch: dict) -> None:
        t0 = time.perf_counter()
        present = batch["modality_present"].cpu()
        masked_present = sample_modality_mask(present, params.train.modality_dropout_p, generator).to(device)
        sync(device)
        t1 = time.perf_counter()
        with autocast:
            output = ours(model_inputs(batch), masked_present)
            losses = compute_losses(ours, batch, output, params.train, None)
        sync(device)
        t2 = time.perf_counter()
        opt_ours.zero_grad(set_to_none=True)
        losses.total.backward()
        sync(device)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), params.train.grad_clip_norm)
        opt_ours.step()
        sync(device)
        t4 = time.perf_counter()
        for key, value in zip(breakdown, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            breakdown[key] += value

    def step_plain(batch: dict) -> None:
        present = batch["modality_present"]
        with autocast:
            output = plain(model_inputs(batch), present)
            loss = torch.nn.functional.cross_entropy(output.logits, batch["label"])
            stack = LatentStack.build(output.modality_latents, present, z=output.z)
            loss = loss + plain.diffusion.loss(stack.values.detach(), batch["label"])
            z = output.z
            loss = loss + ((plain.image_decoder(z) - batch["image"]) ** 2).mean()
            loss = loss + ((plain.tabular_decoder(z) - batch["tabular"]) ** 2).mean()
            loss = loss + plain.keyword_decoder(z).sigmoid().mean()
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    for step in (step_ours, step_plain):  # warm-up
        step(batches[0])
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_plain(batches[0])
    step_flops = counter.get_total_flops()
    matmul_peak = measure_matmul_peak(device, torch.bfloat16 if args.bf16 else torch.float32)
    times = {"ours": 0.0, "plain": 0.0}
    for _ in range(args.rounds):
        for name, step in (("ours", step_ours), ("plain", step_plain)):
            sync(device)
            started = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % len(batches)])
            sync(device)
            elapsed = time.perf_counter() - started
            times[name] += elapsed
            print(f"{name}: {elapsed / args.steps:.3f} s/step", file=sys.stderr)
    samples = args.rounds * args.steps * args.batch_size
    result = {
        "device": str(device),
        "bf16": args.bf16,
        "batch_size": args.batch_size,
        "volume_side": args.side,
        "samples_per_s_ours": samples / times["ours"],
        "samples_per_s_plain": samples / times["plain"],
        "overhead_ratio": times["ours"] / times["plain"],
        "step_breakdown_s": {k: v / (args.rounds * args.steps) for k, v in breakdown.items()},
        "model_flops_per_step": step_flops,
        "achieved_flops_per_s": step_flops * args.rounds * args.steps / times["ours"],
        "matmul_peak_flops_per_s": matmul_peak,
    }
    result["fraction_of_matmul_peak"] = result["achieved_flops_per_s"] / matmul_peak
    if device.type == "cuda":
        result["mfu_vs_h200_bf16_790_tflops"] = result["achieved_flops_per_s"] / 790e12
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
