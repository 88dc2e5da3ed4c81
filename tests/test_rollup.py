"""Hierarchy roll-up (larvess/rollup.py) against naive set implementations, and end to end.

The small tree world of tests/test_vocab.py (COCO food-other holds pizza, furniture-other holds
chair; a merged chair row; an alias-file class), evaluated as one more dataset; then eval_ade
and predict on a tiny exported model whose vocabulary nests a breed under dog and has
untrained vocab.extra_names rows (tests/exported_model.py make_tree_model).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exported_model import CLI, INFER, TREE_EVAL_NAMES, make_tree_model, smooth_image
from PIL import Image
from test_vocab import ALIASES, TREE, W, _tree_vocab

from larvess.commands import eval_ade, predict
from larvess.inference import classify_embeddings, embed_image
from larvess.metrics import SegMetrics, format_summary
from larvess.names import normalize_name
from larvess.predictor import Predictor
from larvess.rollup import (
    Votes,
    class_votes,
    plain_votes,
    rollup_scores,
    run_tree,
    top_level,
    trained_rows,
    with_classes,
)
from larvess.tree import VocabTree
from larvess.vocab import Vocabulary

# the evaluated dataset: (names, synsets); seat holds chair, so seat is "the rest of the seats"
EVAL = [(["food"], ["food"]), (["pizza"], ["pizza"]), (["seat"], ["seat"]),
        (["chair"], ["chair"]), (["animal"], ["animal"]), (["dog"], ["dog"]), (["sky"], []),
        (["lamp"], [])]  # fmt: skip


def eval_world():
    v, h = _tree_vocab()
    v.add_source("extra:names.txt", [["lamp"]], [[]])  # a row with no training source
    names = [n for n, _ in EVAL]
    wnids = [[W[x] for x in s] for _, s in EVAL]
    rows = v.match(names, wnids)
    assert (rows >= 0).all()
    return v, h, rows, names, wnids


def naive_inside(v, names, wnids, rows) -> list[set[int]]:
    """Per evaluated class, the rows whose meaning lies inside its own (r_c excluded), from the
    meaning rule written out with plain sets over every source (the evaluated one included)."""
    children = {k: [c for c, ps in TREE.items() if k in ps] for k in TREE}
    inv = {w: k for k, w in W.items()}

    def sub(k):
        return {k}.union(*(sub(c) for c in children[k]))

    def anc(k):
        return set().union(*({p} | anc(p) for p in TREE[k])) if TREE[k] else set()

    alias = {normalize_name(n): inv[g[0]] for g in ALIASES for n in g[1:]}
    sources = {s: v._sources[s] for s in v.sources} | {
        "eval": {"rows": rows.tolist(), "synonyms": names, "wnids": wnids, "by_synset": False}
    }
    members = [[] for _ in range(len(v))]  # per row: (source, own synsets, siblings' synsets)
    for src, info in sources.items():
        ws = info["wnids"] or [[] for _ in info["rows"]]
        own = []
        for syn, w in zip(info["synonyms"], ws):
            extra = {alias[normalize_name(s)] for s in syn if normalize_name(s) in alias}
            own.append({inv[x] for x in w} | extra)
        for i, r in enumerate(info["rows"]):
            others = set().union(*(own[j] for j in range(len(own)) if j != i))
            members[r].append((src, own[i], set() if info["by_synset"] else others))
    mean, datasets = [], []
    for r, m in enumerate(members):
        pos = set().union(*(o for _, o, _ in m))
        neg = set().union(*(x for _, _, x in m)) - pos
        rm = set()
        for s in pos:
            rm |= sub(s) - set().union(*(sub(x) for x in neg if x not in anc(s)))
        mean.append(rm or {("row", r)})
        datasets.append({src for src, _, x in m if not sources[src]["by_synset"]})
    return [
        {
            r
            for r in range(len(v))
            if r != rc and not datasets[r] & datasets[rc] and mean[r] <= mean[rc]
        }
        for rc in rows.tolist()
    ]


def test_votes_match_a_naive_reference_and_respect_the_partition():
    v, h, rows, names, wnids = eval_world()
    tree = VocabTree(with_classes(v, rows, names, wnids), h, strict=False)
    inside = naive_inside(v, names, wnids, rows)
    trained = trained_rows(v)
    lamp = int(rows[names.index(["lamp"])])
    assert not trained[lamp] and int(trained.sum()) == len(v) - 1
    g = torch.Generator().manual_seed(0)
    for mask in (trained, trained & (torch.rand(len(v), generator=g) < 0.6)):
        votes = class_votes(tree, rows, mask)
        got = [set() for _ in rows]
        for r, c in zip(votes.rows.tolist(), votes.classes.tolist()):
            assert r not in got[c]  # no vote twice
            got[c].add(r)
        want = [{r for r in inside[c] | {int(rows[c])} if mask[r]} for c in range(len(rows))]
        assert got == want
    by_name = lambda r: v.names[r]  # noqa: E731
    s = {n[0]: {by_name(r) for r in inside[c] | {int(rows[c])}} for c, n in enumerate(names)}
    # the pizza row votes for pizza, never for food (the residual class of this dataset)
    assert "pizza" in s["pizza"] and "pizza" not in s["food"]
    # the breed rows vote for dog, not for animal: ImageNet's animal row has no partition of
    # its own, the evaluated dataset's (dog is animal's sibling class there) decides
    assert {"retriever", "golden"} <= s["dog"] and s["animal"] == {"animal"}
    assert "sofa" in s["seat"] and "chair" not in s["seat"]  # seat is the rest of the seats
    assert "office chair" in s["chair"] and s["sky"] == {"sky-other"}
    votes = class_votes(tree, rows, trained)
    assert votes.reached().tolist() == [n != ["lamp"] for n in names]  # lamp: unreached
    assert votes.rolls_up(rows) and not plain_votes(rows, trained).rolls_up(rows)


def test_rolled_up_scores_and_argmax_match_a_per_pixel_max():
    v, h, rows, names, wnids = eval_world()
    tree = VocabTree(with_classes(v, rows, names, wnids), h, strict=False)
    trained = trained_rows(v)
    votes = class_votes(tree, rows, trained)
    sets = [{r for r in s | {int(rows[c])} if trained[r]} for c, s in enumerate(
        naive_inside(v, names, wnids, rows))]  # fmt: skip
    d, hh, ww = 6, 5, 7
    g = torch.Generator().manual_seed(1)
    x = torch.randn(d, hh, ww, generator=g, dtype=torch.float64).float()
    mu = F.normalize(torch.randn(len(v), d, generator=g), dim=1)
    px = x.flatten(1).T  # [N, d] (out_size = the grid: the resize is the identity)
    scores = px @ mu.T  # [N, C]
    want = torch.full((px.shape[0], len(rows)), float("-inf"))
    for n in range(px.shape[0]):
        for c, s in enumerate(sets):
            if s:
                want[n, c] = max(float(scores[n, r]) for r in s)
    got = rollup_scores(px @ mu[votes.rows].T, votes.classes, len(rows))
    torch.testing.assert_close(got, want)
    urows, label = votes.argmax_rows()
    # one block, strips of one output row, and the kNN search (k = 1) over the voting rows
    for block, knn in ((1 << 24, 4096), (7, 4096), (1 << 24, 1)):
        labels = classify_embeddings(
            x, mu[urows], (hh, ww), knn_threshold=knn, max_scores=block, classes=label
        )
        assert torch.equal(labels.flatten(), want.argmax(1)), (block, knn)
    # a row voting for two classes (WordNet's multiple inheritance): the best vote's class,
    # the lower one on a tie, = the argmax of the segment max
    multi = Votes(torch.tensor([3, 1, 3, 2, 0]), torch.tensor([2, 0, 1, 1, 0]), 4)
    urows, label = multi.argmax_rows()
    assert urows.tolist() == [0, 1, 2, 3] and label.tolist() == [0, 0, 1, 1]
    labels = classify_embeddings(x, mu[urows], (hh, ww), classes=label)
    seg = rollup_scores(px @ mu[multi.rows].T, multi.classes, 4)
    assert torch.equal(labels.flatten(), seg.argmax(1)) and (seg[:, 3] == float("-inf")).all()
    assert multi.reached().tolist() == [True, True, True, False]
    lamp = names.index(["lamp"])
    labels = classify_embeddings(x, mu[votes.rows], (hh, ww), classes=votes.classes)
    assert not (labels == lamp).any()  # an unreached class is never predicted
    # plain votes with an untrained own row: argmax over the trained own rows, relabelled
    plain = plain_votes(rows, trained)
    labels = classify_embeddings(x, mu[plain.rows], (hh, ww), classes=plain.classes)
    own = scores[:, rows].clone()
    own[:, lamp] = float("-inf")
    assert torch.equal(labels.flatten(), own.argmax(1))


def test_top_level_rows_of_the_whole_vocabulary():
    v, h = _tree_vocab()
    tree = v.tree(h)
    trained = trained_rows(v)
    tops, votes = top_level(tree, trained)
    cov = tree.covering.to_sets()
    want = [r for r in range(len(v)) if not cov[r]]
    assert tops.tolist() == want
    names = {v.names[r] for r in tops.tolist()}
    assert "animal" in names and "golden" not in names and "dog" not in names
    for r in range(len(v)):
        got = {int(tops[c]) for q, c in zip(votes.rows.tolist(), votes.classes.tolist()) if q == r}
        assert got == ({r} if r in want else cov[r] & set(want)), v.names[r]


def test_trained_rows_from_the_sources_and_from_tree_label_expansion():
    _, h = _tree_vocab()
    v = Vocabulary()
    v.add_source("coco", [["sky"], ["animal"]], [[], [W["animal"]]], has_masks=True)
    v.add_source("in", [["golden"]], [W["golden"]], by_synset=True)
    v.add_source("extra:names.txt", [["dog"], ["lamp"]], [[W["dog"]], []])
    assert trained_rows(v).tolist() == [True, True, True, False, False]
    # loss.hierarchy=tree: the golden images also labelled every row covering golden (dog);
    # a mask source's classes expand nothing (COCO animal is trained by its masks anyway)
    assert trained_rows(v, v.tree(h)).tolist() == [True, True, True, True, False]


def test_run_tree_never_fails_on_a_toy_vocabulary(tmp_path):
    v, _ = _tree_vocab()  # made-up wnids: not in the shipped WordNet table
    tree, notes = run_tree(v, str(tmp_path / "gone.tsv"), "runs/x/recipe.yaml")
    assert (
        notes[0].startswith("runs/x/recipe.yaml: vocab.hierarchy_file ") and "gone.tsv" in notes[0]
    )
    used = len(W) - 1  # every synset of the test tree but entity names a row (swivel: an alias)
    assert notes[1].startswith(f"{used} wnids of the vocabulary are not in ")
    assert tree.covering.ids.numel() == 0  # each stands alone: nothing rolls up


def test_excluded_classes_are_left_out_of_every_figure():
    g = torch.Generator().manual_seed(2)
    k, ex = 5, 3
    pred = torch.randint(0, k, (400,), generator=g)
    pred[pred == ex] = 0  # an unreached class is never predicted
    gt = torch.randint(-1, k, (400,), generator=g)
    m = SegMetrics(k)
    m.update(pred, gt)
    base = np.array([True, True, False, True, False])
    got = m.compute(base=base, novel=~base, exclude=[ex])
    # naive: the excluded class's pixels are ignored, the mean is over the other classes
    keep = (gt >= 0) & (gt != ex)
    ious = {}
    for c in range(k):
        if c == ex:
            continue
        p, t = pred[keep] == c, gt[keep] == c
        if (p | t).any():
            ious[c] = float((p & t).sum() / (p | t).sum())
    assert got["mIoU"] == pytest.approx(np.mean(list(ious.values())))
    assert got["base_mIoU"] == pytest.approx(np.mean([ious[c] for c in ious if base[c]]))
    assert got["novel_mIoU"] == pytest.approx(np.mean([ious[c] for c in ious if not base[c]]))
    assert got["pAcc"] == pytest.approx(float((pred[keep] == gt[keep]).float().mean()))
    assert np.isnan(got["IoU"][ex]) and got["excluded_classes"].tolist() == [ex]
    assert got["num_pixels"] == int(keep.sum()) and got["num_classes_excluded"] == 1
    assert format_summary(got).endswith(f"/{k} (1 left out)")


# ---- end to end: eval_ade and predict on a model whose vocabulary nests -----------------------
@pytest.fixture(scope="module")
def tree_model(tmp_path_factory):
    return make_tree_model(tmp_path_factory.mktemp("tree_run"))


def naive_predict(model, image) -> dict[str, np.ndarray]:
    """Both protocols by plain loops over the resized embeddings and Python sets of rows."""
    x, size = embed_image(model.segmenter, image, **INFER)
    emb = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    scores = (emb.flatten(1).T @ model.mu.T).numpy()  # [N, C]
    r = model.row_of
    trained = {"wall", "sky", "dog", "golden retriever", "tabby"}
    inside = {"dog": {"golden retriever"}, "animal": {"tabby"}}  # by the WordNet chains
    out = {}
    for proto in ("plain", "rollup"):
        cls = np.full((scores.shape[0], len(TREE_EVAL_NAMES)), -np.inf)
        for c, n in enumerate(TREE_EVAL_NAMES):
            voters = {n} | (inside.get(n, set()) if proto == "rollup" else set())
            voters &= trained
            if voters:
                cls[:, c] = np.max(scores[:, [r[q] for q in voters]], axis=1)
        out[proto] = cls.argmax(1).reshape(size)
    return out


def test_eval_ade_reports_both_protocols_and_leaves_unreached_classes_out(tree_model, tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [
        f"{i}\t0.01\t10\t1\t{n}" for i, n in enumerate(TREE_EVAL_NAMES, 1)
    ]
    (base / "images/validation").mkdir(parents=True)
    (base / "annotations/validation").mkdir(parents=True)
    (base / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    pairs = []
    for i, (h, w) in enumerate([(64, 80), (70, 64)]):
        key = f"ADE_val_{i:08d}"
        Image.fromarray(smooth_image(h, w, 40 + i)).save(base / f"images/validation/{key}.jpg")
        image = np.asarray(Image.open(base / f"images/validation/{key}.jpg").convert("RGB"))
        want = naive_predict(tree_model, image)
        gt = want["rollup"].copy()
        gt[:10, :10] = 2  # animal
        gt[-8:, :20] = 4  # horse: unreached, its pixels out of every figure
        gt[:, -3:] = -1
        Image.fromarray((gt + 1).astype(np.uint8)).save(base / f"annotations/validation/{key}.png")
        pairs.append((want, gt))
    out = tmp_path / "out"
    args = ["--checkpoint", str(tree_model.run), "--dataset", "ade150", "--root", str(base)]
    got = eval_ade.run(args + ["--out", str(out)] + CLI)
    res = json.loads((out / "results.json").read_text())
    assert res["unreached"] == ["horse"] and got["unreached"] == ["horse"]
    k = len(TREE_EVAL_NAMES)
    for proto, summary, per_class in (
        ("plain", res["summary"], res["per_class"]),
        ("rollup", res["rollup"]["summary"], res["rollup"]["per_class"]),
    ):
        tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
        for want, gt in pairs:
            valid = (gt >= 0) & (gt != 4)
            p = want[proto]
            assert not (p == 4).any()  # never predicted
            for c in range(k):
                tp[c] += ((p == c) & (gt == c) & valid).sum()
                fp[c] += ((p == c) & (gt != c) & valid).sum()
                fn[c] += ((p != c) & (gt == c) & valid).sum()
        iou = {c: tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(k) if tp[c] + fp[c] + fn[c]}
        assert 4 not in iou
        assert summary["mIoU"] == pytest.approx(100 * np.mean(list(iou.values())), abs=1e-3)
        assert per_class[4]["subset"] == "excluded" and per_class[4]["IoU"] is None
        for c, v in iou.items():
            assert per_class[c]["IoU"] == pytest.approx(100 * v, abs=1e-3), (proto, c)
    # the plain protocol never predicts animal (its own row is untrained); roll-up does (tabby)
    assert res["per_class"][2]["pred_pixels"] == 0
    assert res["rollup"]["per_class"][2]["pred_pixels"] > 0
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["rollup_IoU"] or "nan") for r in rows[:4]] == pytest.approx(
        [res["rollup"]["per_class"][c]["IoU"] for c in range(4)], abs=1e-3
    )
    # --rollup off: the plain protocol only, still without the unreached class
    eval_ade.run(args + ["--out", str(tmp_path / "off"), "--rollup", "off"] + CLI)
    off = json.loads((tmp_path / "off/results.json").read_text())
    assert "rollup" not in off and off["summary"] == res["summary"]


def test_predict_rolls_up_asked_classes_and_the_command_agrees(tree_model, tmp_path):
    image = smooth_image(72, 64, 50)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    names = ["dog", "animal", "sky", "wall"]
    pred = Predictor.from_run(tree_model.run, classes=names, device="cpu")
    assert pred.protocol == "rollup"
    labels, _ = pred.predict(path, **INFER)
    full = naive_predict(tree_model, image)["rollup"]  # indices into TREE_EVAL_NAMES
    remap = np.array([3, 2, 1, 0, -1])  # TREE_EVAL_NAMES index -> index in `names`
    np.testing.assert_array_equal(labels, remap[full])
    plain = Predictor.from_run(tree_model.run, classes=names, device="cpu", rollup=False)
    assert plain.protocol == "plain" and not (plain.predict(path, **INFER)[0] == 1).any()
    out = tmp_path / "out"
    args = ["--checkpoint", str(tree_model.run), "--out", str(out), "--classes", ",".join(names)]
    assert predict.run(args + CLI + [str(path)]) == 0
    with Image.open(out / "photo_label.png") as im:
        np.testing.assert_array_equal(np.asarray(im), labels)
    # the whole vocabulary rolled up to its top-level rows: untrained rows never take a pixel
    top = Predictor.from_run(tree_model.run, device="cpu", rollup=True)
    assert top.names == ["wall", "sky", "dog", "tabby"]
    whole = Predictor.from_run(tree_model.run, device="cpu")
    got = whole.predict(path, **INFER)[0]
    assert not np.isin(got, [tree_model.row_of["animal"], tree_model.row_of["horse"]]).any()
    dog = top.names.index("dog")
    breed = got == tree_model.row_of["golden retriever"]
    assert (top.predict(path, **INFER)[0][breed] == dog).all()
