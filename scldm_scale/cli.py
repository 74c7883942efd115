"""`scldm-scale` command line: prepare, train, encode, generate, evaluate, export, sizes, demo.

Training is launched by torchrun / the deepspeed launcher (one process per device) or runs as a
single process::

    torchrun --standalone --nproc_per_node=2 -m scldm_scale.cli train recipes/quickstart.yaml train.max_steps=100

Errors in the user's input print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from scldm_scale.errors import ScldmError


def _split_recipes(items: Sequence[str]) -> tuple[list[str], list[str]]:
    recipes = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return recipes, overrides


def cmd_prepare(args: argparse.Namespace) -> None:
    *inputs, out = args.paths
    if args.kind == "synthetic":
        from scldm_scale.data.synthetic import write_synthetic_atlas

        if inputs:
            raise ScldmError(f"prepare synthetic takes one OUT directory, got {len(args.paths)} paths: {args.paths}")
        meta = write_synthetic_atlas(out, n_cells=args.cells, n_genes=args.genes, n_shards=args.shards,
                                     n_cell_types=args.cell_types,
                                     heldout_fraction=0.1 if args.heldout_fraction is None else args.heldout_fraction,
                                     seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
        print(f"wrote {meta['n_cells']} cells x {meta['n_genes']} genes in {len(meta['shards'])} shards to {out}")
        return
    from scldm_scale.data import harmonize

    if not inputs:
        raise ScldmError(f"prepare {args.kind}: give the input .h5ad files, then OUT (got only {out!r})")
    if args.kind == "soma" and args.shard_size is not None:
        raise ScldmError("--shard-size applies to `prepare h5ad`; a SOMA experiment has no shards, drop it")
    common = dict(labels=args.labels, vocab_path=args.vocab, min_files=args.min_files,
                  heldout_fraction=args.heldout_fraction or 0.0, seed=args.seed, overwrite=args.overwrite,
                  require_labels=args.require_labels, progress=not args.quiet)
    if args.kind == "h5ad":
        res = harmonize.prepare_h5ad(inputs, out, shard_size=args.shard_size or 10_000, **common)
    else:
        res = harmonize.prepare_soma(inputs, out, **common)
    meta = res.meta
    if res.up_to_date:
        print(f"up to date: {res.out} ({meta['n_cells']} cells x {meta['n_genes']} genes; same inputs and options)")
        return
    where = f"{len(meta['shards'])} shards" if args.kind == "h5ad" else "a SOMA experiment"
    held = f" (+ {meta['n_heldout']} held out in {meta['heldout']['file']})" if meta.get("heldout") else ""
    print(f"wrote {meta['n_cells']} cells x {meta['n_genes']} genes from {len(meta['inputs'])} files in {where} "
          f"to {res.out}{held}")


def cmd_train(args: argparse.Namespace) -> None:
    from scldm_scale.config import load_config
    from scldm_scale.train.trainer import train

    recipes, overrides = _split_recipes(args.items)
    cfg = load_config(recipes, overrides)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {out}")


def cmd_encode(args: argparse.Namespace) -> None:
    from scldm_scale.tasks.encode import encode

    out = encode(args.vae_run, data_path=args.data or "", out_dir=args.out or "", batch_size=args.batch_size,
                 progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"latents written to {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.tasks.generate import conditions_matching, generate, parse_condition, read_conditions_file
    from scldm_scale.train.export import export_path

    conditions = [parse_condition(c, args.n_cells or 100) for c in args.condition or []]
    if args.conditions:
        conditions += read_conditions_file(args.conditions)
    if args.match:
        attributes = LabelTables.load(export_path(args.ldm_run) / "labels.json").attributes
        conditions += conditions_matching(args.match, attributes, args.n_cells, args.seed)
    guidance = {}
    for item in args.guidance or []:
        key, _, value = item.partition("=")
        try:
            guidance[key] = float(value)
        except ValueError:
            raise ScldmError(f"--guidance '{item}': expected attribute=weight (e.g. cell_type=2.0)") from None
    out = generate(args.ldm_run, conditions, args.out, guidance=guidance, num_steps=args.steps,
                   sampler=args.sampler, diffusion=args.diffusion, guidance_interval=args.guidance_interval,
                   seed=args.seed, batch_size=args.batch_size,
                   use_ema=not args.no_ema, progress=not args.quiet)
    print(f"wrote {sum(n for _, n in conditions)} cells to {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    import anndata as ad

    from scldm_scale.eval.evaluate import evaluate

    for path in (args.reference, args.generated):
        if not os.path.isfile(path):
            raise ScldmError(f"{path}: file not found")
    metrics = evaluate(ad.read_h5ad(args.reference), ad.read_h5ad(args.generated), label_keys=args.labels,
                       out_json=args.out, report_path=args.report, seed=args.seed)
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    print(json.dumps(summary, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from scldm_scale.train.checkpoint import export_run

    print(f"exported to {export_run(args.run)}")


def cmd_sizes(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from scldm_scale.config import DecodeGenes, load_config, to_object
    from scldm_scale.nn.sizes import format_count, size_table

    recipes, overrides = _split_recipes(args.items)
    cfg = to_object(load_config(recipes, overrides))
    try:
        cards = [int(c) for c in args.labels.split(",") if c.strip()]
    except ValueError:
        raise ScldmError(f"--labels {args.labels!r}: expected comma-separated category counts, e.g. 8,4,6") from None
    if args.genes < 1 or args.tokens < 0 or args.genes < args.tokens:
        raise ScldmError(f"--genes {args.genes} / --tokens {args.tokens}: need genes >= 1 and 0 <= tokens <= genes")
    decode = DecodeGenes(args.decode or cfg.train.decode_genes)
    zeros = cfg.train.n_zero_genes if args.zero_genes is None else args.zero_genes
    decoded = args.genes if decode == DecodeGenes.ALL else min(args.tokens + zeros, args.genes)
    rows = size_table(args.genes, args.tokens, decoded, cards, base_vae=cfg.vae, base_dit=cfg.dit)
    if args.json:
        print(json.dumps({"genes": args.genes, "tokens_per_cell": args.tokens, "decoded_per_cell": decoded,
                          "label_cardinalities": cards, "presets": [asdict(r) for r in rows]}))
        return
    print(f"{args.genes} genes, {args.tokens} expressed-gene tokens per cell, {decoded} decoded genes per cell "
          f"({decode.value}); DiT labels {cards}; FLOPs = forward + backward per cell")
    header = f"{'stage':5s} {'preset':7s} {'width':>5s} {'blocks':>6s} {'heads':>5s} {'latent':>7s} {'params':>8s} " \
             f"{'FLOPs/cell':>10s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.stage:5s} {r.preset:7s} {r.d_model:5d} {r.depth:>6s} {r.n_heads:5d} {r.latent:>7s} "
              f"{format_count(r.params):>8s} {format_count(r.train_flops_per_cell):>10s}")


def cmd_demo(args: argparse.Namespace) -> None:
    from scldm_scale.tasks.demo import run_demo

    ok = run_demo(args.out, n_cells=args.cells, n_genes=args.genes, nproc=args.nproc, recipe=args.recipe,
                  overrides=args.items)
    if args.strict and not ok:
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scldm-scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare", help="write training data: a synthetic atlas, or h5ad files harmonized into shards / SOMA",
        description="prepare synthetic OUT | prepare h5ad IN.h5ad... OUT --shard-size S | prepare soma IN.h5ad... OUT",
    )
    p.add_argument("kind", choices=["synthetic", "h5ad", "soma"])
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="synthetic: OUT; h5ad/soma: the input .h5ad files (or folders of them), then OUT")
    p.add_argument("--cells", type=int, default=10_000, help="synthetic: total cells")
    p.add_argument("--genes", type=int, default=2_000, help="synthetic: genes")
    p.add_argument("--shards", type=int, default=4, help="synthetic: number of shards")
    p.add_argument("--cell-types", type=int, default=8, help="synthetic: cell types")
    p.add_argument("--shard-size", type=int, help="h5ad: cells per output shard (default 10000)")
    p.add_argument("--labels", nargs="+", default=["cell_type"], metavar="COLUMN",
                   help="h5ad/soma: obs columns to harmonize into label tables (default: cell_type)")
    p.add_argument("--vocab", help="h5ad/soma: use this vocab.json instead of the union of the inputs' genes")
    p.add_argument("--min-files", type=int, default=1,
                   help="h5ad/soma: keep genes present in at least N inputs (built vocabulary only)")
    p.add_argument("--require-labels", action="store_true",
                   help="h5ad/soma: a label column missing from an input is an error (default: 'unknown')")
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="fraction of cells written to heldout.h5ad (default: 0.1 synthetic, 0 h5ad/soma)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a stage (run.stage=vae|ldm) from recipes and key=value overrides")
    p.add_argument("items", nargs="+", metavar="RECIPE.yaml|key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="write the latents of a dataset with a trained VAE (for stage 2)")
    p.add_argument("--vae-run", required=True)
    p.add_argument("--data", help="h5ad shards (default: the VAE run's data.path)")
    p.add_argument("--out", help="latent cache directory (default: <vae-run>/latents)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("generate", help="generate cells for requested conditions -> .h5ad")
    p.add_argument("--ldm-run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--condition", action="append", help="attr=value[,attr=value][:N] (repeatable)")
    p.add_argument("--conditions", help="CSV/YAML of conditions with an n_cells column")
    p.add_argument("--match", help="reproduce the label distribution of this reference .h5ad")
    p.add_argument("--n-cells", type=int, help="cells per --condition without :N, or total for --match")
    p.add_argument("--guidance", action="append", help="attr=weight (repeatable); 1 = plain conditional")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at flow times LO <= t <= HI (t=0 noise, t=1 data; default: the recipe's)")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=["euler", "heun", "adaptive", "sde"])
    p.add_argument("--diffusion", type=float, help="noise scale of the sde sampler (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="generated vs held-out real cells -> JSON (+ report)")
    p.add_argument("--reference", required=True)
    p.add_argument("--generated", required=True)
    p.add_argument("--labels", nargs="*", default=["cell_type"])
    p.add_argument("--out", required=True)
    p.add_argument("--report")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="consolidate a run's latest checkpoint into <run>/export (safetensors)")
    p.add_argument("run")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "sizes", help="model presets: parameters and FLOPs per cell, without training",
        description="Table of the VAE and DiT presets (vae_preset / dit_preset) with their parameter counts and "
                    "forward+backward FLOPs per cell, for a stated vocabulary and tokens per cell. Example: "
                    "scldm-scale sizes --genes 36000 --tokens 2000 --labels 600,60,1000",
    )
    p.add_argument("--genes", type=int, default=20_000,
                   help="gene vocabulary size (default 20000), e.g. --genes 36000")
    p.add_argument("--tokens", type=int, default=1_000,
                   help="expressed-gene tokens per cell (at most data.max_genes; default 1000), e.g. --tokens 2000")
    p.add_argument("--decode", choices=["sampled", "all"],
                   help="genes decoded per cell in training: expressed + --zero-genes sampled zeros, or all "
                        "(default: the recipe's train.decode_genes), e.g. --decode all")
    p.add_argument("--zero-genes", type=int,
                   help="sampled unexpressed genes per cell (default: the recipe's train.n_zero_genes), e.g. "
                        "--zero-genes 512")
    p.add_argument("--labels", default="10",
                   help="category counts of the DiT's label attributes, comma-separated (default 10), e.g. "
                        "--labels 600,60,1000")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table, e.g. --json")
    p.add_argument("items", nargs="*", metavar="RECIPE.yaml|key=value",
                   help="recipes / overrides whose vae.* and dit.* settings (MLP ratios, value embedding, ...) the "
                        "presets start from, e.g. recipes/quickstart.yaml vae.unpool_mlp_ratio=1.0")
    p.set_defaults(func=cmd_sizes)

    p = sub.add_parser("demo", help="synthetic atlas -> VAE -> latents -> LDM -> generate -> evaluate")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--cells", type=int, default=8000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--strict", action="store_true", help="exit 1 when a quality check fails")
    p.add_argument("items", nargs="*", metavar="key=value", help="overrides for both stages")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ScldmError as err:
        if os.environ.get("SCLDM_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
