"""Driver of the elastic-resume tests: sources' training streams on W gloo ranks, saved for the parent.

A *stage* runs in every rank (``run_distributed``): for each named source it takes ``steps``
training batches with ``workers`` dataloader workers (optionally after loading a saved
position, optionally saving the position after some steps), then - last, since TileDB is not
fork-safe and in-process reads must come after the forked workers - the rank's share of the
inference pass. The parent rebuilds the global stream from the per-rank batches: step-major,
rank-minor (rank ``r`` of step ``t`` holds stream cells ``t * W * b + r * b + [0, b)``).
"""

from __future__ import annotations

import json
import os

import numpy as np

from _batches import fingerprint

INFERENCE_BATCH = 40


def make_source(spec: dict):
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.loader import build_source
    from scldm_scale.data.vocab import GeneVocab

    vocab = GeneVocab.load(spec["vocab"]) if spec.get("vocab") else None
    labels = LabelTables.load(spec["labels"]) if spec.get("labels") else None
    return build_source(spec["cfg"], vocab, labels, validate=False)


def stream_ids(source, n: int) -> np.ndarray:
    """Cell ids of the first ``n`` cells of a token source's own stream (no X read)."""
    positions = source.stream_positions(0, n)
    return source.joinids_n[positions] if hasattr(source, "joinids_n") else positions


def stage(rank: int, world: int, specs: dict, out: str, tag: str, plan: dict) -> None:
    """``plan[name] = {"steps", "workers", "save_at" (steps, or 0), "resume" (bool)}``."""
    import torch.distributed as dist

    assert dist.get_world_size() == world
    res = {}
    for name, spec in specs.items():
        p = plan[name]
        source = make_source(spec)
        if p["resume"]:
            with open(os.path.join(out, f"{name}_state_rank0.json")) as f:
                source.load_state_dict(json.load(f))
        it = source.batches(num_workers=p["workers"])
        cells, prints = [], []
        for t in range(p["steps"]):
            batch = next(it)
            cells.append(batch["cell_index_n"].numpy())
            prints.append(fingerprint(batch))
            if t + 1 == p["save_at"]:
                with open(os.path.join(out, f"{name}_state_rank{rank}.json"), "w") as f:
                    json.dump(source.state_dict(), f)
        del it
        res[f"{name}_cells"], res[f"{name}_fp"] = np.stack(cells), np.stack(prints)
    for name, spec in specs.items():  # in-process reads last
        source = make_source(spec)
        batches = list(source.inference_batches(rank, world, INFERENCE_BATCH))
        res[f"{name}_inference"] = (np.concatenate([b["cell_index_n"].numpy() for b in batches]) if batches
                                    else np.zeros(0, dtype=np.int64))
        res[f"{name}_inference_sizes"] = np.array([len(b["cell_index_n"]) for b in batches], dtype=np.int64)
        assert source.inference_cells(rank, world) == len(res[f"{name}_inference"])
        if hasattr(source, "choices"):  # a mixture: its draw plan and each member's own stream
            res[f"{name}_choices"] = np.concatenate([source.choices(e) for e in range(3)])
            for s, member in enumerate(source.sources):
                res[f"{name}_member{s}"] = stream_ids(member, 3 * member.cells_per_epoch)
    np.savez(os.path.join(out, f"{tag}_rank{rank}.npz"), **res)


def load(out: str, tag: str, world: int) -> list[dict]:
    return [dict(np.load(os.path.join(out, f"{tag}_rank{r}.npz"))) for r in range(world)]


def global_stream(ranks: list[dict], key: str) -> np.ndarray:
    """The stream of cells (or fingerprints) in stream order from each rank's (steps, b) array."""
    return np.stack([r[key] for r in ranks], axis=1).reshape(-1)


def saved_state(out: str, name: str, world: int) -> dict:
    states = []
    for r in range(world):
        with open(os.path.join(out, f"{name}_state_rank{r}.json")) as f:
            states.append(json.load(f))
    assert all(s == states[0] for s in states), states  # every rank holds the same position
    return states[0]
