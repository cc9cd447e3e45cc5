"""Deformable-conv ResNet-50 (DCN v1 / modulated v2 on c3-c5) next to the plain ResNet-50, on CPU.

Usage::

    .venv/bin/python benchmarks/dcn.py [--size 512 512] [--batch 1] [--repeats 3] [--warmup 1]
        [--threads N] [--variants plain,dcn,dcnv2] [--out benchmarks/results/dcn/dcn_cpu.json]

Everything runs in one process, the variants side by side and their order rotating between rounds
(median of ``--repeats`` rounds after ``--warmup``):

* ``train_step``: backbone forward + a scalar loss over C2..C5 + backward + SGD step, train mode
  (``frozen_stages=1``, ``norm_eval=True`` as in every mmdet config), batch ``--batch``.
* ``infer``: eval mode, ``torch.no_grad()``, as built.
* ``infer_fused``: eval mode after BN folding + channels-last (what
  ``Detector.optimize_for_inference`` does to the backbone; DCN layers fold too).

Inputs: random images of ``--size H W`` (same tensor for every variant). The DCN layers get small
random offset convolutions (std 0.01 weights, 0.5 bias), so they sample at fractional positions as a
trained model does (zero offsets would sample on the pixel grid; the kernels cost the same either way).
Also timed: one ``conv2`` of ``layer3`` alone (256 -> 256 channels at stride 16), plain vs DCN.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from instseg.modeling.backbones.resnet import ResNet, fuse_conv_bn
from instseg.ops.deform_conv import DeformConv2dPack, ModulatedDeformConv2dPack

C3_C5 = (False, True, True, True)


def build(variant: str) -> nn.Module:
    torch.manual_seed(0)
    dcn = None if variant == "plain" else variant
    m = ResNet(depth=50, dcn=dcn, stage_with_dcn=C3_C5 if dcn else (False,) * 4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (DeformConv2dPack, ModulatedDeformConv2dPack)):
                mod.conv_offset.weight.copy_(torch.randn(mod.conv_offset.weight.shape, generator=g) * 0.01)
                mod.conv_offset.bias.copy_(torch.randn(mod.conv_offset.bias.shape, generator=g) * 0.5)
    return m


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", default="plain,dcn,dcnv2")
    ap.add_argument("--out", default="benchmarks/results/dcn/dcn_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    h, w = args.size
    x_train = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(2))
    x_infer = x_train[:1]

    load_start = os.getloadavg()
    models = {v: build(v) for v in variants}
    fused = {}
    for v, m in models.items():
        f = fuse_conv_bn(build(v).eval())
        f.to(memory_format=torch.channels_last)
        fused[v] = f
    opts = {
        v: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
        for v, m in models.items()
    }

    def train_step(v: str) -> None:
        m = models[v]
        m.train()
        opts[v].zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in m(x_train))
        loss.backward()
        opts[v].step()

    def infer(v: str) -> None:
        m = models[v]
        m.eval()
        with torch.no_grad():
            m(x_infer)

    def infer_fused(v: str) -> None:
        with torch.no_grad():
            fused[v](x_infer.contiguous(memory_format=torch.channels_last))

    # one layer3 conv2 alone: 256 -> 256, 3x3, at stride 16 of the input
    feat = torch.randn(1, 256, h // 16, w // 16)
    layer_convs = {"plain": nn.Conv2d(256, 256, 3, padding=1, bias=False)}
    layer_convs["dcn"] = DeformConv2dPack(256, 256, 3, padding=1)
    layer_convs["dcnv2"] = ModulatedDeformConv2dPack(256, 256, 3, padding=1, bias=False)
    for c in layer_convs.values():
        if hasattr(c, "conv_offset"):
            with torch.no_grad():
                c.conv_offset.bias.normal_(0, 0.5)

    def layer_fwd_bwd(v: str) -> None:
        f = feat.clone().requires_grad_(True)
        layer_convs[v](f).sum().backward()

    def layer_fwd(v: str) -> None:
        with torch.no_grad():
            layer_convs[v](feat)

    benches = {
        "train_step": train_step,
        "infer": infer,
        "infer_fused": infer_fused,
        "layer3_conv2_fwd": layer_fwd,
        "layer3_conv2_fwd_bwd": layer_fwd_bwd,
    }
    times: dict[str, dict[str, list[float]]] = {b: {v: [] for v in variants} for b in benches}
    for r in range(args.warmup + args.repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for name, fn in benches.items():
            for v in order:
                ms = timed(lambda: fn(v))
                if r >= args.warmup:
                    times[name][v].append(ms)
        print(f"round {r + 1}/{args.warmup + args.repeats} done", flush=True)

    per_img = {"train_step": args.batch}
    results: dict[str, dict] = {}
    for name in benches:
        results[name] = {}
        for v in variants:
            med = statistics.median(times[name][v])
            results[name][v] = {
                "median_ms": round(med, 1),
                "ms_per_img": round(med / per_img.get(name, 1), 1),
                "runs_ms": [round(t, 1) for t in times[name][v]],
            }
            if v != "plain" and "plain" in variants:
                results[name][v]["x_plain"] = round(med / statistics.median(times[name]["plain"]), 2)
    report = {
        "what": "ResNet-50 backbone (C2..C5), plain vs DCN v1 / modulated DCN v2 on c3-c5 (mmdet dconv/mdconv c3-c5)",
        "input": {"batch_train": args.batch, "size_hw": [h, w]},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # other processes share the CPU: load averages (1, 5, 15 min) at start and end of the run
        "loadavg_start_end": [[round(v, 2) for v in load_start], [round(v, 2) for v in os.getloadavg()]],
        "params_M": {v: round(sum(p.numel() for p in m.parameters()) / 1e6, 3) for v, m in models.items()},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name in benches:
        cells = []
        for v in variants:
            r = results[name][v]
            cells.append(f"{v} {r['ms_per_img']} ms" + (f" (x{r['x_plain']})" if "x_plain" in r else ""))
        row = ", ".join(cells)
        print(f"{name:>22}: {row}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
