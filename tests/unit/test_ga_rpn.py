"""Guided-Anchoring RPN pieces against their definitions (mmdetection 3.3.0 / mmcv 2.1.0)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from instseg.modeling.dense_heads.ga_rpn import DeformConv2d, GAOutputs, GARPNHead
from instseg.modeling.dense_heads.rpn import ProposalSettings
from instseg.ops.anchors import AnchorGenerator
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.ga_targets import (
    ApproxMaxIoUAssigner,
    approx_overlaps,
    approx_overlaps_on_grid,
    bounded_iou_loss,
    focal_loss,
    ga_loc_targets,
    gt_levels,
    wh_ratio_clamp,
)
from instseg.ops.sampler import RandomSampler


# ----------------------------------------------------------------------------- deformable conv
def _bilinear_mmcv(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """mmcv's ``deformable_im2col_bilinear`` for one point of a ``(C, H, W)`` image (0 outside)."""
    c, h, w = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return img.new_zeros(c)
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    out = img.new_zeros(c)
    for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                       (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < h and 0 <= xx < w:
            out = out + wt * img[:, yy, xx]
    return out


def _deform_conv_brute(x, offset, weight, padding, groups):
    """Explicit DCN v1: per output location, kernel point and deformable group, bilinear-sample
    at ``p0 + pk + (offset[2k], offset[2k + 1]) = (dy, dx)``, then the weighted sum."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    cg = c // groups
    out = x.new_zeros(b, o, h, w)
    for n in range(b):
        for yo in range(h):
            for xo in range(w):
                cols = x.new_zeros(c, kh, kw)
                for g in range(groups):
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = offset[n, g * 2 * kh * kw + 2 * k, yo, xo]
                            dx = offset[n, g * 2 * kh * kw + 2 * k + 1, yo, xo]
                            py = yo - padding + i + float(dy)
                            px = xo - padding + j + float(dx)
                            cols[g * cg:(g + 1) * cg, i, j] = _bilinear_mmcv(x[n, g * cg:(g + 1) * cg], py, px)
                out[n, :, yo, xo] = (weight * cols[None]).sum(dim=(1, 2, 3))
    return out


def test_deform_conv_matches_brute_force_bilinear_sampling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 5, generator=g, dtype=torch.float64)
    offset = torch.randn(1, 2 * 2 * 9, 4, 5, generator=g, dtype=torch.float64) * 1.5  # 2 groups; some outside
    conv = DeformConv2d(4, 3, 3, padding=1, deform_groups=2).double()
    with torch.no_grad():
        conv.weight.normal_(generator=g)
    ref = _deform_conv_brute(x, offset, conv.weight.detach(), 1, 2)
    torch.testing.assert_close(conv(x, offset), ref, rtol=1e-9, atol=1e-9)
    # torchvision's kernel (what runs on accelerators): same outputs and gradients
    x.requires_grad_(True)
    offset.requires_grad_(True)
    out = conv(x, offset)
    ref_tv = deform_conv2d(x, offset, conv.weight, padding=1)
    torch.testing.assert_close(out, ref_tv, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad((out * out).sum(), (x, offset, conv.weight))
    grads_tv = torch.autograd.grad((ref_tv * ref_tv).sum(), (x, offset, conv.weight))
    for a, b in zip(grads, grads_tv):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)
    x, offset = x.detach(), offset.detach()
    # the sparse path (grid_sample at chosen locations) samples the same points
    ys, xs = torch.tensor([0, 3, 2, 1]), torch.tensor([4, 0, 2, 3])
    at = conv.forward_at(x[0], offset[0][:, ys, xs].t(), ys, xs)
    torch.testing.assert_close(at, ref[0][:, ys, xs].t(), rtol=1e-9, atol=1e-9)


def test_deform_conv_offset_order_is_dy_then_dx():
    """An offset of +1 in channel 2k moves every sample one row down (mmcv's (dy, dx) layout)."""
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    conv = DeformConv2d(2, 2, 3, padding=1, deform_groups=1).double()
    plain = F.conv2d(x, conv.weight, padding=1)
    off = torch.zeros(1, 18, 6, 7, dtype=torch.float64)
    off[:, 0::2] = 1.0  # dy: output row r is the plain conv centred on row r + 1
    taller = F.conv2d(x, conv.weight, padding=(2, 1))  # centres on rows -1 .. 6
    torch.testing.assert_close(conv(x, off), taller[:, :, 2:8])
    off = torch.zeros(1, 18, 6, 7, dtype=torch.float64)
    off[:, 1::2] = 1.0  # dx: output column c is centred on column c + 1
    wider = F.conv2d(x, conv.weight, padding=(1, 2))
    torch.testing.assert_close(conv(x, off), wider[:, :, :, 2:9])
    torch.testing.assert_close(conv(x, torch.zeros_like(off)), plain)


# ----------------------------------------------------------------------------- approx max-IoU assignment
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-6)


def _random_boxes(n, g, size=64.0):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 4
    return torch.cat([xy, xy + wh], 1)


def test_approx_max_iou_assigner_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    gen = AnchorGenerator(strides=[8], ratios=[0.5, 1.0, 2.0], scales=[2.0, 2.52, 3.17])
    approxs = gen.grid_anchors([(8, 8)], torch.device("cpu"))[0].view(-1, 9, 4)
    squares = AnchorGenerator(strides=[8], ratios=[1.0], scales=[2.0]).grid_anchors([(8, 8)], torch.device("cpu"))[0]
    gts = _random_boxes(5, g)
    gts = torch.cat([gts, gts[:1] + 0.25])  # two near-equal ground truths: tie handling
    labels = torch.arange(6)
    pos_thr, neg_thr, min_pos = 0.5, 0.3, 0.2
    res = ApproxMaxIoUAssigner(pos_iou_thr=pos_thr, neg_iou_thr=neg_thr, min_pos_iou=min_pos).assign_approx(
        squares, approxs, gts, labels
    )
    # brute force: max over approxes, then mmdet's assign_wrt_overlaps step by step
    ov = [[max(_iou(approxs[n, a].tolist(), gts[k].tolist()) for a in range(9)) for n in range(len(squares))]
          for k in range(len(gts))]
    expected = [-1] * len(squares)
    for n in range(len(squares)):
        col = [ov[k][n] for k in range(len(gts))]
        best = max(col)
        if 0 <= best < neg_thr:
            expected[n] = 0
        if best >= pos_thr:
            expected[n] = col.index(best) + 1
    for k in range(len(gts)):
        gmax = max(ov[k])
        if gmax >= min_pos:
            for n in range(len(squares)):
                if ov[k][n] == gmax:
                    expected[n] = k + 1
    assert res.gt_inds.tolist() == expected
    torch.testing.assert_close(res.max_overlaps, torch.tensor(ov).max(0).values, rtol=0, atol=1e-6)
    assert (res.gt_inds > 0).any() and (res.gt_inds == 0).any() and (res.gt_inds == -1).any()


def test_windowed_approx_overlaps_equal_the_dense_ones():
    """The head compares a ground truth only with the locations its approxes can reach."""
    g = torch.Generator().manual_seed(0)
    gen = AnchorGenerator(strides=[4, 8, 16], ratios=[0.5, 1.0, 2.0], scales=[8 * 2 ** (i / 3) for i in range(3)])
    sizes = [(24, 40), (12, 20), (6, 10)]
    xy = torch.rand(30, 2, generator=g) * torch.tensor([180.0, 110.0]) - 20  # some partly outside
    gts = torch.cat([xy, xy + torch.rand(30, 2, generator=g) ** 2 * 150 + 1], 1)
    approxs = torch.cat(gen.grid_anchors(sizes, torch.device("cpu"))).view(-1, 9, 4)
    dense = approx_overlaps(approxs, gts)
    assert torch.equal(approx_overlaps_on_grid(gts, gen, sizes), dense)


def test_approx_assigner_without_ground_truth_is_all_negative():
    sq = torch.tensor([[0.0, 0, 8, 8], [8, 8, 16, 16]])
    res = ApproxMaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).assign_approx(
        sq, sq[:, None].expand(2, 9, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    )
    assert res.gt_inds.tolist() == [0, 0]


# ----------------------------------------------------------------------------- location targets
def test_gt_levels():
    # sqrt(wh) vs anchor_scale * stride0 = 32: level floor(log2(s / 32) + 0.5), clamped
    boxes = torch.tensor([[0, 0, 32, 32], [0, 0, 45, 45], [0, 0, 46, 46], [0, 0, 64, 64], [0, 0, 8, 8], [0, 0, 2000, 900]])
    assert gt_levels(boxes.float(), 8.0, 4, 3).tolist() == [0, 0, 1, 1, 0, 2]


def test_loc_targets_hand_worked():
    """Two images, levels of stride 4 / 8 / 16 on a 128 x 128 input (32, 16, 8 cells).

    Image 0: A = (0, 0, 40, 40) goes to level 0 (sqrt(wh) = 40 -> floor(log2(40/32) + .5) = 0).
    On level 0 the box is (0, 0, 10, 10): centre region (ratio 0.4) x, y in round(4.0)..round(6.0)
    = 4..6; ignore region (ratio 0.25) round(2.5)..round(7.5) = 2..8 (half to even).  Level 1
    (adjacent): box (0, 0, 5, 5), ignore round(1.25)..round(3.75) = 1..4.
    B = (64, 0, 128, 64) goes to level 1 (sqrt = 64).  Level 1 box (8, 0, 16, 8): centre
    x 11..13 (round 11.2, 12.8), y 3..5; ignore x 10..14, y 2..6.  Adjacent level 0: box
    (16, 0, 32, 16) -> ignore x 20..28, y 4..12; level 2: box (4, 0, 8, 4) -> ignore x 5..7, y 1..3.
    Image 1: A, then C = (16, 16, 56, 56) at level 0 (box (4, 4, 14, 14)): ignore round(6.5) = 6 ..
    round(11.5) = 12, centre 8..10.  C's ignore region zeroes the weight of A's centre cell
    (6, 6) while its target stays 1 (mmdet's order).  Everything unlabelled: weight 0.1.
    """
    feat = [(32, 32), (16, 16), (8, 8)]
    gts = [torch.tensor([[0.0, 0, 40, 40], [64, 0, 128, 64]]), torch.tensor([[0.0, 0, 40, 40], [16, 16, 56, 56]])]
    targets, weights, avg = ga_loc_targets(gts, feat, [4, 8, 16], anchor_scale=8.0, center_ratio=0.2, ignore_ratio=0.5)
    assert avg == 2 * (32 * 32 + 16 * 16 + 8 * 8) / 200

    def blank(i):
        h, w = feat[i]
        return torch.zeros(2, 1, h, w), torch.full((2, 1, h, w), 0.1)

    t0, w0 = blank(0)
    t1, w1 = blank(1)
    t2, w2 = blank(2)
    # image 0
    w0[0, 0, 2:9, 2:9] = 0
    w0[0, 0, 4:7, 4:7] = 1
    t0[0, 0, 4:7, 4:7] = 1
    w1[0, 0, 1:5, 1:5] = 0  # A's ignore region on the adjacent level
    w1[0, 0, 2:7, 10:15] = 0
    w1[0, 0, 3:6, 11:14] = 1
    t1[0, 0, 3:6, 11:14] = 1
    w0[0, 0, 4:13, 20:29] = 0  # B's ignore regions on levels 0 and 2
    w2[0, 0, 1:4, 5:8] = 0
    # image 1
    t0[1, 0, 4:7, 4:7] = 1
    w0[1, 0, 2:9, 2:9] = 0
    w0[1, 0, 4:7, 4:7] = 1
    w0[1, 0, 6:13, 6:13] = 0  # C's ignore region, over A's centre cell (6, 6)
    w0[1, 0, 8:11, 8:11] = 1
    t0[1, 0, 8:11, 8:11] = 1
    w1[1, 0, 1:5, 1:5] = 0  # A on level 1
    w1[1, 0, 3:7, 3:7] = 0  # C on level 1: box (2, 2, 7, 7) -> round(3.25)..round(5.75) = 3..6
    for got, exp in zip(targets, (t0, t1, t2)):
        torch.testing.assert_close(got, exp)
    for got, exp in zip(weights, (w0, w1, w2)):
        torch.testing.assert_close(got, exp)
    assert targets[0][1, 0, 6, 6] == 1 and weights[0][1, 0, 6, 6] == 0


def test_loc_targets_without_ground_truth():
    targets, weights, _ = ga_loc_targets([torch.zeros(0, 4)], [(4, 4)], [8], anchor_scale=8.0)
    assert targets[0].sum() == 0 and torch.all(weights[0] == 0.1)


# ----------------------------------------------------------------------------- losses
def test_bounded_iou_loss_matches_definition():
    pred = torch.tensor([[0.0, 5.0, 20.0, 15.0]], requires_grad=True)  # centre (10, 10), 20 x 10
    target = torch.tensor([[4.0, 4.0, 20.0, 18.0]])  # centre (12, 11), 16 x 14
    eps, beta = 1e-3, 0.2
    # bounds on IoU (Tychsen-Smith & Petersson): shift -> (w - 2|d|) / (w + 2|d|), size -> min ratio
    terms = [
        1 - max((16 - 2 * 2) / (16 + 2 * 2 + eps), 0.0),
        1 - max((14 - 2 * 1) / (14 + 2 * 1 + eps), 0.0),
        1 - min(16 / (20 + eps), 20 / (16 + eps)),
        1 - min(14 / (10 + eps), 10 / (14 + eps)),
    ]
    expected = [0.5 * t * t / beta if t < beta else t - 0.5 * beta for t in terms]
    got = bounded_iou_loss(pred, target, beta=beta, eps=eps)
    torch.testing.assert_close(got, torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    got.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # far apart: the shift bound is 0, the loss term saturates at 1 - beta / 2
    far = bounded_iou_loss(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[100.0, 100, 110, 110]]))
    torch.testing.assert_close(far[0, :2], torch.tensor([0.9, 0.9]))


def test_focal_loss_definition():
    x = torch.tensor([-2.0, 0.5, 3.0])
    t = torch.tensor([0.0, 1.0, 1.0])
    p = torch.sigmoid(x)
    pt = torch.where(t > 0, p, 1 - p)
    at = torch.where(t > 0, torch.tensor(0.25), torch.tensor(0.75))
    torch.testing.assert_close(focal_loss(x, t, 0.25, 2.0), -at * (1 - pt) ** 2 * torch.log(pt))


# ----------------------------------------------------------------------------- the head
def _head(**kw) -> GARPNHead:
    strides = [4, 8]
    scales = [8.0 * 2 ** (i / 3) for i in range(3)]
    return GARPNHead(
        in_channels=8,
        feat_channels=8,
        approx_generator=AnchorGenerator(strides=strides, ratios=[0.5, 1.0, 2.0], scales=scales),
        square_generator=AnchorGenerator(strides=strides, ratios=[1.0], scales=[8.0]),
        anchor_coder=DeltaXYWHCoder(stds=(0.07, 0.07, 0.14, 0.14), wh_clamp=wh_ratio_clamp(1e-6)),
        bbox_coder=DeltaXYWHCoder(stds=(0.07, 0.07, 0.11, 0.11)),
        assigner=MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3),
        sampler=RandomSampler(num=256, pos_fraction=0.5, add_gt_as_proposals=False),
        ga_assigner=ApproxMaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3),
        ga_sampler=RandomSampler(num=256, pos_fraction=0.5, add_gt_as_proposals=False),
        deform_groups=4,
        **kw,
    )


def test_guided_anchor_decoding():
    head = _head()
    squares = head.square_generator.grid_anchors([(2, 3)], torch.device("cpu"))[0]
    # square at cell (y=1, x=2) of stride 4: centre (8, 4), side 32
    torch.testing.assert_close(squares[5], torch.tensor([-8.0, -12.0, 24.0, 20.0]))
    shape = torch.tensor([[1.0, -2.0], [1000.0, 0.0]])
    anchors = head.guided_anchors(squares[[5, 5]], shape)
    w, h = 32 * math.exp(0.14 * 1.0), 32 * math.exp(-0.14 * 2.0)
    torch.testing.assert_close(anchors[0], torch.tensor([8 - w / 2, 4 - h / 2, 8 + w / 2, 4 + h / 2]))
    # |dw| is clamped to |log 1e-6| (wh_ratio_clip) after the std; anchors are not clipped to any image
    big = 32 * math.exp(abs(math.log(1e-6)))
    torch.testing.assert_close(anchors[1], torch.tensor([8 - big / 2, -12.0, 8 + big / 2, 20.0]), rtol=1e-5, atol=0)


def _outputs(head, seed=0, size=(2, 8, 16, 20), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(*size, generator=g), torch.randn(size[0], size[1], size[2] // 2, size[3] // 2, generator=g)]
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3, generator=g)
        head.conv_loc.bias.fill_(-0.3)  # about half of the locations pass the filter
    return [f.to(dtype) for f in feats]


def test_masked_heads_equal_dense_where_the_mask_is_on():
    # float64: the masked path samples with grid_sample, the dense one with torchvision's kernel
    head = _head(loc_filter_thr=0.4).double().eval()
    feats = _outputs(head, dtype=torch.float64)
    logits, rest = head(feats)
    assert rest.masks is not None
    total = sum(int(m.sum()) for m in rest.masks)
    assert 0 < total < sum(m.numel() for m in rest.masks)
    for lvl, f in enumerate(feats):
        t = F.relu(head.rpn_conv(f))
        a = head.feature_adaption(t, head.conv_shape(t))
        dense_cls, dense_reg = head.conv_cls(a), head.conv_reg(a)
        mask = torch.sigmoid(head.conv_loc(t))[:, 0] >= 0.4
        torch.testing.assert_close(rest.masks[lvl], mask)
        m = mask[:, None]
        zero = torch.zeros_like(dense_cls)
        torch.testing.assert_close(logits[lvl], torch.where(m, dense_cls, zero), rtol=1e-10, atol=1e-12)
        zero = torch.zeros_like(dense_reg)
        torch.testing.assert_close(rest.deltas[lvl], torch.where(m, dense_reg, zero), rtol=1e-10, atol=1e-12)
    # the proposals only read the masked locations: dense outputs give the same proposals
    settings = ProposalSettings(50, 60, 0.7)
    dense_logits, dense_rest = [], GAOutputs([], rest.shapes, rest.locs, None)
    for f in feats:
        t = F.relu(head.rpn_conv(f))
        a = head.feature_adaption(t, head.conv_shape(t))
        dense_logits.append(head.conv_cls(a))
        dense_rest.deltas.append(head.conv_reg(a))
    sizes = [(64, 80), (60, 70)]
    b1, s1 = head.proposals(logits, rest, sizes, settings)
    b2, s2 = head.proposals(dense_logits, dense_rest, sizes, settings)
    for x, y in zip(b1 + s1, b2 + s2):
        torch.testing.assert_close(x, y)


def _reference_proposals(head, logits, rest, size, settings, use_filter=True):
    """mmdet's ``GARPNHead._predict_by_feat_single``, level by level with plain NMS."""
    from torchvision.ops import nms

    feat_sizes = [tuple(x.shape[-2:]) for x in logits]
    squares = head.square_generator.grid_anchors(feat_sizes, torch.device("cpu"))
    props = []
    for lvl in range(len(logits)):
        mask = (rest.locs[lvl][0, 0].sigmoid() >= head.loc_filter_thr).reshape(-1) if use_filter else None
        sq = squares[lvl]
        shape = rest.shapes[lvl][0].permute(1, 2, 0).reshape(-1, 2)
        scores = logits[lvl][0].permute(1, 2, 0).reshape(-1).sigmoid()
        d = rest.deltas[lvl][0].permute(1, 2, 0).reshape(-1, 4)
        if mask is not None:
            if mask.sum() == 0:
                continue
            sq, shape, scores, d = sq[mask], shape[mask], scores[mask], d[mask]
        deltas = torch.cat([torch.zeros_like(shape), shape], 1)
        anchors = head.anchor_coder.decode(sq, deltas)
        if scores.numel() > settings.pre_nms:
            _, top = scores.topk(settings.pre_nms)
            anchors, d, scores = anchors[top], d[top], scores[top]
        boxes = head.bbox_coder.decode(anchors, d, max_shape=size)
        ok = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, settings.nms_iou)[: head.nms_post]
        props.append(torch.cat([boxes[keep], scores[keep, None]], 1))
    props = torch.cat(props)
    _, top = props[:, 4].topk(min(settings.post_nms, props.shape[0]))
    return props[top]


@pytest.mark.parametrize("nms_post", [1000, 7])
def test_proposals_match_mmdet_reference(nms_post):
    head = _head(loc_filter_thr=0.4, nms_post=nms_post).eval()
    feats = _outputs(head, seed=1, size=(1, 8, 16, 20))
    logits, rest = head(feats)
    settings = ProposalSettings(pre_nms=120, post_nms=40, nms_iou=0.6)
    boxes, scores = head.proposals(logits, rest, [(60, 76)], settings)
    ref = _reference_proposals(head, logits, rest, (60, 76), settings)
    torch.testing.assert_close(boxes[0], ref[:, :4])
    torch.testing.assert_close(scores[0], ref[:, 4])
    # in training mode there is no location filter (mmdet: use_loc_filter = not self.training)
    head.train()
    logits, rest = head(feats)
    boxes, _ = head.proposals(logits, rest, [(60, 76)], settings)
    ref = _reference_proposals(head, logits, rest, (60, 76), settings, use_filter=False)
    torch.testing.assert_close(boxes[0], ref[:, :4])


def test_loss_terms_and_loc_loss_modes():
    head = _head().train()
    feats = _outputs(head, seed=2, size=(2, 8, 16, 16))
    logits, rest = head(feats)
    gts = [torch.tensor([[4.0, 4.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]]), torch.zeros(0, 4)]
    sizes = [(64, 64), (56, 64)]
    losses = head.loss(logits, rest, sizes, gts, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_anchor_shape", "loss_anchor_loc"}
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    assert losses["loss_anchor_shape"] > 0 and losses["loss_rpn_bbox"] > 0
    # location loss by its definition, in both modes
    t, w, avg = ga_loc_targets(gts, [(16, 16), (8, 8)], [4, 8], anchor_scale=8.0)
    eps = torch.finfo(torch.float32).eps
    paper = sum((focal_loss(l.reshape(-1), tt.reshape(-1)) * ww.reshape(-1)).sum() for l, tt, ww in zip(rest.locs, t, w))
    inverted = sum((focal_loss(l.reshape(-1), 1 - tt.reshape(-1)) * ww.reshape(-1)).sum() for l, tt, ww in zip(rest.locs, t, w))
    torch.testing.assert_close(losses["loss_anchor_loc"], paper / (avg + eps))
    head.loc_loss_mode = "mmdet"
    losses = head.loss(logits, rest, sizes, gts, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses["loss_anchor_loc"], inverted / (avg + eps))
    # objectness / regression see the shape prediction only through the offsets and the guided
    # anchors, both detached: no gradient reaches conv_shape from them
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward(retain_graph=True)
    assert head.conv_shape.weight.grad is None
    assert head.feature_adaption.conv_offset.weight.grad.abs().sum() > 0
    assert head.feature_adaption.conv_adaption.weight.grad.abs().sum() > 0
    losses["loss_anchor_shape"].backward()
    assert head.conv_shape.weight.grad.abs().sum() > 0
