"""Mixed precision: ``train.amp`` parsing, fp16 refused on CPU, and a CPU bf16 autocast smoke test."""

from __future__ import annotations

import pytest
import torch

from instseg.config.load import ConfigError, apply_overrides
from instseg.config.schema import Config
from instseg.engine.amp import amp_dtype, autocast, parse_amp
from instseg.ops.box_coder import DeltaXYWHCoder


@pytest.mark.parametrize("value,mode", [("", ""), ("fp16", "fp16"), ("BF16", "bf16"), (True, "fp16"),
                                        (False, ""), ("true", "fp16"), ("False", "")])
def test_parse_amp_reads_old_booleans(value, mode):
    assert parse_amp(value) == mode


def test_old_configs_with_a_boolean_amp_still_load(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("train:\n  amp: true\n")
    cfg = apply_overrides(Config(), [str(f)])
    assert parse_amp(cfg.train.amp) == "fp16"
    assert parse_amp(apply_overrides(Config(), [], ["train.amp=false"]).train.amp) == ""


def test_bad_values_and_fp16_on_cpu_are_clear_errors():
    with pytest.raises(ConfigError, match="expected '' .*fp16 or bf16"):
        parse_amp("fp8")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        amp_dtype("fp16", torch.device("cpu"))
    assert amp_dtype("", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_box_decoding_upcasts_half_precision():
    coder = DeltaXYWHCoder(means=(0.0,) * 4, stds=(0.1, 0.1, 0.2, 0.2))
    refs = torch.tensor([[1000.0, 700.0, 1100.5, 790.25]])
    deltas = torch.tensor([[0.013, -0.02, 0.05, 0.01]])
    exact = coder.decode(refs, deltas)
    got = coder.decode(refs, deltas.to(torch.bfloat16))
    assert got.dtype == torch.float32
    # only the rounding of the deltas themselves remains (bf16 boxes would be off by ~4 px here)
    torch.testing.assert_close(got, exact, atol=0.05, rtol=0)


def test_cpu_bf16_forward_of_a_tiny_mask_rcnn():
    from instseg.modeling.zoo import build_model
    from tests.models.tiny import tiny_batch, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("mask_rcnn")).train()
    batch, targets = tiny_batch()
    with autocast(torch.device("cpu"), torch.bfloat16):
        losses = model(batch, targets)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        dets = model.predict(batch)
    assert len(dets) == 2 and all(d.boxes.dtype == torch.float32 for d in dets)
