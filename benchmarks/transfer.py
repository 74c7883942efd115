"""Counterfactual transfer on real cells: how far ``ScLDM.transfer`` moves held-out cells to another
cell type, and how much of each cell it keeps, at several strengths.

    python benchmarks/generation.py --data ../shared/data/pbmc3k.h5ad --methods ours real --out runs/bench
    python benchmarks/transfer.py --work runs/bench/pbmc3k            # the model trained above
    python benchmarks/transfer.py --work runs/bench/pbmc3k --source "CD4 T cells" --target "B cells"

The work directory is the generation benchmark's for one dataset: ``train.h5ad`` / ``heldout.h5ad`` (the
80/20 split on the training HVGs) and the trained ``ldm`` run. For a source and a target cell type
(default: the two most frequent held-out types), the held-out cells of the source type are transferred to
the target type with strength s in {0, 0.25, 0.5, 0.75, 1} (the run's guidance and sampler, seed 0):

- **target fraction**: the share of transferred cells that a kNN classifier (k = 15) trained on the
  training cells, in a representation fitted on them (``scldm_scale.eval``: normalize, log1p, HVGs, 30
  PCs), assigns to the target type; next to it, the same classifier on the untouched source cells and on
  generated target cells (``generate``, the reference point of a full move);
- **identity kept**: the share of transferred cells whose nearest source cell (in the same PCA space) is
  the cell they came from (chance = 1 / number of source cells), and the mean correlation of a transferred
  cell's log-normalized profile with its own source cell minus that with the other source cells.

Prints a table; the last line is one JSON object ``{"strengths": [...], "target_fraction": [...],
"self_nn": [...], "own_corr_gap": [...], ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def log(msg: str) -> None:
    print(f"[transfer] {msg}", file=sys.stderr, flush=True)


def lognorm(x) -> np.ndarray:
    from scldm_scale.eval.representation import log_normalize

    out = log_normalize(x)
    return out.toarray() if hasattr(out, "toarray") else np.asarray(out)


def identity_scores(source_x, moved_x, rep) -> tuple[float, float]:
    """(share whose nearest source cell is their own, mean own-minus-other profile correlation)."""
    from sklearn.neighbors import NearestNeighbors

    src_np, mov_np = rep.transform(source_x), rep.transform(moved_x)
    nn = NearestNeighbors(n_neighbors=1).fit(src_np)
    self_nn = float(np.mean(nn.kneighbors(mov_np, return_distance=False)[:, 0] == np.arange(len(mov_np))))
    a, b = lognorm(source_x)[:, rep.hvg_idx_h], lognorm(moved_x)[:, rep.hvg_idx_h]
    a = (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-9)
    b = (b - b.mean(1, keepdims=True)) / (b.std(1, keepdims=True) + 1e-9)
    corr = b @ a.T / a.shape[1]  # (moved, source)
    own = np.diag(corr)
    other = (corr.sum(1) - own) / max(corr.shape[1] - 1, 1)
    return self_nn, float(np.mean(own - other))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the generation benchmark's work dir of one dataset")
    p.add_argument("--label", default="cell_type", help="obs column with the cell types")
    p.add_argument("--source", help="cell type to move (default: the most frequent held-out type)")
    p.add_argument("--target", help="cell type to move to (default: the second most frequent)")
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import anndata as ad
    from sklearn.neighbors import KNeighborsClassifier

    from scldm_scale.api import ScLDM
    from scldm_scale.eval.representation import fit_representation

    for need in ("train.h5ad", "heldout.h5ad", "ldm/export/model.safetensors"):
        if not (args.work / need).is_file():
            print(f"error: {args.work / need} is missing; run benchmarks/generation.py --methods ours --out DIR "
                  "first and pass --work DIR/<dataset>", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    train, heldout = ad.read_h5ad(args.work / "train.h5ad"), ad.read_h5ad(args.work / "heldout.h5ad")
    counts = heldout.obs[args.label].astype(str).value_counts()
    source, target = args.source or counts.index[0], args.target or counts.index[1]
    cells = heldout[heldout.obs[args.label].astype(str) == source].copy()
    if cells.n_obs < 2:
        print(f"error: {source!r}: {cells.n_obs} held-out cells; choose a --source with more", file=sys.stderr)
        return 2
    model = ScLDM.load(args.work / "ldm", device="cpu")
    genes = model.gene_ids
    rep = fit_representation(train[:, genes].X, seed=args.seed)
    labels_train = train.obs[args.label].astype(str).to_numpy()
    knn = KNeighborsClassifier(n_neighbors=15).fit(rep.transform(train[:, genes].X), labels_train)
    log(f"{args.work.name}: {cells.n_obs} held-out {source!r} cells -> {target!r}; model {model}")

    def target_fraction(x) -> float:
        return float(np.mean(knn.predict(rep.transform(x)) == target))

    source_x = cells[:, genes].X
    rows = []
    for s in args.strengths:
        moved = model.transfer(cells, to={args.label: target}, strength=s, seed=args.seed)
        self_nn, gap = identity_scores(source_x, moved.X, rep)
        rows.append({"strength": s, "target_fraction": target_fraction(moved.X), "self_nn": self_nn,
                     "own_corr_gap": gap})
        log(f"strength {s}: {rows[-1]}")
    generated = model.generate({args.label: {target: cells.n_obs}}, seed=args.seed)
    reference = {"source cells": target_fraction(source_x), "generated target": target_fraction(generated.X)}

    print(f"{args.work.name}: {cells.n_obs} held-out '{source}' cells transferred to '{target}' "
          f"(kNN classifier on {train.n_obs} training cells; chance of self-NN = {1 / cells.n_obs:.4f})")
    print(f"{'strength':>8} {'target fraction':>16} {'self-NN':>8} {'own corr gap':>13}")
    for r in rows:
        print(f"{r['strength']:>8.2f} {r['target_fraction']:>16.3f} {r['self_nn']:>8.3f} {r['own_corr_gap']:>13.3f}")
    print(f"target fraction of the untouched source cells: {reference['source cells']:.3f}; "
          f"of {cells.n_obs} generated '{target}' cells: {reference['generated target']:.3f}")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"dataset": args.work.name, "source": source, "target": target, "n_cells": cells.n_obs,
                      "strengths": [r["strength"] for r in rows],
                      "target_fraction": [round(r["target_fraction"], 4) for r in rows],
                      "self_nn": [round(r["self_nn"], 4) for r in rows],
                      "own_corr_gap": [round(r["own_corr_gap"], 4) for r in rows],
                      "source_target_fraction": round(reference["source cells"], 4),
                      "generated_target_fraction": round(reference["generated target"], 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
