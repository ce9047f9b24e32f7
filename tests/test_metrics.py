"""Metric conventions (methods.md §6, stunet.md §4.4) checked on hand-computed cases, not by calling sklearn/medpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from tpp_monai.metrics import (
    HD95_ONE_EMPTY,
    ClassificationMetric,
    ClassificationMetricHandler,
    OrganTumourHandler,
    OrganTumourMetric,
    SegmentationMetric,
    SegMetricHandler,
    as_percent,
    classification_metrics,
    dice_score,
    hd95,
    merge_per_item,
    model_selection_score,
    organ_tumour_dice,
    organ_tumour_metrics,
    segmentation_metrics,
)

# ------------------------------------------------------------------ classification

# 3-class example (unbalanced, so OvO differs from OvR); argmax = [0, 0, 1, 0, 2, 1, 2]
PROBS3 = np.array(
    [
        [0.60, 0.30, 0.10],  # y 0
        [0.45, 0.35, 0.20],  # y 0
        [0.30, 0.50, 0.20],  # y 1
        [0.50, 0.20, 0.30],  # y 1
        [0.20, 0.30, 0.50],  # y 2
        [0.10, 0.60, 0.30],  # y 2
        [0.35, 0.15, 0.50],  # y 2
    ]
)
LABELS3 = np.array([0, 0, 1, 1, 2, 2, 2])
# OvO AUC by counting concordant pairs (ties count 1/2) within each class pair, both directions, then the mean:
#   (0,1): col0 pos {.6,.45} vs neg {.3,.5}        -> 3/4;  col1 pos {.5,.2} vs neg {.3,.35}  -> 2/4;    pair 5/8
#   (0,2): col0 pos {.6,.45} vs neg {.2,.1,.35}    -> 6/6;  col2 pos {.5,.3,.5} vs neg {.1,.2} -> 6/6;   pair 1
#   (1,2): col1 pos {.5,.2} vs neg {.3,.6,.15}     -> 3/6;  col2 pos {.5,.3,.5} vs neg {.2,.3} -> 5.5/6; pair 17/24
AUC3 = (5 / 8 + 1 + 17 / 24) / 3  # = 7/9; one-vs-rest would give (9/10 + 5/10 + 11.5/12) / 3 instead
ACC3 = 5 / 7  # correct: samples 0, 1, 2, 4, 6
# per-class F1 from (TP, FP, FN): class 0 (2, 1, 0) -> 0.8; class 1 (1, 1, 1) -> 0.5; class 2 (2, 0, 1) -> 0.8
F1_3 = (0.8 + 0.5 + 0.8) / 3  # micro F1 would be 5/7

# binary example: positive-class probabilities; the 0.35 negative ties the 0.35 positive
P1 = np.array([0.10, 0.35, 0.35, 0.80, 0.70, 0.90])
Y2 = np.array([0, 0, 1, 1, 0, 1])
# positives {.35, .8, .9} vs negatives {.1, .35, .7}: .35 beats .1 and ties .35 (1.5); .8 and .9 beat all (3 + 3)
AUC2 = 7.5 / 9
# argmax (p1 > 0.5) = [0, 0, 0, 1, 1, 1]: correct 0, 1, 3, 5; F1 per class: (TP, FP, FN) = (2, 1, 1) both -> 2/3
ACC2, F1_2 = 4 / 6, 2 / 3


def test_multiclass_ovo_auc_acc_f1_by_hand():
    m = classification_metrics(PROBS3, LABELS3)
    assert m["acc"] == pytest.approx(ACC3)
    assert m["auc"] == pytest.approx(AUC3)
    assert m["f1"] == pytest.approx(F1_3)
    assert model_selection_score(m) == pytest.approx(ACC3 + AUC3 + F1_3)
    # tensors and one-hot labels give the same
    onehot = np.eye(3)[LABELS3]
    assert classification_metrics(torch.tensor(PROBS3), torch.tensor(onehot)) == pytest.approx(m)


def test_binary_auc_uses_positive_column_and_counts_ties_half():
    two_col = np.stack([1 - P1, P1], axis=1)
    m = classification_metrics(two_col, Y2)
    assert m == pytest.approx({"acc": ACC2, "auc": AUC2, "f1": F1_2})
    # a single sigmoid column is read as P(positive)
    assert classification_metrics(P1[:, None], Y2) == pytest.approx(m)


def test_single_class_labels_give_nan_auc_with_warning():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    with pytest.warns(RuntimeWarning, match="AUC is undefined"):
        m = classification_metrics(probs, [0, 0, 0])
    assert math.isnan(m["auc"])
    assert m["acc"] == pytest.approx(2 / 3)
    # labels contain only class 0; predictions {0, 1}: F1 class 0 = 2*2/(2*2+0+1) = 0.8, class 1 = 0 -> macro 0.4
    assert m["f1"] == pytest.approx(0.4)
    assert math.isnan(model_selection_score(m))


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="softmax"):
        classification_metrics(PROBS3 * 3, LABELS3)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(PROBS3, [0, 1, 2, 3, 0, 1])


def test_as_percent_keeps_hd95():
    assert as_percent({"dice": 0.8, "hd95": 3.0, "per_image": []}) == {"dice": 80.0, "hd95": 3.0, "per_image": []}


# ------------------------------------------------------------------ Dice / HD95


def _square(shape, r0, c0, size):
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def test_dice_hand_values_and_empty_rules():
    p = np.zeros((5, 5), bool)
    g = np.zeros((5, 5), bool)
    p[0, :4] = True  # 4 pixels
    g[0, 1:5] = True
    g[1, :2] = True  # 6 pixels, 3 shared with p
    assert dice_score(p, g) == pytest.approx(2 * 3 / (4 + 6))
    assert dice_score(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert dice_score(p, np.zeros_like(g)) == 0.0


def test_hd95_empty_rules():
    empty = np.zeros((8, 8), bool)
    full = _square((8, 8), 2, 2, 3)
    assert hd95(empty, empty) == 0.0
    assert hd95(full, empty) == HD95_ONE_EMPTY == 500.0
    assert hd95(empty, full) == 500.0


def test_hd95_squares_offset_by_k():
    # 10x10 squares, G shifted right by 3. Directed distances P->G by hand (G->P mirrors them):
    #   top/bottom rows: 3, 2, 1 then 0 x7 each; left column interior (8 px): 3 each;
    #   right column interior rows 11..18: min(r-10, 19-r, 3) = 1, 2, 3, 3, 3, 3, 2, 1.
    # Union of 72 values: 28 zeros, 8 ones, 8 twos, 28 threes -> 95th pct at sorted index 67.45 -> 3.
    p = _square((30, 30), 10, 10, 10)
    g = _square((30, 30), 10, 13, 10)
    assert hd95(p, g) == pytest.approx(3.0)
    assert hd95(g, p) == pytest.approx(3.0)
    assert hd95(p, p) == 0.0


def test_hd95_pixel_vs_line_is_percentile_of_union_not_max_of_directed():
    line = np.zeros((20, 20), bool)
    line[10, :10] = True  # a 1-pixel-thick line is all surface
    on_end = np.zeros_like(line)
    on_end[10, 0] = True
    # P->G {0}; G->P {0, 1, ..., 9}; union of 11 values sorted, index 0.95*10 = 9.5 -> (8 + 9) / 2.
    # (MONAI's HausdorffDistanceMetric would give max(0, pct95{0..9}) = 8.55.)
    assert hd95(on_end, line) == pytest.approx(8.5)
    off = np.zeros_like(line)
    off[13, 0] = True  # 3 rows below the line's first pixel
    # P->G {3}; G->P {sqrt(9 + c^2), c = 0..9}; the two largest of the 11 are sqrt(73), sqrt(90)
    assert hd95(off, line) == pytest.approx((math.sqrt(73) + math.sqrt(90)) / 2)
    # anisotropic spacing (rows 2, cols 1): P->G {6}; G->P {sqrt(36 + c^2)}; top two sqrt(100), sqrt(117)
    assert hd95(off, line, spacing=(2.0, 1.0)) == pytest.approx((10 + math.sqrt(117)) / 2)


def _brute_hd95(p: np.ndarray, g: np.ndarray, spacing) -> float:
    """Independent medpy-style HD95: 4/6-neighbour surface test on a zero-padded copy, then all-pairs distances."""

    def surface_points(m):
        pad = np.pad(m, 1)
        interior = pad.copy()
        for ax in range(m.ndim):
            interior &= np.roll(pad, 1, axis=ax) & np.roll(pad, -1, axis=ax)
        surf = (pad & ~interior)[tuple(slice(1, -1) for _ in range(m.ndim))]
        return np.argwhere(surf) * np.asarray(spacing, dtype=float)

    sp, sg = surface_points(p), surface_points(g)
    d = cdist(sp, sg)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


@pytest.mark.parametrize("shape,spacing", [((32, 32), (1.0, 1.0)), ((10, 16, 14), (1.5, 0.8, 0.8))])
def test_hd95_matches_brute_force_on_random_blobs(shape, spacing):
    rng = np.random.default_rng(0)
    for _ in range(4):
        # smooth blobs with thick interiors (so the erosion's connectivity matters), touching the array border
        p = gaussian_filter(rng.random(shape), 1.5) > 0.5
        g = gaussian_filter(rng.random(shape), 1.5) > 0.52
        p[0] = True
        assert p.any() and g.any()
        assert hd95(p, g, spacing) == pytest.approx(_brute_hd95(p, g, spacing))


def test_segmentation_metrics_average_over_images_not_pooled():
    p1 = _square((30, 30), 10, 10, 10)
    g1 = _square((30, 30), 10, 13, 10)  # Dice 2*70/200 = 0.7, HD95 3
    empty = np.zeros((30, 30), bool)  # image 2: both empty -> Dice 1, HD95 0
    p3 = _square((30, 30), 0, 0, 2)  # image 3: GT empty -> Dice 0, HD95 500
    m = segmentation_metrics([p1, empty, p3], [g1, empty, empty])
    assert m["dice"] == pytest.approx((0.7 + 1.0 + 0.0) / 3)  # pooled would be 2*70/(104+100)
    assert m["hd95"] == pytest.approx((3.0 + 0.0 + 500.0) / 3)
    assert [r["dice"] for r in m["per_image"]] == pytest.approx([0.7, 1.0, 0.0])
    assert [r["index"] for r in m["per_image"]] == [0, 1, 2]


# ------------------------------------------------------------------ organ / tumour


def _ot_cases():
    """Three 4x4x4 label maps (0 bg, 1 organ, 2 tumour) with hand-computed Dice values."""
    # case A: GT organ = plane z=0 (16 vx) with tumour at (0,0,0), (0,0,1)
    gt_a = np.zeros((4, 4, 4), int)
    gt_a[0] = 1
    gt_a[0, 0, 0] = gt_a[0, 0, 1] = 2
    # pred organ = rows 0..2 of z=0 (12 vx) + one false positive at (1,3,3); tumour at (0,0,0), (0,1,0)
    pr_a = np.zeros((4, 4, 4), int)
    pr_a[0, :3] = 1
    pr_a[1, 3, 3] = 1
    pr_a[0, 0, 0] = pr_a[0, 1, 0] = 2
    # organ(>=1): |P|=13, |G|=16, |P∩G|=12 -> 24/29; tumour: 1 shared of 2+2 -> 0.5
    # label==1: |P|=11, |G|=14, shared = 12 - 3 (the three tumour voxels of either) = 9 -> 18/25
    exp_a = {"organ": 24 / 29, "tumour": 0.5, "mean": (24 / 29 + 0.5) / 2, "organ_label1": 18 / 25}
    # case B: no tumour anywhere, perfect organ -> tumour empty/empty = 1
    gt_b = np.zeros((4, 4, 4), int)
    gt_b[0] = 1
    exp_b = {"organ": 1.0, "tumour": 1.0, "mean": 1.0, "organ_label1": 1.0}
    # case C: GT has no tumour, prediction marks one organ voxel as tumour -> tumour 0, label==1 Dice 2*15/31
    pr_c = gt_b.copy()
    pr_c[0, 0, 0] = 2
    exp_c = {"organ": 1.0, "tumour": 0.0, "mean": 0.5, "organ_label1": 30 / 31}
    return [pr_a, gt_b.copy(), pr_c], [gt_a, gt_b, gt_b.copy()], [exp_a, exp_b, exp_c]


def test_organ_tumour_dice_per_case_and_aggregate():
    preds, gts, exps = _ot_cases()
    for p, g, e in zip(preds, gts, exps):
        assert organ_tumour_dice(p, g) == pytest.approx(e)
    agg = organ_tumour_metrics(preds, gts)
    for k in ("organ", "tumour", "mean", "organ_label1"):
        assert agg[k] == pytest.approx(np.mean([e[k] for e in exps]))
    assert agg["mean"] == pytest.approx((agg["organ"] + agg["tumour"]) / 2)
    assert len(agg["per_case"]) == 3


# ------------------------------------------------------------------ MONAI metric classes and handlers


def _run_evaluator(items, metrics: dict, batch_size: int) -> SupervisedEvaluator:
    """Identity network: pred = image, so the handlers see exactly the data given."""
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(items, batch_size=batch_size),
        network=torch.nn.Identity(),
        key_val_metric={k: metrics[k] for k in list(metrics)[:1]},
        additional_metrics={k: metrics[k] for k in list(metrics)[1:]},
    )
    evaluator.run()
    return evaluator


def test_classification_handlers_in_supervised_evaluator():
    items = [{"image": torch.tensor(p, dtype=torch.float32), "label": int(y)} for p, y in zip(PROBS3, LABELS3)]
    handlers = {f"val_{k}": ClassificationMetricHandler(key=k) for k in ("score", "acc", "auc", "f1")}
    ev = _run_evaluator(items, handlers, batch_size=4)  # batches of 4 and 3
    m = ev.state.metrics
    assert m["val_acc"] == pytest.approx(ACC3)
    assert m["val_auc"] == pytest.approx(AUC3)
    assert m["val_f1"] == pytest.approx(F1_3)
    assert m["val_score"] == pytest.approx(ACC3 + AUC3 + F1_3)
    rows = handlers["val_acc"].metric_fn.per_item()
    assert [r["correct"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["pred"] for r in rows] == [0, 0, 1, 0, 2, 1, 2]


def test_classification_metric_list_and_batch_inputs_softmax_and_reset():
    metric = ClassificationMetric(key=None)
    probs = torch.tensor(PROBS3)
    metric([probs[i] for i in range(3)], [torch.tensor(y) for y in LABELS3[:3]])  # decollated items
    metric(probs[3:], torch.tensor(LABELS3[3:]))  # a batch-first tensor works too
    assert metric.aggregate() == pytest.approx({"acc": ACC3, "auc": AUC3, "f1": F1_3, "score": ACC3 + AUC3 + F1_3})
    # softmax=True takes logits; the exact 0.3/0.3 tie in AUC3 does not survive log/exp, so compare with the function
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-1.0, 1.0, 0.0], [0.0, -0.5, 2.0]])
    with_softmax = ClassificationMetric(key="acc", softmax=True)
    with_softmax(list(logits), [torch.tensor(y) for y in (0, 2, 1, 2)])
    assert with_softmax.aggregate() == pytest.approx(3 / 4)
    with_softmax.key = None
    ref = classification_metrics(torch.softmax(logits, dim=1), [0, 2, 1, 2])
    assert with_softmax.aggregate() == pytest.approx(ref | {"score": model_selection_score(ref)})
    metric.reset()
    assert metric.per_item() == []
    with pytest.raises(ValueError, match="no data"):
        metric.aggregate()


def test_seg_handlers_in_supervised_evaluator_match_plain_functions():
    empty = np.zeros((30, 30), bool)
    preds = [_square((30, 30), 10, 10, 10), empty, _square((30, 30), 0, 0, 2), _square((30, 30), 5, 5, 6)]
    gts = [_square((30, 30), 10, 13, 10), empty, empty, _square((30, 30), 6, 4, 7)]
    items = [
        {
            "image": MetaTensor(torch.tensor(p[None], dtype=torch.float32), meta={"filename_or_obj": f"img{i}.png"}),
            "label": MetaTensor(torch.tensor(g[None], dtype=torch.float32), meta={"filename_or_obj": f"img{i}.png"}),
        }
        for i, (p, g) in enumerate(zip(preds, gts))
    ]
    handlers = {"val_dice": SegMetricHandler(key="dice"), "val_hd95": SegMetricHandler(key="hd95")}
    ev = _run_evaluator(items, handlers, batch_size=3)
    plain = segmentation_metrics(preds, gts)
    assert ev.state.metrics["val_dice"] == pytest.approx(plain["dice"])
    assert ev.state.metrics["val_hd95"] == pytest.approx(plain["hd95"])
    assert tuple(ev.state.metric_details["val_hd95"].shape) == (4, 1)
    # the dice handler computes only Dice (no HD95 work)
    assert handlers["val_dice"].metric_fn.columns == ("dice",)
    rows = merge_per_item(handlers["val_dice"], handlers["val_hd95"])
    assert [r["name"] for r in rows] == [f"img{i}.png" for i in range(4)]
    assert [r["dice"] for r in rows] == pytest.approx([r["dice"] for r in plain["per_image"]])
    assert [r["hd95"] for r in rows] == pytest.approx([r["hd95"] for r in plain["per_image"]])


def test_segmentation_metric_two_channel_and_probability_inputs():
    p = _square((16, 16), 2, 2, 6)
    g = _square((16, 16), 3, 3, 6)
    metric = SegmentationMetric(key=None)
    prob = torch.tensor(p[None], dtype=torch.float32) * 0.8 + 0.1  # sigmoid-like map, > 0.5 inside the square
    onehot = torch.stack([torch.tensor(~g), torch.tensor(g)]).float()  # [2, H, W]
    metric([prob], [onehot])
    assert metric.aggregate() == pytest.approx({"dice": dice_score(p, g), "hd95": hd95(p, g)})


def test_organ_tumour_handler_and_metric():
    preds, gts, exps = _ot_cases()
    items = [
        {"image": torch.tensor(p[None], dtype=torch.float32), "label": torch.tensor(g[None], dtype=torch.float32)}
        for p, g in zip(preds, gts)
    ]
    handlers = {f"val_{k}": OrganTumourHandler(key=k) for k in ("mean", "organ", "tumour", "organ_label1")}
    ev = _run_evaluator(items, handlers, batch_size=2)
    for k in ("mean", "organ", "tumour", "organ_label1"):
        assert ev.state.metrics[f"val_{k}"] == pytest.approx(np.mean([e[k] for e in exps]))
    assert tuple(ev.state.metric_details["val_mean"].shape) == (3, 4)
    # one-hot [3, D, H, W] predictions are argmaxed
    metric = OrganTumourMetric(key=None)
    onehot = [torch.nn.functional.one_hot(torch.tensor(p), 3).permute(3, 0, 1, 2).float() for p in preds]
    metric(onehot, [torch.tensor(g[None]) for g in gts])
    plain = organ_tumour_metrics(preds, gts)
    assert metric.aggregate() == pytest.approx({k: plain[k] for k in ("organ", "tumour", "mean", "organ_label1")})
    rows = metric.per_item()
    assert [r["tumour"] for r in rows] == pytest.approx([e["tumour"] for e in exps])


def test_handlers_instantiate_from_bundle_config_and_reject_unknown_keys():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "seg": {"_target_": "tpp_monai.metrics.SegMetricHandler", "key": "hd95"},
            "cls": {"_target_": "tpp_monai.metrics.ClassificationMetricHandler", "key": "auc"},
        }
    )
    assert isinstance(parser.get_parsed_content("seg").metric_fn, SegmentationMetric)
    assert parser.get_parsed_content("cls").metric_fn.key == "auc"
    with pytest.raises(ValueError, match="unknown metric key"):
        SegMetricHandler(key="hd")
    with pytest.raises(ValueError, match="unknown metric key"):
        ClassificationMetricHandler(key=None)  # type: ignore[arg-type]
