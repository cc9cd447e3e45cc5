"""engine/distributed.py in a single process (a world of one), and the trainer's lr rule."""

from __future__ import annotations

import pytest
import torch

from instseg.config.schema import Config
from instseg.engine import distributed as dist_utils
from instseg.engine.distributed import DistInfo
from instseg.engine.trainer import Trainer


def test_env_info_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_utils.env_info() == DistInfo(0, 1, 0) and not dist_utils.env_info().distributed
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_utils.env_info() == DistInfo(5, 8, 1) and dist_utils.env_info().distributed
    assert not dist_utils.is_main()  # rank 5 does not print, even before joining the group
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RuntimeError, match="must be integers"):
        dist_utils.env_info()


def test_a_world_of_one_needs_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_utils.init_from_env("cpu") == DistInfo() and not dist_utils.is_initialized()
    assert dist_utils.get_rank() == 0 and dist_utils.get_world_size() == 1 and dist_utils.is_main()
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist_utils.broadcast_object(3) == 3
    assert dist_utils.all_finite(True) and not dist_utils.all_finite(False)
    dist_utils.barrier()
    assert dist_utils.local_device(torch.device("cpu")) == torch.device("cpu")


def test_shard_covers_every_index_once():
    parts = [dist_utils.shard(11, r, 3) for r in range(3)]
    assert parts[0] == [0, 3, 6, 9] and sorted(i for p in parts for i in p) == list(range(11))


@pytest.mark.parametrize("world,batch,auto,expected", [
    (1, 2, False, 0.02), (8, 2, False, 0.02), (8, 2, True, 0.02), (2, 2, True, 0.005), (4, 4, True, 0.02),
])
def test_auto_scale_lr_is_mmdetections_linear_rule(world, batch, auto, expected, capsys):
    cfg = Config()
    cfg.train.lr, cfg.train.auto_scale_lr, cfg.data.batch_size = 0.02, auto, batch
    trainer = Trainer(cfg)
    trainer.dist = DistInfo(rank=0, world_size=world)
    assert trainer._scaled_lr() == pytest.approx(expected)
    out = capsys.readouterr().out
    if auto:
        assert f"total batch {world} x {batch} = {world * batch}, base batch 16" in out
    elif world > 1:
        assert "auto_scale_lr=false" in out


def test_sync_bn_conversion_keeps_frozen_bn_frozen():
    """``train.sync_bn`` converts with ``SyncBatchNorm.convert_sync_batchnorm``; the backbone's
    ``norm_eval`` / ``frozen_stages`` must still hold for the converted layers."""
    from instseg.modeling.zoo import build_model
    from tests.models.tiny import tiny_config

    model = build_model(tiny_config("mask_rcnn"))
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    sync = [m for m in model.backbone.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert sync and all(not m.training for m in sync), "norm_eval keeps every (Sync)BN in eval mode"
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen_before
