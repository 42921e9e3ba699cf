"""Issue 15 research: site-adversarial training on the new site's unlabeled images (FracAtlas -> HBFMID).

Idea: what a hospital can do with its unlabeled archive. A small head on the cached VGG16 maps learns an
embedding in which a fracture classifier works on the labeled source images while a domain classifier,
behind a gradient-reversal layer, cannot tell source images from the target site's (DANN, Ganin et al.
2016). Because HBFMID is over 95% fractured and FracAtlas about 18%, plain marginal alignment under label
shift can hurt, so a label-shift-aware variant weights the source images by class in the domain loss
(importance-weighted DANN, as IWDAN in Combes et al. 2020) with the target's fracture rate estimated
label-free by EM (Saerens et al. 2002) from the source-only head's posteriors on the target. CORAL
(Sun & Saenko 2016, Deep CORAL) is the cheaper member of the family: a loss term matching the pooled
embedding's covariance between source and target instead of the adversary.

Methods (the same head and training throughout; only the alignment term differs):

- ``source-only``: the baseline, no target images used.
- ``dann``: + domain loss through a gradient-reversal layer, lambda_p = 2 / (1 + exp(-10 p)) - 1 (p the
  training progress), Ganin et al.'s schedule, lambda_max 1.
- ``iw-dann``: ``dann`` with each source image's domain-loss weight pi_t(y) / pi_s(y), pi_t from EM on the
  ``source-only`` head's posteriors on the target (trained class-balanced, so its posteriors are at prior
  0.5), clipped to [0.02, 0.98]. Never a target label.
- ``coral``: + ``HEAD["coral_weight"]`` x ||C_s - C_t||_F^2 / (4 k^2) on the pooled embedding per batch.

Head (``HEAD``, fixed before the first full run; not tuned on HBFMID or on a held-out region): block5_pool
cells (7x7x512, VGG16's own 2x2 max of the cached block5_conv3 maps), each channel standardized on the
training rows, dropout 0.2, a 1x1 conv 512 -> 64 with ReLU, global average pooling (the embedding), a linear
fracture logit; class-balanced BCE, L2 1e-4 on the conv, Adam lr 1e-3, batch 64 source + 64 target images
(target drawn with replacement), 10 epochs over the source (the settings of local_evidence.py's MIL head).
Domain classifier: 64 ReLU units, then a logit. ``coral_weight`` by Deep CORAL's rule (the two losses of
the same order at the end of training), set on FracAtlas grouped-CV fold 0 only (``--calibrate-coral``: the
source-only head's classification loss 0.285, CORAL loss 2.58e-5, ratio 1.1e4, so 1e4).

Protocol: local_evidence.py's (``run_protocol``, imported), the target being the scored set's images without
their labels: HBFMID for the HBFMID figure (trained on all FracAtlas use=1 rows; threshold kept from the
FracAtlas OOF scores), the held-out region for each LORO figure, the held-out fold for FracAtlas grouped
5-fold CV. 3 seeds (initialisation, dropout, batch order; the folds stay fixed). Reported per method: the
mean and spread over seeds; HBFMID ROC AUC of the seed mean with a group-bootstrap interval; the paired gain
over ``source-only`` (the mean over seeds of the per-seed difference, on the same group resamples, 2000) with
its interval; the site separability of each head's learned embedding (HBFMID split).

Pre-declared rule (written before the first full run): a method is offered only if its paired gain on
HBFMID ROC AUC has a 95% interval above 0, its LORO mean is not lower than ``source-only``'s, and its
FracAtlas CV ROC AUC loses at most 0.01 (means over seeds). Otherwise it is a measured negative result.

    nice -n 19 python benchmarks/site_adversarial.py --calibrate-coral          # fold-0 losses, sets nothing
    nice -n 19 python benchmarks/site_adversarial.py --out benchmarks/results/site_adversarial.json
    python benchmarks/site_adversarial.py --table benchmarks/results/site_adversarial.json
    python benchmarks/site_adversarial.py --summarize X.partial.json --out X.json  # report of an interrupted run
    python benchmarks/site_adversarial.py --limit 60 --out /tmp/sa.json          # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import local_evidence as le  # noqa: E402
from fracfeat._hardware import describe_machine  # noqa: E402
from fracfeat._validation import grouped_folds  # noqa: E402

HEAD = {"cells": "block5_pool (7x7x512)", "k": 64, "dropout": 0.2, "l2": 1e-4, "learning_rate": 1e-3,
        "batch": 64, "epochs": 10, "domain_hidden": 64, "lambda_max": 1.0, "lambda_schedule": "2/(1+exp(-10p))-1",
        "coral_weight": 1e4, "em_prior_clip": [0.02, 0.98], "seeds": [0, 1, 2], "paired_resamples": 2000}
METHODS = {"source-only": "same head, no target images (the baseline)",
           "dann": "gradient-reversal domain classifier, source vs target",
           "iw-dann": "DANN with source domain weights pi_t(y)/pi_s(y), pi_t by EM on the source-only posteriors",
           "coral": "Deep CORAL loss on the pooled embedding"}
BASELINE = "source-only"


def set_one_core():
    """TensorFlow on one core: the machine's two are shared."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def channel_stats(cells: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and 1/std over every cell of ``rows`` (float64 sums, in chunks)."""
    total, total_sq, n = 0.0, 0.0, 0
    for s in range(0, len(rows), 512):
        c = cells[np.sort(rows[s:s + 512])].astype(np.float64).reshape(-1, cells.shape[-1])
        total, total_sq, n = total + c.sum(0), total_sq + (c * c).sum(0), n + len(c)
    mean = total / n
    return mean.astype(np.float32), (1.0 / np.sqrt(np.maximum(total_sq / n - mean ** 2, 1e-6))).astype(np.float32)


def em_target_prior(p: np.ndarray, train_prior: float = 0.5, iters: int = 200) -> float:
    """Saerens et al. 2002: the target's positive rate from posteriors ``p`` of a classifier fitted at ``train_prior``."""
    pi = train_prior
    for _ in range(iters):
        a, b = p * pi / train_prior, (1 - p) * (1 - pi) / (1 - train_prior)
        new = float(np.mean(a / (a + b)))
        if abs(new - pi) < 1e-7:
            break
        pi = new
    return float(np.clip(pi, *HEAD["em_prior_clip"]))


class Head:
    """One method's head: variables and compiled steps built once, re-initialized per training (no retracing)."""

    def __init__(self, cells: np.ndarray, mode: str):
        tf = set_one_core()
        self.tf, self.cells_np, self.cells, self.mode = tf, cells, tf.constant(cells), mode
        k, h, c = HEAD["k"], HEAD["domain_hidden"], cells.shape[-1]
        shapes = {"w1": (c, k), "b1": (k,), "w2": (k, 1), "b2": (1,), "d1": (k, h), "db1": (h,), "d2": (h, 1),
                  "db2": (1,)}
        self.vars = {n: tf.Variable(tf.zeros(s)) for n, s in shapes.items()}
        self.moments = [(tf.Variable(tf.zeros(s)), tf.Variable(tf.zeros(s))) for s in shapes.values()]
        self.t = tf.Variable(0.0)
        self.mean, self.scale = tf.Variable(tf.zeros(c)), tf.Variable(tf.ones(c))
        self.gen = tf.random.Generator.from_seed(0)
        idx, vec = tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.float32)
        self.step = tf.function(self._step, input_signature=[idx, idx, vec, vec, vec, tf.TensorSpec([], tf.float32)])
        self.embed = tf.function(lambda i: self._embed(i, False), input_signature=[idx])
        self.logit = tf.function(lambda i: self._logit(self._embed(i, False)), input_signature=[idx])

    def _embed(self, idx, training: bool):
        tf, v = self.tf, self.vars
        x = (tf.cast(tf.gather(self.cells, idx), tf.float32) - self.mean) * self.scale
        if training:
            keep = tf.cast(self.gen.uniform(tf.shape(x)) >= HEAD["dropout"], tf.float32)
            x = x * keep / (1.0 - HEAD["dropout"])
        return tf.reduce_mean(tf.nn.relu(tf.einsum("ncd,dk->nck", x, v["w1"]) + v["b1"]), axis=1)

    def _logit(self, z):
        return (z @ self.vars["w2"] + self.vars["b2"])[:, 0]

    def _alignment(self, zs, zt, wd, lam):
        """The method's term: a domain loss behind gradient reversal (dann) or the CORAL loss."""
        tf, v = self.tf, self.vars
        if self.mode == "coral":
            def cov(z):
                z = z - tf.reduce_mean(z, 0)
                return tf.transpose(z) @ z / tf.cast(tf.shape(z)[0] - 1, tf.float32)
            return HEAD["coral_weight"] * tf.reduce_sum(tf.square(cov(zs) - cov(zt))) / (4.0 * HEAD["k"] ** 2)

        @tf.custom_gradient
        def reverse(z):
            return tf.identity(z), lambda dy: -lam * dy
        d = tf.nn.relu(reverse(tf.concat([zs, zt], 0)) @ v["d1"] + v["db1"]) @ v["d2"] + v["db2"]
        label = tf.concat([tf.zeros_like(wd), tf.ones(tf.shape(zt)[:1])], 0)
        loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=d[:, 0])
        n = tf.shape(wd)[0]
        return 0.5 * (tf.reduce_sum(wd * loss[:n]) / tf.reduce_sum(wd) + tf.reduce_mean(loss[n:]))

    def _step(self, idx_s, idx_t, y, w, wd, lam):
        tf = self.tf
        names = list(self.vars)
        with tf.GradientTape() as tape:
            zs = self._embed(idx_s, True)
            bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=self._logit(zs))
            loss = tf.reduce_sum(w * bce) / tf.reduce_sum(w) + HEAD["l2"] * tf.reduce_sum(tf.square(self.vars["w1"]))
            if self.mode != "source-only":
                loss += self._alignment(zs, self._embed(idx_t, True), wd, lam)
        grads = tape.gradient(loss, [self.vars[n] for n in names])
        self.t.assign_add(1.0)
        b1, b2, lr = 0.9, 0.999, HEAD["learning_rate"]
        for n, g, (m, s) in zip(names, grads, self.moments):
            if g is None:
                continue
            m.assign(b1 * m + (1 - b1) * g)
            s.assign(b2 * s + (1 - b2) * g * g)
            mhat, shat = m / (1 - b1 ** self.t), s / (1 - b2 ** self.t)
            self.vars[n].assign_sub(lr * mhat / (tf.sqrt(shat) + 1e-7))
        return loss

    def reset(self, seed: int, mean: np.ndarray, scale: np.ndarray) -> None:
        rng = np.random.default_rng(seed)
        for n, v in self.vars.items():
            shape = tuple(v.shape)
            limit = np.sqrt(6.0 / sum(shape)) if len(shape) == 2 else 0.0
            v.assign(rng.uniform(-limit, limit, shape).astype(np.float32))
        for m, s in self.moments:
            m.assign(np.zeros(m.shape, np.float32))
            s.assign(np.zeros(s.shape, np.float32))
        self.t.assign(0.0)
        self.mean.assign(mean)
        self.scale.assign(scale)
        self.gen.reset_from_seed(seed)

    def fit(self, train, target, y, seed: int, domain_weight=(1.0, 1.0)) -> list[float]:
        """Trains on labeled ``train`` rows and unlabeled ``target`` rows; returns each epoch's last loss."""
        self.reset(seed, *channel_stats(self.cells_np, train))
        rng, yt = np.random.default_rng(seed), y[train].astype(np.float32)
        w = np.where(yt == 1, 0.5 / yt.mean(), 0.5 / (1 - yt.mean())).astype(np.float32)
        wd = np.where(yt == 1, domain_weight[1], domain_weight[0]).astype(np.float32)
        batch, steps = HEAD["batch"], int(np.ceil(len(train) / HEAD["batch"]))
        total, losses = HEAD["epochs"] * steps, []
        for epoch in range(HEAD["epochs"]):
            order = rng.permutation(len(train))
            for j in range(steps):
                b = order[j * batch:(j + 1) * batch]
                p = (epoch * steps + j) / total
                lam = HEAD["lambda_max"] * (2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0)
                loss = self.step(train[b].astype(np.int32), rng.choice(target, len(b)).astype(np.int32),
                                 yt[b], w[b], wd[b], np.float32(lam))
            losses.append(float(loss))
        return losses

    def predict(self, rows, fn=None) -> np.ndarray:
        fn = fn or self.logit
        return np.concatenate([np.asarray(fn(rows[s:s + 1024].astype(np.int32))) for s in range(0, len(rows), 1024)])


def split_key(train: np.ndarray, score: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(train).tobytes() + b"|" + np.asarray(score).tobytes()).hexdigest()


class AdaptScorer:
    """local_evidence's scorer interface: fit(train rows, target = the scored rows unlabeled) -> their logits.

    Keeps every split's scores in ``cache`` (iw-dann reads the source-only head's), and for the HBFMID split
    the scores and the learned embedding's site separability.
    """

    def __init__(self, head: Head, method: str, seed: int, cols: dict, cache: dict):
        self.head, self.method, self.seed, self.cols, self.cache = head, method, seed, cols, cache
        self.hbfmid_scores, self.embedding_site_separability, self.priors = None, None, {}

    def __call__(self, train, score, y, parts):
        key = split_key(train, score)
        weight = (1.0, 1.0)
        if self.method == "iw-dann":
            base = self.cache.get((BASELINE, self.seed, key))
            if base is None:
                raise RuntimeError("iw-dann needs the source-only scores of the same split and seed: run it first")
            pi_t, pi_s = em_target_prior(1.0 / (1.0 + np.exp(-base))), float(y[train].mean())
            weight = ((1 - pi_t) / (1 - pi_s), pi_t / pi_s)
            self.priors[key[:8]] = {"target_prior_em": pi_t, "source_prior": pi_s}
        self.head.fit(train, score, y, self.seed, weight)
        s = self.head.predict(score)
        self.cache[(self.method, self.seed, key)] = s
        if np.all(self.cols["source"][score] == "hbfmid"):
            self.hbfmid_scores = s.tolist()
            emb = self.head.predict(np.arange(len(self.cols["y"])), self.head.embed)
            self.embedding_site_separability = le.site_separability(emb, self.cols)
        return s


# ---------------------------------------------------------------- the run, the summary, the rule

def select_rows(cols: dict, limit: int) -> dict:
    """A seeded random ``limit`` rows per source (all rows when 0)."""
    if not limit:
        return cols
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(cols["source"] == s), limit, replace=False)
                                   for s in le.SOURCES]))
    return {k: v[keep] for k, v in cols.items()}


def load_cells(maps_folder: Path, limit: int = 0) -> tuple[np.ndarray, dict]:
    """block5_pool cells (n, 49, 512) float16 of the decoded rows, with their columns; ``limit`` rows per source."""
    maps, cols = le.load_maps(maps_folder)
    cols = select_rows(cols, limit)
    idx = cols["index"]
    cells = np.concatenate([le.pool5(np.asarray(maps[idx[s:s + 256]])) for s in range(0, len(idx), 256)])
    return cells.reshape(len(idx), -1, cells.shape[-1]), cols


def group_members(groups: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.searchsorted(inverse[order], np.arange(inverse.max() + 1))[1:])


def rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half): sklearn's, without its per-call checks."""
    from scipy.stats import rankdata

    pos = y == 1
    n1 = pos.sum()
    return float((rankdata(s)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def paired_bootstrap(y: np.ndarray, groups: np.ndarray, scores: dict, n_boot: int) -> dict:
    """HBFMID ROC AUC of each method (mean over seeds) and its gain over the baseline, on the same group resamples.

    ``scores``: method -> list of per-seed score vectors (same seeds, same rows). Returns method ->
    {"roc_auc": [value, low, high], "gain": [value, low, high], "p_gain_le_0": share}.
    """
    members, rng = group_members(groups), np.random.default_rng(0)
    roc_auc_score = rank_auc
    auc = {m: [] for m in scores}
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        if len(np.unique(y[idx])) < 2:
            continue
        for m, per_seed in scores.items():
            auc[m].append(np.mean([roc_auc_score(y[idx], np.asarray(s)[idx]) for s in per_seed]))
    point = {m: float(np.mean([roc_auc_score(y, s) for s in per_seed])) for m, per_seed in scores.items()}
    out = {}
    for m in scores:
        a, d = np.array(auc[m]), np.array(auc[m]) - np.array(auc[BASELINE])
        out[m] = {"roc_auc": [point[m], *np.percentile(a, [2.5, 97.5]).tolist()],
                  "gain": [point[m] - point[BASELINE], *np.percentile(d, [2.5, 97.5]).tolist()],
                  "p_gain_le_0": float((d <= 0).mean()), "resamples": len(a)}
    return out


def summarize(results: dict, cols: dict) -> dict:
    """Per method: mean and spread (min, max) over seeds of every figure, the paired HBFMID bootstrap, the rule."""
    hb = cols["source"] == "hbfmid"
    done = [m for m in METHODS if m in results and results[m]["seeds"]]
    seeds = sorted(set.intersection(*[set(results[m]["seeds"]) for m in done])) if done else []
    if BASELINE not in done or not seeds:
        return {}
    paired = paired_bootstrap(cols["y"][hb], cols["group"][hb],
                              {m: [results[m]["seeds"][s]["hbfmid_scores"] for s in seeds] for m in done},
                              HEAD["paired_resamples"])
    out = {}
    for m in done:
        runs = [results[m]["seeds"][s] for s in seeds]

        def spread(values):
            return [float(np.mean(values)), float(np.min(values)), float(np.max(values))]
        out[m] = {"seeds": seeds, "fracatlas_cv_roc_auc": spread([r["fracatlas_cv_roc_auc"] for r in runs]),
                  "loro_mean": spread([r["loro_mean"] for r in runs]),
                  "loro_roc_auc": {p: spread([r["loro_roc_auc"][p] for r in runs]) for p in runs[0]["loro_roc_auc"]},
                  **{f"hbfmid_{k}": spread([r["hbfmid"][k][0] for r in runs]) for k in ("sensitivity", "specificity")},
                  "hbfmid_roc_auc_per_seed": spread([r["hbfmid"]["roc_auc"][0] for r in runs]),
                  "embedding_site_separability": spread([r["embedding_site_separability"] for r in runs]),
                  "seconds": float(np.sum([r["seconds"] for r in runs])), **paired[m]}
    base = out[BASELINE]
    for m in done:
        r = out[m]
        r["offered"] = m != BASELINE and bool(
            r["gain"][1] > 0 and r["loro_mean"][0] >= base["loro_mean"][0]
            and r["fracatlas_cv_roc_auc"][0] >= base["fracatlas_cv_roc_auc"][0] - 0.01)
    return out


def table(summary: dict) -> str:
    """The markdown table: means over seeds [min-max over seeds]; HBFMID ROC AUC and gain with 95% intervals."""
    def sp(v, d=3):
        return f"{v[0]:.{d}f} ({v[1]:.{d}f}-{v[2]:.{d}f})"

    def ci(v):
        return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"
    lines = ["| method | FracAtlas CV | HBFMID ROC AUC [95% CI] | gain vs source-only [95% CI] | HBFMID sens. | "
             "HBFMID spec. | LORO shoulder / hip / leg / hand | LORO mean | embedding site sep. | offered | s |",
             "|" + "---|" * 11]
    for m, r in summary.items():
        loro = " / ".join(f"{r['loro_roc_auc'][p][0]:.2f}" for p in le.REGION_ORDER if p in r["loro_roc_auc"])
        auc = r["roc_auc"]
        lines.append(f"| {m} | {sp(r['fracatlas_cv_roc_auc'])} | {auc[0]:.3f} [{auc[1]:.2f}-{auc[2]:.2f}] | "
                     f"{'-' if m == BASELINE else ci(r['gain'])} | {sp(r['hbfmid_sensitivity'], 2)} | "
                     f"{sp(r['hbfmid_specificity'], 2)} | {loro} | {sp(r['loro_mean'])} | "
                     f"{sp(r['embedding_site_separability'])} | {'-' if m == BASELINE else r['offered']} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def calibrate_coral(cells: np.ndarray, cols: dict, folds) -> dict:
    """Deep CORAL's rule on FracAtlas CV fold 0 only: the classification and CORAL losses at the end of training."""
    tf = set_one_core()
    fa = np.flatnonzero(cols["source"] == "fracatlas")
    tr, te = fa[folds[0][0]], fa[folds[0][1]]
    head = Head(cells, "source-only")
    head.fit(tr, te, cols["y"], 0)
    zs, zt = head.predict(tr, head.embed), head.predict(te, head.embed)
    cls = float(np.mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=cols["y"][tr].astype(np.float32), logits=head.predict(tr)).numpy()))
    coral = float(np.sum((np.cov(zs, rowvar=False) - np.cov(zt, rowvar=False)) ** 2) / (4.0 * HEAD["k"] ** 2))
    return {"classification_loss": cls, "coral_loss": coral, "ratio": cls / coral}


def measure(args, cells: np.ndarray, cols: dict, folds) -> dict:
    """Every method x seed under local_evidence's protocol; partial results saved after each."""
    methods = [m for m in args.methods.split(",") if m]
    results, cache = {m: {"description": METHODS[m], "seeds": {}} for m in methods}, {}
    heads = {m: Head(cells, "dann" if m == "iw-dann" else m) for m in methods}
    for seed in HEAD["seeds"][args.skip_seeds:args.seeds]:
        for m in methods:
            scorer = AdaptScorer(heads[m], m, seed, cols, cache)
            r = le.run_protocol(scorer, cols, folds)
            r.update(hbfmid_scores=scorer.hbfmid_scores, embedding_site_separability=scorer.embedding_site_separability,
                     em_priors=scorer.priors)
            results[m]["seeds"][str(seed)] = r
            print(f"seed {seed} {m}: CV {r['fracatlas_cv_roc_auc']:.3f}  HBFMID {r['hbfmid']['roc_auc'][0]:.3f}  "
                  f"LORO {r['loro_mean']:.3f}  emb. site sep. {r['embedding_site_separability']:.3f}  "
                  f"{r['seconds']:.0f} s", flush=True)
            if args.out:
                args.out.with_suffix(".partial.json").write_text(json.dumps(results, default=float) + "\n")
    return results


def write_report(args, results: dict, cols: dict, seconds: float) -> None:
    """Summary, table and the results JSON (``--out``) from the per-seed results."""
    summary = summarize(results, cols)
    report = {"summary": summary, "results": results, "head": HEAD, "methods": METHODS,
              "rule": "offered only if the paired HBFMID ROC AUC gain's 95% interval is above 0, the LORO mean is "
                      "not below source-only's and FracAtlas CV loses at most 0.01 (means over seeds)",
              "n_rows": {s: int((cols["source"] == s).sum()) for s in le.SOURCES}, "limit": args.limit,
              "trained_on": "FracAtlas (use=1 rows) labeled + the scored set's images unlabeled",
              "scored_on": "HBFMID (all rows); FracAtlas regions held out; FracAtlas grouped 5-fold CV",
              "machine": describe_machine(), "seconds": seconds, "command": " ".join(sys.argv)}
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)


def smoke_settings() -> None:
    """--limit checks the plumbing, not the figures: 1 seed and fewer bootstrap resamples keep it under a minute."""
    HEAD["paired_resamples"] = 200
    full = le.bootstrap_ci
    le.bootstrap_ci = lambda *a, **k: full(*a, **{**k, "n_boot": 100})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--maps", type=Path, default=Path("/work/research/s27_maps"),
                    help="cached block5_conv3 maps (benchmarks/local_evidence.py --compute-maps)")
    ap.add_argument("--limit", type=int, default=0, help="a seeded random LIMIT rows per source (smoke test)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, help="how many of HEAD's seeds to run (default all; 1 with --limit)")
    ap.add_argument("--skip-seeds", type=int, default=0,
                    help="start at this index of HEAD's seeds (to add a seed to an earlier run; merge the .partial.json "
                         "files' per-seed results, then --summarize)")
    ap.add_argument("--epochs", type=int, help=f"override HEAD's {HEAD['epochs']} epochs (say so in the note)")
    ap.add_argument("--calibrate-coral", action="store_true", help="print Deep CORAL's loss ratio on fold 0, stop")
    ap.add_argument("--out", type=Path, help="results JSON (e.g. benchmarks/results/site_adversarial.json)")
    ap.add_argument("--table", type=Path, help="print the table and the rule from a results JSON")
    ap.add_argument("--summarize", type=Path, help="the report from an interrupted run's .partial.json")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())["summary"]))
        return
    if args.summarize:
        write_report(args, json.loads(args.summarize.read_text()), select_rows(le.load_maps(args.maps)[1], args.limit),
                     float("nan"))
        return
    if args.limit:
        smoke_settings()
    args.seeds = args.seeds or (1 if args.limit else len(HEAD["seeds"]))
    if args.epochs:
        HEAD["epochs"] = args.epochs
    t0 = time.perf_counter()
    cells, cols = load_cells(args.maps, args.limit)
    fa = np.flatnonzero(cols["source"] == "fracatlas")
    folds = grouped_folds(cols["y"][fa], cols["group"][fa], 5, seed=0)
    print(f"{len(cols['y'])} rows' cells loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.calibrate_coral:
        print(json.dumps(calibrate_coral(cells, cols, folds)))
        return
    results = measure(args, cells, cols, folds)
    write_report(args, results, cols, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
