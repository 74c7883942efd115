"""`scldm-scale`: prepare data, train both stages, encode, generate, transfer, evaluate, export, sizes,
sweep, report, recipes, demo.

Training is launched by torchrun / the deepspeed launcher (one process per device) or runs as a
single process::

    torchrun --standalone --nproc_per_node=2 -m scldm_scale.cli train recipes/quickstart.yaml train.max_steps=100

Errors in the user's input print one line (``error: ...``) and exit with status 2.

Each command imports what it runs inside its ``cmd_*`` function, so that ``--help`` and ``--version``
answer without loading torch, DeepSpeed or the data stack.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Sequence

from scldm_scale import __version__
from scldm_scale.errors import ScldmError


def split_recipes(items: Sequence[str]) -> tuple[list[str], list[str]]:
    recipes = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return recipes, overrides


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _key_values(items: Sequence[str] | None, flag: str, example: str, cast=str) -> dict:
    """``["a=1", "b=2"]`` -> ``{"a": cast("1"), ...}``; a malformed item names ``flag`` and an example."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key.strip()] = cast(value.strip())
        except ValueError:
            raise ScldmError(f"{flag} '{item}': expected attribute=value (e.g. {flag} {example})") from None
    return out


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


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
                  counts=args.counts, require_labels=args.require_labels, progress=not args.quiet)
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
    recipes, overrides = split_recipes(args.items)
    if args.dry_run:
        from scldm_scale.scaling.plan import dry_run

        print(dry_run(recipes, overrides))
        return
    from scldm_scale.config import load_config

    cfg = load_config(recipes, overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return
    from scldm_scale.train.trainer import train

    out = train(cfg)
    if _is_rank0():
        print(f"run directory: {out}")


def cmd_encode(args: argparse.Namespace) -> None:
    if args.h5ad:
        import anndata as ad

        from scldm_scale.api.model import ScLDM
        from scldm_scale.io import write_h5ad_atomic

        if not args.out:
            raise ScldmError("--h5ad needs --out OUT.h5ad (the cells with their latents in obsm['X_scldm'])")
        if not os.path.isfile(args.h5ad):
            raise ScldmError(f"{args.h5ad}: file not found")
        model = ScLDM.load(args.vae_run, device=args.device)
        adata = model.encode(ad.read_h5ad(args.h5ad), layer=args.layer, gene_key=args.gene_key,
                             batch_size=args.batch_size, progress=not args.quiet)
        print(f"wrote {adata.n_obs} cells with obsm['X_scldm'] to {write_h5ad_atomic(adata, args.out)}")
        return
    from scldm_scale import comm
    from scldm_scale.api.latents import encode_dataset

    overrides = ([f"data.path={args.data}"] if args.data else []) + list(args.items)
    out = encode_dataset(args.vae_run, overrides, out_dir=args.out or "", batch_size=args.batch_size,
                         device=args.device, progress=not args.quiet)
    if _is_rank0():
        print(f"latents written to {out}")
    comm.destroy()


def _sampler_overrides(args: argparse.Namespace) -> dict:
    return dict(guidance=_key_values(args.guidance, "--guidance", "cell_type=2.0", float) or None,
                guidance_interval=args.guidance_interval, steps=args.steps, sampler=args.sampler,
                diffusion=args.diffusion)


def cmd_generate(args: argparse.Namespace) -> None:
    from scldm_scale import comm
    from scldm_scale.api.conditions import parse_condition, read_conditions_file, read_obs
    from scldm_scale.api.model import ScLDM
    from scldm_scale.io import write_h5ad_atomic

    comm.init_distributed()
    conditions = [parse_condition(c, args.n_cells or 100) for c in args.condition or []]
    if args.conditions:
        conditions += read_conditions_file(args.conditions)
    model = ScLDM.load(args.ldm_run, device=args.device, ema=not args.no_ema)
    obs = read_obs(args.match) if args.match else None
    t0 = time.perf_counter()
    gen = model.generate(conditions, obs=obs, n_cells=args.n_cells if args.match else None, seed=args.seed,
                         batch_size=args.batch_size, progress=not args.quiet, **_sampler_overrides(args))
    seconds = time.perf_counter() - t0

    def write() -> None:  # rank 0 holds the gathered cells; a failed write fails every rank
        write_h5ad_atomic(gen, args.out)
        print(f"wrote {gen.n_obs} cells to {args.out} (generated in {seconds:.2f} s, "
              f"{gen.n_obs / max(seconds, 1e-9):,.0f} cells/s)")

    comm.on_rank0(write)
    comm.destroy()


def cmd_transfer(args: argparse.Namespace) -> None:
    import anndata as ad

    from scldm_scale import comm
    from scldm_scale.api.model import ScLDM
    from scldm_scale.io import write_h5ad_atomic

    comm.init_distributed()
    to = _key_values(args.to, "--to", "cell_type='B cell'")
    if not to:
        raise ScldmError("--to is required: the new condition, e.g. --to cell_type='B cell'")
    if not os.path.isfile(args.data):
        raise ScldmError(f"{args.data}: file not found")
    model = ScLDM.load(args.ldm_run, device=args.device, ema=not args.no_ema)
    moved = model.transfer(ad.read_h5ad(args.data), to=to, strength=args.strength, layer=args.layer,
                           gene_key=args.gene_key, seed=args.seed, batch_size=args.batch_size,
                           progress=not args.quiet, **_sampler_overrides(args))
    def write() -> None:
        write_h5ad_atomic(moved, args.out)
        print(f"wrote {moved.n_obs} transferred cells to {args.out}")

    comm.on_rank0(write)
    comm.destroy()


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
    from scldm_scale.train.trainer import export_run

    print(f"exported to {export_run(args.run)}")


def cmd_recipes(args: argparse.Namespace) -> None:
    from scldm_scale.config import recipe_names, recipe_summary, resolve_recipe

    if args.name:
        print(resolve_recipe(args.name).read_text(), end="")
        return
    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {recipe_summary(resolve_recipe(name))}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from scldm_scale.scaling.sweep import sweep

    grids, overrides = split_recipes(args.items)
    if not grids:
        raise ScldmError("sweep: give at least one grid YAML (e.g. recipes/scaling/width.yaml)")
    status = sweep(grids, args.out, launcher=args.launcher, nproc=args.nproc_per_node, extra=overrides, only=args.run,
                   time_limit=args.time, sbatch_options=args.sbatch_option or [], python=args.python)
    if status:
        sys.exit(status)


def cmd_report(args: argparse.Namespace) -> None:
    from scldm_scale.scaling.report import report

    path = report(args.dirs, out=args.out, wandb_csv=args.wandb_csv or [], n_boot=args.bootstrap, level=args.level,
                  seed=args.seed, method=args.bootstrap_method)
    print(f"report: {path}")


def cmd_sizes(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from scldm_scale.config import DecodeGenes, load_config, to_object
    from scldm_scale.nn.sizes import format_count, size_table

    recipes, overrides = split_recipes(args.items)
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
    from scldm_scale.demo import run_demo

    ok = run_demo(args.out, n_cells=args.cells, n_genes=args.genes, nproc=args.nproc, recipe=args.recipe,
                  overrides=args.items)
    if args.strict and not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples kept as written."""


def _sub(sub, name: str, help: str, examples: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, epilog=f"examples:\n{examples}",
                          formatter_class=_Formatter)


def _add_sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", action="append", metavar="ATTR=W",
                   help="classifier-free guidance weight per attribute, repeatable; 1 = plain conditional "
                        "(e.g. --guidance cell_type=2.0; default: the run's flow.guidance)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at flow times LO <= t <= HI, t=0 noise, t=1 data "
                        "(e.g. --guidance-interval 0.3 0.8; default: the run's)")
    p.add_argument("--steps", type=int, help="sampler steps (e.g. --steps 30; default: the run's flow.num_steps)")
    p.add_argument("--sampler", choices=["euler", "heun", "adaptive", "sde"],  # SamplerKind (kept light: no torch)
                   help="ODE/SDE solver (e.g. --sampler heun; default: the run's flow.sampler)")
    p.add_argument("--diffusion", type=float,
                   help="noise scale of the sde sampler (e.g. --sampler sde --diffusion 1.0; default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and NB draws (e.g. --seed 1)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="cells per block; results depend on the seed and this, not on devices or ranks "
                        "(e.g. --batch-size 1024)")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto",
                   help="auto (this rank's GPU when there is one), cpu, cuda or cuda:I (e.g. --device cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scldm-scale", description=__doc__.splitlines()[0], formatter_class=_Formatter,
        epilog="examples:\n  scldm-scale demo --out runs/demo\n  scldm-scale train recipes/quickstart.yaml --print-config\n"
               "  scldm-scale generate --help\nrun `scldm-scale COMMAND --help` for each command's options")
    parser.add_argument("--version", action="version", version=f"scldm-scale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "prepare", "write training data: a synthetic atlas, or h5ad files harmonized into shards / SOMA",
             "  scldm-scale prepare synthetic runs/atlas --cells 6000 --genes 1000 --heldout-fraction 0.2\n"
             "  scldm-scale prepare h5ad a.h5ad b.h5ad more/ data/atlas --shard-size 10000 --labels cell_type tissue\n"
             "  scldm-scale prepare soma a.h5ad b.h5ad data/atlas.soma --labels cell_type")
    p.add_argument("kind", choices=["synthetic", "h5ad", "soma"],
                   help="synthetic: a simulated atlas; h5ad: shards for training; soma: one TileDB-SOMA experiment")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="synthetic: OUT; h5ad/soma: the input .h5ad files (or folders of them), then OUT "
                        "(e.g. a.h5ad b.h5ad data/atlas)")
    p.add_argument("--cells", type=int, default=10_000, help="synthetic: total cells (e.g. --cells 100000)")
    p.add_argument("--genes", type=int, default=2_000, help="synthetic: genes (e.g. --genes 20000)")
    p.add_argument("--shards", type=int, default=4, help="synthetic: number of shards (e.g. --shards 8)")
    p.add_argument("--cell-types", type=int, default=8, help="synthetic: cell types (e.g. --cell-types 20)")
    p.add_argument("--shard-size", type=int,
                   help="h5ad: cells per output shard (default 10000); cells are written in a seeded random order "
                        "across all inputs (--seed) (e.g. --shard-size 50000)")
    p.add_argument("--labels", nargs="+", default=["cell_type"], metavar="COLUMN",
                   help="h5ad/soma: obs columns harmonized into label tables (default: cell_type); a column no "
                        "input has is an error (e.g. --labels cell_type tissue donor)")
    p.add_argument("--counts", default="auto", metavar="auto|X|raw|layer:NAME",
                   help="h5ad/soma: where the inputs keep raw integer counts: X, .raw.X (CELLxGENE files) or a "
                        "layer; auto (default) takes the first integer-valued of X, .raw.X, layers['counts'] and "
                        "logs which (e.g. --counts raw or --counts layer:counts)")
    p.add_argument("--vocab", help="h5ad/soma: use this vocab.json instead of the union of the inputs' genes "
                                   "(e.g. --vocab runs/atlas/vocab.json)")
    p.add_argument("--min-files", type=int, default=1,
                   help="h5ad/soma: keep genes present in at least N inputs, built vocabulary only (e.g. --min-files 2)")
    p.add_argument("--require-labels", action="store_true",
                   help="h5ad/soma: a label column missing from an input is an error (default: 'unknown' there)")
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="fraction of cells written to heldout.h5ad; default 0.1 synthetic, 0 h5ad/soma "
                        "(e.g. --heldout-fraction 0.05)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic atlas, the held-out cells and the global cell order (e.g. --seed 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_prepare)

    p = _sub(sub, "train", "train a stage (run.stage=vae|ldm) from recipes and key=value overrides",
             "  torchrun --standalone --nproc_per_node=2 -m scldm_scale.cli train recipes/quickstart.yaml\n"
             "  scldm-scale train recipes/quickstart.yaml recipes/quickstart_ldm.yaml train.max_steps=2000\n"
             "  scldm-scale train recipes/quickstart.yaml run.resume=true\n"
             "  scldm-scale train recipes/quickstart.yaml data.batch_size=128 --print-config\n"
             "  scldm-scale train recipes/census.yaml --dry-run",
             description="Train a stage. Recipes merge left to right, then key=value overrides. A fresh run "
                         "into a run directory that holds a run is an error: pass run.resume=true to continue "
                         "it or run.overwrite=true to replace it.")
    p.add_argument("items", nargs="+", metavar="RECIPE.yaml|key=value",
                   help="recipes and overrides (e.g. recipes/quickstart.yaml train.max_steps=100)")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged config (recipes, presets, overrides) and exit without training; "
                        "values from the data are filled at start-up")
    p.add_argument("--dry-run", action="store_true",
                   help="read no data and train nothing: resolve the recipes for the data and GPUs of their plan: "
                        "section and print the run plan (sizes, parameters, FLOPs per cell, steps, cells, GPU-hours "
                        "at plan.mfu, data rate, disk) (e.g. scldm-scale train recipes/census.yaml --dry-run)")
    p.set_defaults(func=cmd_train)

    p = _sub(sub, "encode", "latents of a dataset with a trained VAE: a latent cache for stage 2, or obsm of an .h5ad",
             "  torchrun --standalone --nproc_per_node=2 -m scldm_scale.cli encode --vae-run runs/quickstart-vae\n"
             "  scldm-scale encode --vae-run runs/my-vae data.source=soma data.path=atlas.soma\n"
             "  scldm-scale encode --vae-run runs/quickstart-vae --h5ad cells.h5ad --out cells_latent.h5ad",
             description="Encode with a trained VAE: every cell of its training data (or of the data the data.* "
                         "overrides name: any source, h5ad shards, SOMA / Census, mixture) into a latent cache "
                         "for stage 2, split over the ranks under torchrun; or one .h5ad into obsm['X_scldm'].")
    p.add_argument("--vae-run", required=True, help="run directory of the trained VAE (e.g. --vae-run runs/my-vae)")
    p.add_argument("--data", help="shorthand for data.path=...: the data to encode into the latent cache; "
                                  "default: the VAE run's data (e.g. --data runs/atlas)")
    p.add_argument("items", nargs="*", metavar="data.key=value",
                   help="overrides of the VAE run's data section (e.g. data.source=soma data.path=atlas.soma)")
    p.add_argument("--h5ad", help="encode this .h5ad instead and write it to --out with obsm['X_scldm'] "
                                  "(e.g. --h5ad pbmc.h5ad)")
    p.add_argument("--layer", help="with --h5ad: where the raw counts are: raw (adata.raw.X) or a layer name; "
                                   "default X (e.g. --layer counts)")
    p.add_argument("--gene-key", help="with --h5ad: var column with gene ids or symbols; default: the best "
                                      "match (e.g. --gene-key feature_name)")
    p.add_argument("--out", help="latent cache directory (default <vae-run>/latents), or the output .h5ad with "
                                 "--h5ad (e.g. --out runs/my-vae/latents)")
    p.add_argument("--batch-size", type=int, default=256, help="cells per batch (e.g. --batch-size 1024)")
    p.add_argument("--device", default="auto",
                   help="auto (this rank's GPU when there is one), cpu, cuda or cuda:I (e.g. --device cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_encode)

    p = _sub(sub, "generate", "generate cells for requested conditions -> .h5ad (counts in X, conditions in obs)",
             "  scldm-scale generate --ldm-run runs/my-ldm --out gen.h5ad --condition 'cell_type=B cell:500'\n"
             "  scldm-scale generate --ldm-run runs/my-ldm --out gen.h5ad --match heldout.h5ad --guidance cell_type=2\n"
             "  torchrun --nproc_per_node=8 -m scldm_scale.cli generate --ldm-run runs/my-ldm --out gen.h5ad "
             "--conditions conditions.csv",
             description="Generate cells. Under torchrun the cells are split over the ranks and rank 0 writes one "
                         "file: the same cells as one process with the same seed and batch size.")
    p.add_argument("--ldm-run", required=True, help="run directory of the trained LDM (e.g. --ldm-run runs/my-ldm)")
    p.add_argument("--out", required=True, help="output .h5ad (e.g. --out generated.h5ad)")
    p.add_argument("--condition", action="append", metavar="ATTR=VALUE[,ATTR=VALUE][:N]",
                   help="a condition and its number of cells, repeatable (e.g. --condition 'cell_type=B cell,tissue=blood:200')")
    p.add_argument("--conditions", help="CSV or YAML of conditions with an n_cells column (e.g. --conditions conditions.csv)")
    p.add_argument("--match", help="reproduce the label distribution of this .h5ad's obs (e.g. --match heldout.h5ad)")
    p.add_argument("--n-cells", type=int,
                   help="cells per --condition without :N (default 100), or the total for --match (e.g. --n-cells 1000)")
    _add_sampler_options(p)
    p.set_defaults(func=cmd_generate)

    p = _sub(sub, "transfer", "counterfactual cells: real cells moved to a new condition -> .h5ad",
             "  scldm-scale transfer --ldm-run runs/my-ldm --data tcells.h5ad --to 'cell_type=B cell' --strength 0.5 "
             "--out moved.h5ad",
             description="Encode the cells of --data, noise their latents to flow time 1 - strength and integrate "
                         "back with the new condition. Strength 0 returns the cells' own reconstruction, 1 ignores "
                         "them (generation from noise).")
    p.add_argument("--ldm-run", required=True, help="run directory of the trained LDM (e.g. --ldm-run runs/my-ldm)")
    p.add_argument("--data", required=True, help=".h5ad of the cells to transfer (e.g. --data tcells.h5ad)")
    p.add_argument("--to", action="append", metavar="ATTR=VALUE",
                   help="the new condition, repeatable (e.g. --to 'cell_type=B cell')")
    p.add_argument("--strength", type=float, default=0.5, help="0 = keep the cells, 1 = only the new condition "
                                                                 "(e.g. --strength 0.7)")
    p.add_argument("--out", required=True, help="output .h5ad (e.g. --out moved.h5ad)")
    p.add_argument("--layer", help="where the raw counts of --data are: raw or a layer name; default X "
                                   "(e.g. --layer raw)")
    p.add_argument("--gene-key", help="var column with gene ids or symbols; default: the best match "
                                      "(e.g. --gene-key gene_ids)")
    _add_sampler_options(p)
    p.set_defaults(func=cmd_transfer)

    p = _sub(sub, "evaluate", "generated vs real held-out cells -> metrics JSON (+ PNG/HTML report)",
             "  scldm-scale evaluate --reference heldout.h5ad --generated gen.h5ad --out eval.json --report eval.png")
    p.add_argument("--reference", required=True, help="real cells, raw counts in X (e.g. --reference heldout.h5ad)")
    p.add_argument("--generated", required=True, help="generated cells, counts in X (e.g. --generated gen.h5ad)")
    p.add_argument("--labels", nargs="*", default=["cell_type"], metavar="COLUMN",
                   help="obs columns for kNN label accuracy and per-condition metrics (e.g. --labels cell_type tissue)")
    p.add_argument("--out", required=True, help="metrics JSON (e.g. --out eval.json)")
    p.add_argument("--report", help="PNG or .html report (e.g. --report eval.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of subsampling and the PCA (e.g. --seed 1)")
    p.set_defaults(func=cmd_evaluate)

    p = _sub(sub, "export", "consolidate a run's latest checkpoint into <run>/export (safetensors)",
             "  scldm-scale export runs/my-vae")
    p.add_argument("run", help="run directory (e.g. runs/my-vae)")
    p.set_defaults(func=cmd_export)

    p = _sub(sub, "sweep", "expand scaling grids into runs; train them here, write a SLURM array, or print the commands",
             "  OMP_NUM_THREADS=1 scldm-scale sweep recipes/scaling/width.yaml --out runs/scaling/width\n"
             "  scldm-scale sweep recipes/scaling/width.yaml recipes/scaling/data_size.yaml --out runs/scaling\n"
             "  scldm-scale sweep recipes/scaling/width.yaml train.cells=2048 --out runs/trial   # overrides before the options\n"
             "  scldm-scale sweep recipes/scaling/width.yaml --out /shared/sweeps/width --launcher slurm --nproc-per-node 8",
             description="Expand grids (recipes/scaling/*.yaml) into one resolved recipe per run and train them one "
                         "after another, write a SLURM array, or print the commands. Finished runs are skipped and "
                         "interrupted ones resume: the same command continues a sweep. Each run records its "
                         "parameters, FLOPs, cells seen, wall time and held-out metrics (result.json).")
    p.add_argument("items", nargs="+", metavar="GRID.yaml|key=value",
                   help="grid YAMLs, then key=value overrides applied to every run, all before the options "
                        "(e.g. recipes/scaling/width.yaml train.log_every=50)")
    p.add_argument("--out", required=True,
                   help="sweep folder for one grid; with several grids, one sub-folder per grid "
                        "(e.g. --out runs/scaling)")
    p.add_argument("--launcher", choices=["local", "slurm", "print"], default="local",
                   help="local: train the runs here, one after another (default); slurm: write OUT/slurm/*.sbatch "
                        "and submit.sh; print: print the commands (e.g. --launcher slurm)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes (GPUs) per run: 1 = a single process, N > 1 = torchrun --standalone "
                        "(e.g. --nproc-per-node 8; default 1)")
    p.add_argument("--run", default="",
                   help="only this run, NAME or GRID/NAME, as a SLURM array task does "
                        "(e.g. --run width/vae-d_model32-s0)")
    p.add_argument("--time", default="24:00:00",
                   help="slurm: time limit of each array task (e.g. --time 04:00:00; default 24:00:00)")
    p.add_argument("--sbatch-option", action="append", metavar="OPTION",
                   help="slurm: an extra #SBATCH line, repeatable (e.g. --sbatch-option=--partition=gpu)")
    p.add_argument("--python", default=sys.executable,
                   help="slurm: the interpreter on the compute nodes (e.g. --python .venv/bin/python; "
                        "default: this one)")
    p.set_defaults(func=cmd_sweep)

    p = _sub(sub, "report", "sweep results -> table (CSV, Parquet), power-law fits with intervals, plots, summary",
             "  scldm-scale report runs/scaling                     # -> runs/scaling/report/summary.md\n"
             "  scldm-scale report runs/scaling/width runs/scaling/data_size --out reports/scaling\n"
             "  scldm-scale report --wandb-csv wandb_export.csv --out reports/wandb",
             description="Collect finished sweep runs (or a W&B CSV export of them) into one table, fit "
                         "L = a * X^(-alpha) + c per axis and along the compute frontier with bootstrap intervals, "
                         "draw the plots and write summary.md.")
    p.add_argument("dirs", nargs="*", metavar="DIR",
                   help="sweep folders, the --out of `scldm-scale sweep` (e.g. runs/scaling)")
    p.add_argument("--out", help="report folder (e.g. --out reports/scaling; default DIR/report for one DIR)")
    p.add_argument("--wandb-csv", action="append", metavar="FILE",
                   help="a W&B runs-table CSV export of sweep runs, repeatable; columns as described in "
                        "scldm_scale/scaling/report.py read_wandb_csv (e.g. --wandb-csv wandb_export.csv)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap refits per fit (e.g. --bootstrap 2000; default 1000)")
    p.add_argument("--bootstrap-method", choices=["residuals", "cases"], default="residuals",
                   help="resample residuals around the fit (default) or runs within each X value, which needs "
                        ">= 2 seeds per point (e.g. --bootstrap-method cases)")
    p.add_argument("--level", type=float, default=0.95,
                   help="coverage of the intervals (e.g. --level 0.9; default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (e.g. --seed 1)")
    p.set_defaults(func=cmd_report)

    p = _sub(sub, "sizes", "model presets: parameters and FLOPs per cell, without training",
             "  scldm-scale sizes\n  scldm-scale sizes --genes 36000 --tokens 2000 --labels 600,60,1000\n"
             "  scldm-scale sizes recipes/quickstart.yaml vae.unpool_mlp_ratio=1.0 --json",
             description="Table of the VAE and DiT presets (vae_preset / dit_preset) with their parameter counts and "
                         "forward+backward FLOPs per cell, for a stated vocabulary and tokens per cell.")
    p.add_argument("--genes", type=int, default=20_000,
                   help="gene vocabulary size (default 20000; e.g. --genes 36000)")
    p.add_argument("--tokens", type=int, default=1_000,
                   help="expressed-gene tokens per cell (at most data.max_genes; default 1000) (e.g. --tokens 2000)")
    p.add_argument("--decode", choices=["sampled", "all"],
                   help="genes decoded per cell in training: expressed + --zero-genes sampled zeros, or all "
                        "(default: the recipe's train.decode_genes) (e.g. --decode all)")
    p.add_argument("--zero-genes", type=int,
                   help="sampled unexpressed genes per cell (default: the recipe's train.n_zero_genes) (e.g. "
                        "--zero-genes 512)")
    p.add_argument("--labels", default="10",
                   help="category counts of the DiT's label attributes, comma-separated (default 10) (e.g. "
                        "--labels 600,60,1000)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table (e.g. --json)")
    p.add_argument("items", nargs="*", metavar="RECIPE.yaml|key=value",
                   help="recipes / overrides whose vae.* and dit.* settings (MLP ratios, value embedding, ...) the "
                        "presets start from (e.g. recipes/quickstart.yaml vae.unpool_mlp_ratio=1.0)")
    p.set_defaults(func=cmd_sizes)

    p = _sub(sub, "demo", "synthetic atlas -> VAE -> latents -> LDM -> generate -> evaluate, on CPU in minutes",
             "  scldm-scale demo --out runs/demo --strict\n  scldm-scale demo --cells 2000 --genes 300 train.max_steps=50")
    p.add_argument("--out", default="runs/demo", help="demo directory (e.g. --out runs/demo)")
    p.add_argument("--cells", type=int, default=8000, help="cells of the synthetic atlas (e.g. --cells 2000)")
    p.add_argument("--genes", type=int, default=1000, help="genes of the synthetic atlas (e.g. --genes 300)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun ranks) (e.g. --nproc 1)")
    p.add_argument("--recipe", default="quickstart",
                   help="stage-1 recipe (a file or a shipped recipe's name); stage 2 uses <recipe>_ldm.yaml beside "
                        "it (default quickstart; e.g. --recipe recipes/quickstart.yaml)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a quality check fails")
    p.add_argument("items", nargs="*", metavar="key=value",
                   help="overrides for both stages (e.g. train.max_steps=100)")
    p.set_defaults(func=cmd_demo)

    p = _sub(sub, "recipes", "list the shipped recipes, or print one",
             "  scldm-scale recipes\n  scldm-scale recipes quickstart > my.yaml\n"
             "  scldm-scale train quickstart train.max_steps=100   # recipes are found by name")
    p.add_argument("name", nargs="?", help="a recipe to print (e.g. quickstart or gpu/vae_b_8gpu)")
    p.set_defaults(func=cmd_recipes)
    return parser


def quiet_third_party() -> None:
    """Keep logs readable: drop the known, repeated warnings of the libraries underneath."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: Sequence[str] | None = None) -> None:
    quiet_third_party()
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
