"""Detection post-processing in numpy: confidence filter and class-aware non-maximum suppression.

``nms`` is the plain greedy algorithm (YOLOv5's, one numpy pass per kept box): the reference.
``class_nms`` keeps exactly the boxes ``nms`` keeps on class-offset boxes, in the same order (the
IoUs come from the same float32 operations on the same offset coordinates, so every decision is the
same), and is several times faster on thousands of candidates (evaluation thresholds):

- it stops at ``max_det`` kept boxes;
- it settles up to 64 boxes per numpy pass: the next 64 candidates' pairwise IoUs, greedy among
  them on 64-bit masks in Python ints, then one pass of the kept ones against all later boxes;
- past ``_PER_CLASS`` candidates it works per class (only same-class pairs are computed): small
  classes all at once from one pairwise pass, large ones by the 64-box steps, merged best first
  through heaps. Only where the offset coordinates prove that no two classes can overlap.

benchmarks/detect_pipeline.py measures it against the plain loop, OpenCV's ``NMSBoxesBatched``
and torchvision's ``batched_nms`` on YOLOv5n's real outputs.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

#: YOLOv5's class offset: boxes of class c move by c * MAX_WH so that classes never overlap.
MAX_WH = 7680.0
_EMPTY = np.zeros((0, 6), np.float32)
#: Up to this many candidates the plain loop is fastest (measured on YOLOv5n outputs).
_FEW = 32
#: Past this many candidates, working class by class pays for its set-up.
_PER_CLASS = 4096
#: Classes of at most this many candidates are settled together from one pairwise IoU pass.
_SMALL = 64
#: Boxes settled per numpy pass (at most 64: one 64-bit mask per box).
_HEADS = 64


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    half = boxes[:, 2:4] / 2
    out[:, :2] = boxes[:, :2] - half
    out[:, 2:] = boxes[:, :2] + half
    return out


def rank_order(scores: np.ndarray) -> np.ndarray:
    """``np.argsort(-scores, kind="stable")``: highest score first, ties by index. For float32
    scores without NaN, one unstable (SIMD) sort of unique 64-bit keys, score bits above the index,
    which is several times faster than numpy's stable sort of floats and gives the same order."""
    if scores.dtype != np.float32 or not 64 <= len(scores) < 1 << 32 or np.isnan(scores).any():
        return np.argsort(-scores, kind="stable")
    bits = (scores + np.float32(0)).view(np.uint32)  # + 0 makes -0.0 the +0.0 it ties with
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))  # float order as uints
    keys = (~ascending).astype(np.uint64) << np.uint64(32) | np.arange(len(scores), dtype=np.uint64)
    order: np.ndarray = (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return order


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_det: int | None = None
) -> np.ndarray:
    """Indices kept by greedy NMS over xyxy ``boxes``, highest score first (ties: lower index first).

    ``max_det`` stops after that many are kept: the same as slicing the full answer."""
    order = rank_order(scores)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep: list[int] = []
    limit = len(order) if max_det is None else max_det
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _by_class(order: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``order`` regrouped by class, keeping its order within each class (a stable sort; a radix
    sort where the classes are small integers)."""
    ranked = classes[order]
    with np.errstate(invalid="ignore"):  # NaN or huge classes: not small integers, sorted as they are
        small = ranked.astype(np.int16)
    grouped: np.ndarray = order[np.argsort(small if np.array_equal(small, ranked) else ranked, kind="stable")]
    return grouped


def _classes_apart(offset: np.ndarray, grouped: np.ndarray, starts: np.ndarray, iou_threshold: float) -> bool:
    """Whether no two boxes of different classes can overlap after the class offset, checked on the
    offset coordinates themselves: on one axis, every class ends before the next classes begin
    (then their intersection is <= 0 in any rounding, their IoU is 0 and never above a threshold
    >= 0). False for NaN or infinite coordinates, or boxes wider than the offset."""
    if not iou_threshold >= 0 or not np.isfinite(offset).all():
        return False
    for axis in (0, 1):
        low = np.minimum.reduceat(offset[grouped, axis], starts)
        high = np.maximum.reduceat(offset[grouped, axis + 2], starts)
        if (np.maximum.accumulate(high)[:-1] <= np.minimum.accumulate(low[::-1])[::-1][1:]).all():
            return True
    return False


def class_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
    max_det: int | None = None,
    max_wh: float = MAX_WH,
) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, highest score first: exactly
    ``nms(boxes + classes[:, None] * max_wh, scores, iou_threshold)[:max_det]``.

    Class by class only where the offset coordinates prove classes apart (not for boxes wider
    than ``max_wh``, non-finite coordinates or a negative threshold): all boxes together otherwise."""
    n = len(scores)
    limit = n if max_det is None else min(max_det, n)
    if limit <= 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(boxes.dtype, np.floating):
        boxes = boxes.astype(np.float64)  # what integer boxes plus float offsets become anyway
    offset = boxes + classes[:, None].astype(boxes.dtype) * boxes.dtype.type(max_wh)
    if n <= _FEW:
        return nms(offset, scores, iou_threshold, limit)
    x1, y1, x2, y2 = (np.ascontiguousarray(c) for c in offset.T)
    coords = (x1, y1, x2, y2, (x2 - x1).clip(0) * (y2 - y1).clip(0))
    order = rank_order(scores)
    if n <= _PER_CLASS or np.isnan(scores).any():  # NaN has no place in a heap's order
        return _greedy(coords, order, iou_threshold, limit)
    grouped = _by_class(order, classes)
    cls = classes[grouped]
    starts = np.flatnonzero(np.concatenate(([True], cls[1:] != cls[:-1])))
    if len(starts) > 1 and not _classes_apart(offset, grouped, starts, iou_threshold):
        return _greedy(coords, order, iou_threshold, limit)
    ends = np.append(starts[1:], n)
    neg = (-scores).tolist()  # keys (-score, index): the stable highest-first order of nms
    done = [(neg[i], i) for i in _kept_in_small_classes(coords, grouped, starts, ends, iou_threshold)]
    heapq.heapify(done)  # kept boxes not yet given out, best first
    large = [
        (neg[int(grouped[s])], int(grouped[s]), grouped[s:e]) for s, e in zip(starts, ends) if e - s > _SMALL
    ]
    heapq.heapify(large)  # the large classes' remaining boxes, by their best box
    keep: list[int] = []
    while large and len(keep) < limit:
        key, head, members = heapq.heappop(large)
        # every box still to be kept ranks below this head: what was kept above it is final
        while done and done[0] < (key, head) and len(keep) < limit:
            keep.append(heapq.heappop(done)[1])
        kept, members = _greedy_heads(coords, members, iou_threshold)
        for i in kept:
            heapq.heappush(done, (neg[i], i))
        if members.size:
            heapq.heappush(large, (neg[int(members[0])], int(members[0]), members))
    while done and len(keep) < limit:
        keep.append(heapq.heappop(done)[1])
    return np.asarray(keep, dtype=np.int64)


def _greedy(
    coords: tuple[np.ndarray, ...], order: np.ndarray, iou_threshold: float, limit: int
) -> np.ndarray:
    """``nms`` on the boxes of ``coords`` taken in ``order``, ``_HEADS`` boxes settled per step."""
    keep: list[int] = []
    while order.size and len(keep) < limit:
        kept, order = _greedy_heads(coords, order, iou_threshold)
        keep.extend(kept)
    return np.asarray(keep[:limit], dtype=np.int64)


def _suppresses(
    coords: tuple[np.ndarray, ...], kept: np.ndarray, later: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Whether box ``kept``, once kept, suppresses box ``later`` (index arrays, broadcast against
    each other): the IoU with ``nms``'s float32 operations in ``nms``'s order, so every decision
    is the same. In place after the first operation: the temporaries can be 64 x thousands."""
    x1, y1, x2, y2, areas = coords
    w = np.minimum(x2[kept], x2[later])
    w -= np.maximum(x1[kept], x1[later])
    np.maximum(w, 0, out=w)  # what nms's .clip(0) computes
    h = np.minimum(y2[kept], y2[later])
    h -= np.maximum(y1[kept], y1[later])
    np.maximum(h, 0, out=h)
    inter = np.multiply(w, h, out=w)
    union = areas[kept] + areas[later]
    union -= inter
    union += 1e-9
    inter /= union
    hits: np.ndarray = np.less_equal(inter, iou_threshold)
    np.logical_not(hits, out=hits)
    return hits


def _greedy_heads(
    coords: tuple[np.ndarray, ...], members: np.ndarray, iou_threshold: float
) -> tuple[list[int], np.ndarray]:
    """One step of greedy NMS on a class's remaining ``members`` (best first) that settles its
    first ``_HEADS`` boxes at once: greedy among them on bit masks of their pairwise IoU, then one
    pass of the kept heads against the members after them. Same decisions as ``nms``, with one
    numpy pass per ``_HEADS`` boxes instead of one per kept box."""
    heads, after = members[:_HEADS], members[_HEADS:]
    k = len(heads)
    bits = np.zeros((k, 8), np.uint8)
    bits[:, : (k + 7) // 8] = np.packbits(
        _suppresses(coords, heads[:, None], heads, iou_threshold), axis=1, bitorder="little"
    )
    masks = bits.view("<u8").ravel().tolist()
    removed, rows = 0, []
    for q in range(k):
        if not removed >> q & 1:
            rows.append(q)
            removed |= masks[q]
    kept = heads[rows]
    if after.size:
        after = after[~_suppresses(coords, kept[:, None], after, iou_threshold).any(0)]
    return kept.tolist(), after


def _kept_in_small_classes(
    coords: tuple[np.ndarray, ...],
    grouped: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    iou_threshold: float,
) -> list[int]:
    """Greedy NMS of every class of at most ``_SMALL`` boxes at once: the IoU of every pair in
    such a class in one vectorised pass (the same float32 operations as ``nms``), each box's
    'suppresses these later boxes' row as a 64-bit mask, then the greedy walk on Python ints."""
    sizes = ends - starts
    kept: list[int] = grouped[starts[sizes == 1]].tolist()
    small = (sizes > 1) & (sizes <= _SMALL)
    if not small.any():
        return kept
    first = np.repeat(starts, sizes)  # per grouped position: where its class starts
    member = np.flatnonzero(np.repeat(small, sizes))
    later = np.repeat(ends, sizes)[member] - member - 1  # boxes after each one in its class
    total = int(later.sum())
    i = np.repeat(member, later)
    j = i + 1 + np.arange(total) - np.repeat(np.cumsum(later) - later, later)
    hit = _suppresses(coords, grouped[i], grouped[j], iou_threshold)
    rows = np.zeros((len(grouped), 64), bool)  # _SMALL <= 64: a row fits a uint64
    rows[i[hit], (j - first[j])[hit]] = True
    masks = np.packbits(rows, axis=1, bitorder="little").view("<u8").ravel().tolist()
    order = grouped.tolist()
    for start, end in zip(starts[small].tolist(), ends[small].tolist(), strict=True):
        removed = 0
        for k in range(end - start):
            if not removed >> k & 1:
                kept.append(order[start + k])
                removed |= masks[start + k]
    return kept


def _decode(pred: np.ndarray, conf_threshold: float, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """``[N, anchors, 5 + classes]`` rows -> candidates ``[M, 6]`` (xyxy, score, class) and the
    image each came from, in image order; per image, the rows and order of the one-image decode."""
    n, anchors, width = pred.shape
    flat = np.flatnonzero(pred[:, :, 4] > conf_threshold)
    rows = pred.reshape(n * anchors, width)[flat]
    image = flat // anchors
    scores = rows[:, 5:] * rows[:, 4:5]
    boxes = xywh_to_xyxy(rows[:, :4])
    if multi_label:
        i, j = np.nonzero(scores > conf_threshold)
        det = np.concatenate([boxes[i], scores[i, j, None], j[:, None].astype(np.float32)], 1)
        return det, image[i]
    j = scores.argmax(1)
    conf = scores[np.arange(len(j)), j]
    sure = conf > conf_threshold
    det = np.concatenate([boxes, conf[:, None], j[:, None].astype(np.float32)], 1)[sure]
    return det, image[sure]


def batched_yolo_nms(
    pred: np.ndarray,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    max_wh: float = MAX_WH,
    max_candidates: int = 30000,
) -> list[np.ndarray]:
    """``yolo_nms`` for every image of a ``[N, anchors, 5 + classes]`` batch: one vectorised
    confidence filter and decode for the whole batch, then class-aware NMS per image."""
    pred = np.asarray(pred, np.float32)
    if pred.ndim != 3 or pred.shape[2] < 6:
        raise ValueError(f"YOLO output must be [batch, anchors, 5 + classes]; got shape {pred.shape}")
    det, image = _decode(pred, conf_threshold, multi_label)
    bounds = np.searchsorted(image, np.arange(len(pred) + 1)).tolist()
    out = []
    for start, end in itertools.pairwise(bounds):
        d = det[start:end]
        if not len(d):
            out.append(_EMPTY.copy())
            continue
        if len(d) > max_candidates:
            d = d[rank_order(d[:, 4])[:max_candidates]]
        keep = class_nms(d[:, :4], d[:, 4], d[:, 5], iou_threshold, max_det, max_wh)
        out.append(d[keep])
    return out


def yolo_nms(
    pred: np.ndarray,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    max_wh: float = MAX_WH,
    max_candidates: int = 30000,
) -> np.ndarray:
    """One image's YOLO rows ``[xywh, obj, cls...]`` -> ``[k, 6]`` rows of xyxy, score, class.

    Class-aware: boxes are offset by class so only same-class boxes suppress each other.
    ``multi_label`` keeps every class above threshold per box (used for mAP evaluation).
    """
    return batched_yolo_nms(
        np.asarray(pred)[None], conf_threshold, iou_threshold, max_det, multi_label, max_wh, max_candidates
    )[0]
