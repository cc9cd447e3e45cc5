"""Fast NMS (YOLACT), cross-class Fast NMS, Soft-NMS (mmcv) and the ``nms_by_method`` dispatcher.

Every result is checked against a brute-force definition written here with plain Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import instseg.ops.nms as nms_module
from instseg.ops.nms import (
    NMS_METHODS,
    batched_nms,
    cross_class_fast_nms,
    fast_nms,
    multiclass_nms,
    nms_by_method,
    soft_nms,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


# --------------------------------------------------------------------------------------------------
# brute-force references
# --------------------------------------------------------------------------------------------------


def _iou(a, b) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _by_score(ids, scores):
    """Decreasing score, ties by lower index."""
    return sorted(ids, key=lambda i: (-scores[i], i))


def _fast_rule(cand, boxes, thr):
    """YOLACT's rule on a score-sorted list: keep j iff max IoU with every earlier candidate <= thr."""
    kept = []
    for j in range(len(cand)):
        m = max([_iou(boxes[cand[i]], boxes[cand[j]]) for i in range(j)], default=0.0)
        if m <= thr:
            kept.append(cand[j])
    return kept


def _ref_fast_nms(boxes, scores, labels, thr, top_k):
    kept = []
    for c in sorted(set(labels)):
        members = _by_score([i for i in range(len(labels)) if labels[i] == c], scores)[:top_k]
        kept += _fast_rule(members, boxes, thr)
    return _by_score(kept, scores)


def _ref_cross_class_fast_nms(boxes, scores, thr, top_k):
    return _by_score(_fast_rule(_by_score(range(len(scores)), scores)[:top_k], boxes, thr), scores)


def _ref_greedy(boxes, scores, labels, thr):
    kept = []
    for c in sorted(set(labels)):
        alive = []
        for i in _by_score([i for i in range(len(labels)) if labels[i] == c], scores):
            if all(_iou(boxes[i], boxes[k]) <= thr for k in alive):
                alive.append(i)
        kept += alive
    return _by_score(kept, scores)


def _ref_soft_nms(boxes, scores, labels, thr, sigma, min_score, method):
    """Line-by-line port of mmcv's ``softnms_cpu`` (offset 0, float32 arithmetic) on all classes at
    once, with cross-class IoU 0 as mmcv's ``batched_nms`` coordinate-offset trick gives."""
    f = np.float32
    n = len(scores)
    x1, y1, x2, y2 = ([f(v) for v in boxes[:, k]] for k in range(4))
    sc = [f(v) for v in scores]
    lab = list(labels)
    inds = list(range(n))
    areas = [(x2[i] - x1[i]) * (y2[i] - y1[i]) for i in range(n)]
    arrays = [x1, y1, x2, y2, sc, lab, inds, areas]
    out = []
    i = 0
    while i < n:
        max_pos = i
        for pos in range(i + 1, n):
            if sc[max_pos] < sc[pos]:
                max_pos = pos
        for a in arrays:
            a[i], a[max_pos] = a[max_pos], a[i]
        out.append((inds[i], sc[i]))
        pos = i + 1
        while pos < n:
            ovr = f(0.0)
            if lab[pos] == lab[i]:
                w = max(f(0.0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
                h = max(f(0.0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
                inter = w * h
                ovr = inter / (areas[i] + areas[pos] - inter)
            if method == "linear":
                weight = f(1.0) - ovr if ovr >= thr else f(1.0)
            else:
                weight = np.exp(-(ovr * ovr) / f(sigma))
            sc[pos] = f(sc[pos] * weight)
            if sc[pos] < min_score:  # discard by moving the last box here
                for a in arrays:
                    a[pos] = a[n - 1]
                n -= 1
                continue
            pos += 1
        i += 1
    return [k for k, _ in out], [float(s) for _, s in out]


def _clustered_boxes(rng, n, size=400.0):
    centres = rng.uniform(0, size, (max(n // 6, 1), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 8, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


def _t(x, device, dtype=None):
    return torch.tensor(x, device=device, dtype=dtype)


def _case(seed, n, num_classes, *, tied_scores=False, sparse_labels=False):
    rng = np.random.default_rng(seed)
    boxes = _clustered_boxes(rng, n)
    if tied_scores:  # many exact ties: exercises "ties by lower index"
        scores = (rng.integers(1, 40, n) / 40).astype(np.float32)
    else:
        scores = ((rng.permutation(n) + 1) / n).astype(np.float32)
    pool = np.array([0, 3, 17, 79])[:num_classes] if sparse_labels else np.arange(num_classes)
    labels = rng.choice(pool, n)
    return boxes, scores, labels


# --------------------------------------------------------------------------------------------------
# Fast NMS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_fast_nms_matches_bruteforce(thr):
    truncated = differs_from_greedy = 0
    for seed in range(12):
        n, num_classes, top_k = [(1, 1, 5), (40, 3, 8), (150, 4, 30), (90, 2, 200)][seed % 4]
        boxes, scores, labels = _case(seed, n, num_classes, tied_scores=seed % 2 == 0, sparse_labels=seed % 3 == 0)
        keep = fast_nms(_t(boxes, "cpu"), _t(scores, "cpu"), _t(labels, "cpu"), iou_threshold=thr, top_k=top_k)
        b64, s, lab = boxes.astype(np.float64), scores.tolist(), labels.tolist()
        ref = _ref_fast_nms(b64, s, lab, thr, top_k)
        assert keep.dtype == torch.int64
        assert keep.tolist() == ref
        # Fast NMS only ever drops more than greedy NMS on the same top_k candidates
        cand = [i for c in set(lab) for i in _by_score([i for i in range(n) if lab[i] == c], s)[:top_k]]
        greedy = _ref_greedy(b64[cand], [s[i] for i in cand], [lab[i] for i in cand], thr)
        greedy = {cand[i] for i in greedy}
        assert set(ref) <= greedy
        truncated += max(np.bincount(labels)) > top_k
        differs_from_greedy += set(ref) != greedy
    assert truncated >= 3  # top_k really cuts some classes
    assert differs_from_greedy >= 1 or thr > 0.6  # (these loose clusters rarely overlap > 0.7)


def test_fast_nms_differs_from_greedy_hand_case():
    # A suppresses B (IoU 7/13 > 0.5); B would suppress C (IoU 7/13) but greedy keeps C because B is
    # already gone (IoU(A, C) = 0.25).  Fast NMS lets the suppressed B still suppress C.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 3.0, 10.0, 13.0], [0.0, 6.0, 10.0, 16.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.zeros(3, dtype=torch.int64)
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 2]
    assert fast_nms(boxes, scores, labels, iou_threshold=0.5).tolist() == [0]
    # the rule is "<= thr": at thr = 7/13 nothing is suppressed
    assert fast_nms(boxes, scores, labels, iou_threshold=7 / 13 + 1e-6).tolist() == [0, 1, 2]
    # an IoU exactly at the threshold does not suppress (keep iff max IoU <= thr)
    pair = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]])  # IoU exactly 0.5
    two = torch.tensor([0.9, 0.8])
    assert fast_nms(pair, two, labels[:2], iou_threshold=0.5).tolist() == [0, 1]
    assert fast_nms(pair, two, labels[:2], iou_threshold=0.49).tolist() == [0]
    assert cross_class_fast_nms(pair, two, labels[:2], iou_threshold=0.5).tolist() == [0, 1]
    assert cross_class_fast_nms(pair, two, labels[:2], iou_threshold=0.49).tolist() == [0]
    # other classes are independent, and candidates beyond top_k are dropped
    assert fast_nms(boxes, scores, torch.tensor([0, 1, 1]), iou_threshold=0.5).tolist() == [0, 1]
    assert fast_nms(boxes, scores, torch.tensor([0, 1, 2]), iou_threshold=0.5, top_k=1).tolist() == [0, 1, 2]
    assert fast_nms(boxes, scores, torch.tensor([0, 1, 1]), iou_threshold=0.99, top_k=1).tolist() == [0, 1]


@pytest.mark.parametrize("thr", [0.4, 0.6])
def test_cross_class_fast_nms_matches_bruteforce(thr):
    for seed in range(8):
        n, top_k = [(1, 3), (60, 25), (120, 200), (200, 50)][seed % 4]
        boxes, scores, labels = _case(100 + seed, n, 5, tied_scores=seed % 2 == 1)
        keep = cross_class_fast_nms(_t(boxes, "cpu"), _t(scores, "cpu"), _t(labels, "cpu"), iou_threshold=thr, top_k=top_k)
        assert keep.tolist() == _ref_cross_class_fast_nms(boxes.astype(np.float64), scores.tolist(), thr, top_k)
    # the class is ignored: the same box in another class is suppressed
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = cross_class_fast_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), torch.tensor([0, 1, 2]), iou_threshold=0.5)
    assert keep.tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------
# Soft-NMS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("min_score", [1e-3, 0.05, 0.3])
def test_soft_nms_matches_mmcv_bruteforce(method, min_score):
    pruned = 0
    for seed in range(6):
        n, num_classes = [(1, 1), (30, 1), (80, 3), (120, 5)][seed % 4]
        rng = np.random.default_rng(200 + seed)
        boxes = _clustered_boxes(rng, n)
        # distinct scores, all >= min_score (mmcv exempts its first pick from min_score; see soft_nms doc)
        scores = (min_score + (1 - min_score) * (rng.permutation(n) + 1) / n).astype(np.float32)
        labels = rng.integers(0, num_classes, n) * 7  # sparse class ids
        thr = [0.3, 0.5][seed % 2]
        keep, out = soft_nms(
            _t(boxes, "cpu"), _t(scores, "cpu"), _t(labels, "cpu"), iou_threshold=thr, sigma=0.5, min_score=min_score, method=method
        )
        ref_keep, ref_scores = _ref_soft_nms(boxes, scores, labels.tolist(), thr, 0.5, min_score, method)
        assert keep.dtype == torch.int64 and out.dtype == torch.float32
        assert keep.tolist() == ref_keep
        np.testing.assert_allclose(out.numpy(), ref_scores, rtol=1e-5, atol=1e-7)
        assert (out[:-1] >= out[1:]).all() and (out >= min_score).all()
        pruned += n - len(ref_keep)
    assert pruned > 0 or min_score == 1e-3  # min_score actually removes boxes in these cases


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_per_pick_iou_path(method, monkeypatch):
    """Without the (C, K, K) IoU cache (large classes) the per-pick IoU rows give the same result."""
    boxes, scores, labels = _case(31, 150, 3)
    args = (_t(boxes, "cpu"), _t(scores, "cpu"), _t(labels, "cpu"))
    cached = soft_nms(*args, iou_threshold=0.3, min_score=0.05, method=method)
    monkeypatch.setattr(nms_module, "SOFT_NMS_IOU_CACHE_ELEMENTS", 0)
    keep, s = soft_nms(*args, iou_threshold=0.3, min_score=0.05, method=method)
    assert torch.equal(keep, cached[0]) and torch.equal(s, cached[1])
    ref_keep, ref_scores = _ref_soft_nms(boxes, scores, labels.tolist(), 0.3, 0.5, 0.05, method)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(s.numpy(), ref_scores, rtol=1e-5, atol=1e-7)


def test_soft_nms_rules():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    zero = torch.zeros(2, dtype=torch.int64)
    # linear decays at iou >= thr (mmcv's operator), by 1 - iou
    keep, s = soft_nms(boxes, scores, zero, iou_threshold=0.5, method="linear")
    assert keep.tolist() == [0, 1] and s.tolist() == pytest.approx([0.9, 0.4])
    # a decayed score exactly at min_score survives (mmcv drops iff score < min_score)
    keep, s = soft_nms(boxes, scores, zero, iou_threshold=0.5, min_score=0.4, method="linear")
    assert keep.tolist() == [0, 1]
    keep, s = soft_nms(boxes, scores, zero, iou_threshold=0.5, min_score=0.41, method="linear")
    assert keep.tolist() == [0]
    keep, s = soft_nms(boxes, scores, zero, iou_threshold=0.51, method="linear")
    assert s.tolist() == pytest.approx([0.9, 0.8])
    # gaussian decays every overlap, whatever the threshold
    keep, s = soft_nms(boxes, scores, zero, iou_threshold=0.9, sigma=0.5, method="gaussian")
    assert s.tolist() == pytest.approx([0.9, 0.8 * math.exp(-0.25 / 0.5)])
    # a decayed score below min_score is dropped; different classes never decay each other
    same = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    keep, s = soft_nms(same, torch.tensor([0.5, 0.9, 0.7]), torch.tensor([0, 0, 1]), method="linear")
    assert keep.tolist() == [1, 2] and s.tolist() == pytest.approx([0.9, 0.7])
    # the decayed score can reorder picks: B (0.8) decayed by A below C (0.5)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0], [50.0, 50.0, 60.0, 60.0]])
    keep, s = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.5]), torch.zeros(3, dtype=torch.int64), method="linear")
    assert keep.tolist() == [0, 2, 1] and s.tolist() == pytest.approx([0.9, 0.5, 0.8 * (1 - 1 / 1.2)])
    # inputs below min_score are dropped up front (documented difference from mmcv's first pick)
    keep, _ = soft_nms(boxes, torch.tensor([5e-4, 0.8, 0.5]), torch.tensor([0, 1, 2]), method="linear")
    assert keep.tolist() == [1, 2]
    with pytest.raises(ValueError, match="gaussian"):
        soft_nms(boxes, torch.ones(3), torch.zeros(3, dtype=torch.int64), method="naive")


# --------------------------------------------------------------------------------------------------
# dispatcher / multiclass_nms
# --------------------------------------------------------------------------------------------------


def test_nms_methods_constant_and_unknown_method():
    assert NMS_METHODS == ("hard", "fast", "fast_cross_class", "soft_linear", "soft_gaussian")
    with pytest.raises(ValueError, match="hard, fast, fast_cross_class, soft_linear, soft_gaussian"):
        nms_by_method(torch.zeros((1, 4)), torch.ones(1), torch.zeros(1, dtype=torch.int64), method="greedy", iou_threshold=0.5)
    with pytest.raises(ValueError, match="valid methods"):
        multiclass_nms(torch.zeros((1, 4)), torch.ones((1, 2)) / 2, score_thr=0.0, iou_threshold=0.5, max_num=10, method="soft")


def test_nms_by_method_routes_to_each_function():
    boxes, scores, labels = (_t(x, "cpu") for x in _case(5, 150, 4))
    keep, s = nms_by_method(boxes, scores, labels, method="hard", iou_threshold=0.5)
    assert torch.equal(keep, batched_nms(boxes, scores, labels, 0.5)) and torch.equal(s, scores[keep])
    keep, s = nms_by_method(boxes, scores, labels, method="fast", iou_threshold=0.5, top_k=20)
    assert torch.equal(keep, fast_nms(boxes, scores, labels, iou_threshold=0.5, top_k=20)) and torch.equal(s, scores[keep])
    assert len(keep) < len(batched_nms(boxes, scores, labels, 0.5))  # top_k=20 did reach fast_nms
    keep, s = nms_by_method(boxes, scores, labels, method="fast_cross_class", iou_threshold=0.5, top_k=30)
    assert torch.equal(keep, cross_class_fast_nms(boxes, scores, labels, iou_threshold=0.5, top_k=30))
    for name in ("linear", "gaussian"):
        keep, s = nms_by_method(boxes, scores, labels, method=f"soft_{name}", iou_threshold=0.4, sigma=0.3, min_score=0.1)
        rk, rs = soft_nms(boxes, scores, labels, iou_threshold=0.4, sigma=0.3, min_score=0.1, method=name)
        assert torch.equal(keep, rk) and torch.equal(s, rs)
        assert not torch.equal(s, scores[keep])  # decayed scores come back, not the inputs


def _old_multiclass_nms(boxes, scores, score_thr, iou_threshold, max_num):
    """The pre-dispatcher implementation, verbatim logic."""
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    cand = boxes.reshape(n, num_classes, 4) if boxes.shape[1] > 4 else boxes[:, None, :].expand(n, num_classes, 4)
    rows, labels = torch.nonzero(scores[:, :num_classes] > score_thr, as_tuple=True)
    cand, s = cand[rows, labels], scores[:, :num_classes][rows, labels]
    keep = batched_nms(cand, s, labels, iou_threshold)
    keep = keep[:max_num] if max_num > 0 else keep
    return cand[keep], s[keep], labels[keep], rows[keep]


@pytest.mark.parametrize("agnostic", [True, False])
def test_multiclass_nms_methods(agnostic):
    rng = np.random.default_rng(11)
    n, c = 150, 4
    base = _clustered_boxes(rng, n)
    boxes = base if agnostic else np.concatenate([base + rng.normal(0, 3, base.shape).astype(np.float32) for _ in range(c)], 1)
    logits = rng.normal(0, 2, (n, c + 1))
    scores = torch.tensor(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), dtype=torch.float32)
    boxes = torch.tensor(boxes)
    for max_num in (-1, 25):
        old = _old_multiclass_nms(boxes, scores, 0.05, 0.5, max_num)
        for new in (
            multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5, max_num=max_num),
            multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5, max_num=max_num, method="hard", top_k=3),
        ):
            assert all(torch.equal(a, b) for a, b in zip(old, new))
        for method in NMS_METHODS[1:]:
            b, s, lab, rows = multiclass_nms(
                boxes, scores, score_thr=0.05, iou_threshold=0.5, max_num=max_num, method=method, top_k=40, min_score=0.02
            )
            cand = boxes.reshape(n, c, 4)[rows, lab] if not agnostic else boxes[rows]
            assert torch.equal(b, cand)
            # same detections as the dispatcher on the thresholded candidates
            rr, ll = torch.nonzero(scores[:, :c] > 0.05, as_tuple=True)
            cb = boxes.reshape(n, c, 4)[rr, ll] if not agnostic else boxes[rr]
            keep, ks = nms_by_method(cb, scores[rr, ll], ll, method=method, iou_threshold=0.5, top_k=40, min_score=0.02)
            keep, ks = (keep[:max_num], ks[:max_num]) if max_num > 0 else (keep, ks)
            assert torch.equal(rows, rr[keep]) and torch.equal(lab, ll[keep]) and torch.equal(s, ks)


# --------------------------------------------------------------------------------------------------
# empty / fp16 / CUDA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", NMS_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_input_every_method(device, method, dtype):
    boxes = torch.zeros((0, 4), device=device, dtype=dtype)
    keep, s = nms_by_method(
        boxes, torch.zeros(0, device=device, dtype=dtype), torch.zeros(0, dtype=torch.int64, device=device), method=method, iou_threshold=0.5
    )
    assert keep.shape == (0,) and keep.dtype == torch.int64 and keep.device.type == device
    assert s.shape == (0,) and s.dtype == dtype and s.device.type == device
    b, s, lab, rows = multiclass_nms(
        torch.zeros((0, 4), device=device), torch.zeros((0, 3), device=device), score_thr=0.05, iou_threshold=0.5, max_num=10, method=method
    )
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,) and rows.shape == (0,)


@pytest.mark.parametrize("method", NMS_METHODS)
def test_fp16_inputs_compute_in_float32(method):
    boxes, scores, labels = _case(21, 120, 3)
    boxes16, scores16 = torch.tensor(boxes * 2).half(), torch.tensor(scores).half()
    k16, s16 = nms_by_method(boxes16, scores16, torch.tensor(labels), method=method, iou_threshold=0.5, top_k=25)
    k32, s32 = nms_by_method(boxes16.float(), scores16.float(), torch.tensor(labels), method=method, iou_threshold=0.5, top_k=25)
    assert s16.dtype == torch.float16 and len(k16) > 0
    assert torch.equal(k16, k32) and torch.equal(s16, s32.half())


@CUDA
@pytest.mark.parametrize("method", NMS_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu(method, dtype):
    for seed in range(4):
        boxes, scores, labels = _case(300 + seed, [1, 50, 200, 400][seed], 4, tied_scores=seed == 2)
        args = (torch.tensor(boxes).to(dtype), torch.tensor(scores).to(dtype), torch.tensor(labels))
        kc, sc = nms_by_method(*args, method=method, iou_threshold=0.5, top_k=60, min_score=0.05)
        kg, sg = nms_by_method(*(a.cuda() for a in args), method=method, iou_threshold=0.5, top_k=60, min_score=0.05)
        assert kg.device.type == "cuda" and sg.device.type == "cuda"
        if method == "hard" and seed == 2:  # torchvision's CUDA kernel breaks score ties its own way
            assert set(kg.tolist()) == set(kc.tolist())
        else:
            assert kg.cpu().tolist() == kc.tolist()
        torch.testing.assert_close(sg.cpu(), sc, rtol=1e-5, atol=1e-6)
