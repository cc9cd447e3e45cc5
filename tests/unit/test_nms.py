"""batched_nms / multiclass_nms against a brute-force per-class greedy NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg.ops.nms import batched_nms, multiclass_nms

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _ref_batched_nms(boxes, scores, idxs, thr):
    """Greedy hard NMS per class (suppress IoU > thr); kept indices by decreasing score."""
    kept = []
    for c in sorted(set(idxs)):
        members = sorted([i for i in range(len(boxes)) if idxs[i] == c], key=lambda i: -scores[i])
        alive = []
        for i in members:
            if all(_iou(boxes[i], boxes[k]) <= thr for k in alive):
                alive.append(i)
        kept.extend(alive)
    return sorted(kept, key=lambda i: -scores[i])


def _clustered_boxes(rng, n, size=400.0):
    centres = rng.uniform(0, size, (max(n // 6, 1), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 8, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_batched_nms_matches_bruteforce(device, thr, num_classes):
    rng = np.random.default_rng(int(thr * 10) + num_classes)
    for n in [1, 30, 200]:
        boxes = _clustered_boxes(rng, n)
        scores = rng.permutation(n).astype(np.float32) / n + 0.01  # distinct scores
        idxs = rng.integers(0, num_classes, n)
        keep = batched_nms(
            torch.tensor(boxes, device=device), torch.tensor(scores, device=device), torch.tensor(idxs, device=device), thr
        )
        ref = _ref_batched_nms(boxes.astype(np.float64), scores, idxs.tolist(), thr)
        assert keep.dtype == torch.int64 and keep.device.type == device
        assert keep.cpu().tolist() == ref


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_edge_cases(device):
    # IoU exactly equal to the threshold is kept (suppression is strictly IoU > thr)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    same = torch.zeros(2, dtype=torch.int64, device=device)
    assert batched_nms(boxes, scores, same, 0.5).cpu().tolist() == [0, 1]
    assert batched_nms(boxes, scores, same, 0.49).cpu().tolist() == [0]
    # identical boxes in different classes never suppress each other
    dup = boxes[:1].repeat(3, 1)
    assert batched_nms(dup, torch.tensor([0.1, 0.3, 0.2], device=device), torch.tensor([0, 1, 2], device=device), 0.5).cpu().tolist() == [1, 2, 0]
    # empty input
    out = batched_nms(torch.zeros((0, 4), device=device), torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device), 0.5)
    assert out.shape == (0,) and out.dtype == torch.int64
    # half precision input works (coordinates offset per class in float32)
    b16 = torch.tensor(_clustered_boxes(np.random.default_rng(0), 50, 900.0), device=device)
    s = torch.rand(50, generator=torch.Generator().manual_seed(0)).to(device)
    i = torch.randint(0, 80, (50,), generator=torch.Generator().manual_seed(1)).to(device)
    assert batched_nms(b16.half(), s.half(), i, 0.5).cpu().tolist() == batched_nms(b16.half().float(), s.half().float(), i, 0.5).cpu().tolist()


def _ref_multiclass(boxes, scores, score_thr, thr, max_num):
    n, c1 = scores.shape
    c = c1 - 1
    cand, cs, labels, rows = [], [], [], []
    for r in range(n):
        for k in range(c):  # background (last column) is never a candidate
            if scores[r, k] > score_thr:
                cand.append(boxes[r, 4 * k : 4 * k + 4] if boxes.shape[1] > 4 else boxes[r, :4])
                cs.append(scores[r, k])
                labels.append(k)
                rows.append(r)
    keep = _ref_batched_nms(cand, cs, labels, thr)
    if max_num > 0:
        keep = keep[:max_num]
    return [cand[i] for i in keep], [cs[i] for i in keep], [labels[i] for i in keep], [rows[i] for i in keep]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agnostic", [True, False])
@pytest.mark.parametrize("max_num", [-1, 0, 20])
def test_multiclass_nms_matches_reference(device, agnostic, max_num):
    rng = np.random.default_rng(7 + int(agnostic) + max_num)
    n, c = 120, 4
    base = _clustered_boxes(rng, n)
    boxes = base if agnostic else np.concatenate([base + rng.normal(0, 3, base.shape).astype(np.float32) for _ in range(c)], 1)
    logits = rng.normal(0, 2, (n, c + 1))
    logits[:, -1] += 3  # background is often the largest column: it must be ignored all the same
    scores = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    scores[0, 1] = 0.05  # exactly at the threshold -> dropped
    out = multiclass_nms(
        torch.tensor(boxes, device=device), torch.tensor(scores, device=device), score_thr=0.05, iou_threshold=0.5, max_num=max_num
    )
    rb, rs, rl, rr = _ref_multiclass(boxes, scores, 0.05, 0.5, max_num)
    b, s, lab, rows = (t.cpu() for t in out)
    assert b.shape == (len(rb), 4)
    assert lab.tolist() == rl and rows.tolist() == rr
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), np.array(rb).reshape(-1, 4), rtol=1e-6)
    assert not ((rows == 0) & (lab == 1)).any()
    if max_num > 0:
        assert len(rl) == max_num  # top-k actually truncates here
    else:
        assert len(rl) > 20  # the case is not trivially small


def test_multiclass_nms_nothing_above_threshold():
    scores = torch.tensor([[0.01, 0.02, 0.97], [0.05, 0.0, 0.95]])
    b, s, lab, rows = multiclass_nms(torch.rand(2, 4) * 10 + torch.tensor([0, 0, 20, 20]), scores, score_thr=0.05, iou_threshold=0.5, max_num=100)
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,) and rows.shape == (0,)
    b, s, lab, rows = multiclass_nms(torch.zeros((0, 8)), torch.zeros((0, 3)), score_thr=0.05, iou_threshold=0.5, max_num=100)
    assert b.shape == (0, 4) and lab.shape == (0,)
