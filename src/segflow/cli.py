"""``segflow`` command line: one thin subcommand per stage over the typed API functions.

Every subcommand takes ``--config FILE`` (YAML with any of its options; flags win) and
``--json`` (a machine-readable summary as the last line of stdout). Errors the user can fix
print one clear message and exit with code 2; ``--strict`` failures exit with code 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from segflow import __version__
from segflow.cli_options import config_options
from segflow.crops import CropsConfig
from segflow.errors import ConfigError, SegflowError
from segflow.ingest.config import IngestConfig
from segflow.pairing import IMAGE_PATTERN_HELP, MASK_TEMPLATE_HELP, PAIRS_HELP
from segflow.predict.config import PredictConfig
from segflow.serve.config import ServeConfig
from segflow.train.config import TrainConfig

app = typer.Typer(
    name="segflow",
    help="Distributed batch pipeline for binary medical-image segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file with any of this command's options")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a JSON summary as the last line")]
StorageOpt = Annotated[
    str | None,
    typer.Option("--endpoint-url", help="S3 endpoint (MinIO...); default: AWS_ENDPOINT_URL or AWS"),
]


# evaluate and export-rle have no config model: their shared options take the same texts as
# CropsConfig's fields
PredictionsOpt = Annotated[
    str | None, typer.Option(help=CropsConfig.model_fields["predictions"].description)
]
LayoutOpt = Annotated[str | None, typer.Option(help=CropsConfig.model_fields["layout"].description)]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _emit(summary: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True, default=str))
    else:
        typer.echo(human)


def _storage(endpoint_url: str | None) -> dict[str, Any] | None:
    return {"endpoint_url": endpoint_url} if endpoint_url else None


def _storage_options(endpoint_url: str | None):
    from segflow.storage import StorageOptions

    return StorageOptions(endpoint_url=endpoint_url) if endpoint_url else None


def _options(config: Path | None, **flags: Any) -> dict[str, Any]:
    """For commands without a stage config: YAML values, then the flags that were given."""
    from segflow.config import read_yaml

    opts = read_yaml(config) if config else {}
    opts.update({k: v for k, v in flags.items() if v is not None})
    return opts


# one text for predict's --version (not a PredictConfig field) and serve's
_VERSION_HELP = ServeConfig.model_fields["version"].description


def _version(models: str, version: str | None, storage):
    """``version`` (default production, else latest) of a models URL with versions/, with its
    run folder; a plain `segflow train` output is its own folder."""
    from segflow.versions import resolve_version

    return resolve_version(models, version, storage)


def _require(opts: dict[str, Any], command: str, *names: str) -> None:
    missing = [n for n in names if not opts.get(n)]
    if missing:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in missing)
        raise SegflowError(f"{command} needs {flags} (or the same keys in --config)")


@app.command()
@config_options(
    IngestConfig,
    "layout source dataset masks size resize workers dask_address image_glob "
    "image_pattern mask_template pairs annotations max_pixels mask_positive allow_external_links "
    "require_masks strict",
    decls={"require_masks": "--require-masks/--allow-unlabeled"},
)
def ingest(
    endpoint_url: StorageOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False, **opts: Any
) -> None:
    """Ingest a raw image archive into a Zarr dataset (incremental and resumable)."""
    from segflow.ingest import ingest as run_ingest

    _setup_logging(as_json)
    cfg = IngestConfig.load(config, **opts, storage=_storage(endpoint_url))
    result = run_ingest(cfg)
    summary = result.to_dict()
    human = (
        f"{result.status}: {result.n_images} images in {result.dataset} "
        f"({result.n_new} new, {result.n_updated} updated, {result.n_rejected} rejected; "
        f"report {result.report}) in {result.seconds:.1f}s"
    )
    _emit(summary, as_json, human)
    if cfg.strict and result.n_rejected:
        raise typer.Exit(1)


def fold_list(text: str, flag: str) -> list[int]:
    """``"0,3"`` -> ``[0, 3]``; anything else is a ConfigError naming what was received."""
    parts = [x.strip() for x in text.split(",")]
    bad = [x for x in parts if not x.isdigit()]
    if bad or not text.strip():
        what = f"{bad[0]!r} is not a fold number" if bad and text.strip() else "it is empty"
        raise ConfigError(
            f"{flag} {text!r}: {what}. Give fold numbers separated by commas, e.g. "
            f"{flag} 0,3 (each from 0 to folds-1; leave the flag out for every fold)"
        )
    return [int(x) for x in parts]


@app.command()
@config_options(
    TrainConfig,
    "dataset models folds fold_ids arch encoder encoder_weights size epochs "
    "batch_size loss lr seed init_from init_models executor ray_address gpus_per_fold "
    "cpus_per_fold overwrite time_budget min_epochs ema_decay",
    flag_types={"fold_ids": str},  # --fold-ids 0,3
)
def train(
    endpoint_url: StorageOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False, **opts: Any
) -> None:
    """Train a K-fold U-Net: one fold per Ray task, resumable, with out-of-fold predictions."""
    from segflow.train import train as run_train

    _setup_logging(as_json)
    if opts["fold_ids"] is not None:
        opts["fold_ids"] = fold_list(opts["fold_ids"], "--fold-ids")
    cfg = TrainConfig.load(config, **opts, storage=_storage(endpoint_url))
    result = run_train(cfg)
    lines = [f"models: {result.models} ({result.seconds:.0f}s)"]
    for f in result.folds:
        if f.status == "failed":
            lines.append(f"  fold {f.fold}: FAILED {f.error}")
        else:
            lines.append(
                f"  fold {f.fold}: {f.status}, best epoch {f.best_epoch}, val Dice {f.dice:.4f}, "
                f"Jaccard {f.jaccard:.4f}, thresholded Jaccard {f.thresholded_jaccard:.4f} "
                f"(at the {f.resolution} resolution)"
            )
    _emit(result.to_dict(), as_json, "\n".join(lines))
    if not result.ok:
        raise typer.Exit(1)


@app.command()
@config_options(
    PredictConfig,
    "models out dataset source layout image_glob image_pattern pairs folds tta threshold "
    "postprocess save_probabilities executor ray_address gpus_per_worker batch_size shard_size",
)
def predict(
    version: Annotated[str | None, typer.Option(help=_VERSION_HELP)] = None,
    review_gallery: Annotated[
        str | None,
        typer.Option(
            help="also write the most uncertain images as an overlay grid, their scores and "
            "a histogram of uncertainty, with an index.html, into this folder"
        ),
    ] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    **opts: Any,
) -> None:
    """Segment images with the fold ensemble + TTA; masks at the original resolution, and the
    per-image QA table summary.parquet / summary.csv."""
    from segflow.predict.run import predict as run_predict

    _setup_logging(as_json)
    cfg = PredictConfig.load(config, **opts, storage=_storage(endpoint_url))
    resolved = _version(cfg.models, version, cfg.storage)
    cfg = cfg.model_copy(update={"models": resolved.models})
    progress = None if as_json else _progress_bar()
    result = run_predict(cfg, progress=progress, model_version=resolved.id)
    if review_gallery:
        from segflow.predict.review import write_gallery

        gallery = write_gallery(
            cfg.out, review_gallery, result.most_uncertain, cfg.storage, result.review_threshold
        )
        print(f"\nreview gallery: {gallery.index}", file=sys.stderr)
    review = "not calibrated" if result.n_review is None else f"{result.n_review} images"
    human = (
        f"\n{result.n_images} masks in {result.out}/masks ({result.shards_run} of "
        f"{result.n_shards} shards run, {result.n_errors} errors; folds {result.folds}, "
        f"TTA {result.tta}, threshold {result.threshold:.2f}, post-processing "
        f"{result.postprocess}; {result.images_per_s} img/s)\nQA table: {result.table} "
        f"(needs_review: {review})"
    )
    _emit(result.to_dict(), as_json, human)


def _progress_bar():
    def show(fig) -> None:  # a segflow.progress.ProgressFigures: the whole archive's
        width = 30
        filled = int(width * fig.percent / 100)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {fig.line()}")
        sys.stderr.flush()

    return show


@app.command()
def evaluate(
    predictions: PredictionsOpt = None,
    truth: Annotated[str | None, typer.Option(help="URL of the ground-truth masks")] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            help="isic (<id>_segmentation.<ext>) | folder (<id>.<ext>): naming of the truth, and "
            "of predictions without a predict record; default: the predictions' naming"
        ),
    ] = None,
    mask_template: Annotated[
        str | None,
        typer.Option(
            help=f"truth masks: {MASK_TEMPLATE_HELP}; alone, truth file names such as "
            "'{stem}_lesion.bmp' (PH2)"
        ),
    ] = None,
    image_pattern: Annotated[str | None, typer.Option(help=IMAGE_PATTERN_HELP)] = None,
    pairs: Annotated[
        str | None, typer.Option(help=f"{PAIRS_HELP} (masks inside --truth; images not read)")
    ] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score predicted masks against the truth at the truth's resolution; evaluation.csv and
    evaluation.json are written into the predict output folder, beside masks/."""
    from segflow.evaluate import evaluate as run_evaluate

    _setup_logging(as_json)
    opts = _options(
        config,
        predictions=predictions,
        truth=truth,
        layout=layout,
        mask_template=mask_template,
        image_pattern=image_pattern,
        pairs=pairs,
    )
    _require(opts, "evaluate", "predictions", "truth")
    r = run_evaluate(
        opts["predictions"],
        opts["truth"],
        layout=opts.get("layout"),
        storage=_storage_options(endpoint_url),
        mask_template=opts.get("mask_template"),
        image_pattern=opts.get("image_pattern"),
        pairs=opts.get("pairs"),
    )
    human = (
        f"{r.n} images: Dice {r.mean_dice:.4f}, Jaccard {r.mean_jaccard:.4f}, thresholded "
        f"Jaccard {r.mean_thresholded_jaccard:.4f} (per image: {r.per_image_csv})"
    )
    _emit(r.to_dict(), as_json, human)


@app.command("export-rle")
def export_rle(
    predictions: PredictionsOpt = None,
    out: Annotated[str | None, typer.Option(help="CSV to write (Kaggle: img,pixels)")] = None,
    layout: LayoutOpt = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a Kaggle run-length-encoded submission CSV from predicted masks."""
    from segflow.rle import export_rle as run_export

    opts = _options(config, predictions=predictions, out=out, layout=layout)
    _require(opts, "export-rle", "predictions", "out")
    r = run_export(
        opts["predictions"],
        opts["out"],
        storage=_storage_options(endpoint_url),
        layout=opts.get("layout"),
    )
    _emit(r, as_json, f"wrote {r['n']} rows ({r['empty']} empty masks) to {r['out']}")


@app.command()
@config_options(
    CropsConfig,
    "predictions source out layout image_glob image_pattern pairs mode margin background format "
    "quality min_area_frac dask_address workers",
)
def crops(
    endpoint_url: StorageOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False, **opts: Any
) -> None:
    """Crop each image to its mask's largest component (for a downstream classifier)."""
    from segflow.crops import make_crops

    _setup_logging(as_json)
    cfg = CropsConfig.load(config, **opts, storage=_storage(endpoint_url))
    r = make_crops(cfg)
    human = (
        f"crops of {r.n_ok} images in {r.out} ({r.n_empty} empty, {r.n_error} errors; "
        f"manifest {r.manifest}) in {r.seconds:.1f}s"
    )
    _emit(r.to_dict(), as_json, human)


@app.command()
@config_options(
    ServeConfig,
    "models version tta host port ray_address replicas gpus_per_replica max_pixels",
)
def serve(
    endpoint_url: StorageOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False, **opts: Any
) -> None:
    """Serve the fold ensemble over HTTP (Ray Serve) until Ctrl-C: POST an image, get its mask."""
    from segflow.serve.deployment import serve_forever

    _setup_logging(as_json)
    cfg = ServeConfig.load(config, **opts, storage=_storage(endpoint_url))

    def ready(r) -> None:
        human = (
            f"serving model version {r.version} at {r.url} ({r.replicas} replica(s); POST "
            f"{r.url}/v1/segment, API docs at {r.url}/docs); Ctrl-C to stop"
        )
        _emit(r.to_dict(), as_json, human)
        sys.stdout.flush()  # a supervisor or test reads this line while the server runs

    serve_forever(cfg, ready)


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", help="run file: flow parameters + config")],
    flow: Annotated[
        str | None, typer.Option(help="pipeline | train | segment (default: the file's)")
    ] = None,
    refresh: Annotated[bool, typer.Option(help="ignore cached task results")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a Prefect flow (pipeline_flow by default) from a YAML run file.

    Uses the Prefect API at PREFECT_API_URL, or a local one. A rerun with unchanged inputs is
    all cache hits; a run killed mid-way continues where it stopped."""
    import os

    from segflow.pipeline.runner import load_spec, run_flow

    if refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    result = run_flow(load_spec(config, flow))
    _emit(result, as_json, json.dumps(result, indent=2, sort_keys=True, default=str))


@app.command("demo-data")
def demo_data(
    out: Annotated[str | None, typer.Option(help="URL to write the ISIC-layout archive to")] = None,
    n: Annotated[int | None, typer.Option(help="number of image/mask pairs")] = None,
    size: Annotated[tuple[int, int] | None, typer.Option(help="H W of the images")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a synthetic ISIC-layout archive of dermoscopy-like images and lesion masks."""
    from segflow.config import read_yaml
    from segflow.demo_data import generate_demo_data
    from segflow.storage import StorageOptions

    opts = read_yaml(config) if config else {}
    given = {"out": out, "n": n, "size": size, "seed": seed}
    opts.update({k: v for k, v in given.items() if v is not None})
    if "out" not in opts:
        raise SegflowError("demo-data needs --out URL (or `out:` in --config)")
    try:
        result = generate_demo_data(
            opts["out"],
            int(opts.get("n", 64)),
            size=tuple(opts.get("size", (192, 256))),
            seed=int(opts.get("seed", 0)),
            storage=StorageOptions(endpoint_url=endpoint_url) if endpoint_url else None,
        )
    except ValueError as e:
        raise SegflowError(str(e)) from None
    summary = {"out": result.out, "n": result.n, "size": list(result.size)}
    _emit(summary, as_json, f"wrote {result.n} image/mask pairs to {result.out}")


models_app = typer.Typer(
    help="Model versions: list, show, promote, rollback (the production alias).",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
ModelsOpt = Annotated[str, typer.Option("--models", help="models URL (holds versions/)")]


@models_app.command("list")
def models_list(models: ModelsOpt, endpoint_url: StorageOpt = None, as_json: JsonOpt = False):
    """One row per version: id, created, data, OOF and benchmark scores, gate, aliases."""
    from segflow.registry import list_rows

    rows = list_rows(models, _storage_options(endpoint_url))
    cols = ("id", "created", "dataset_hash", "n_images", "oof_tj", "bench_tj", "gate", "aliases")
    lines = ["  ".join(cols)] + [
        "  ".join(",".join(r[c]) if c == "aliases" else str(r[c]) for c in cols) for r in rows
    ]
    _emit({"versions": rows}, as_json, "\n".join(lines))


@models_app.command("show")
def models_show(
    version_id: Annotated[str, typer.Argument(help="version id or alias")],
    models: ModelsOpt,
    endpoint_url: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole version record."""
    from segflow.registry import show

    record = show(models, version_id, _storage_options(endpoint_url))
    _emit(record, as_json, json.dumps(record, indent=2, sort_keys=True, default=str))


@models_app.command("promote")
def models_promote(
    version_id: Annotated[str, typer.Argument(help="version id to make production")],
    models: ModelsOpt,
    reason: Annotated[str, typer.Option(help="why (recorded in the history)")],
    endpoint_url: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a version production by hand; recorded in versions/history/."""
    from segflow.registry import promote

    aliases = promote(models, version_id, reason, storage=_storage_options(endpoint_url))
    human = f"production: {aliases['production']} (previous: {aliases['previous']})"
    _emit(aliases, as_json, human)


@models_app.command("rollback")
def models_rollback(
    models: ModelsOpt,
    reason: Annotated[str, typer.Option(help="why (recorded in the history)")] = "rollback",
    endpoint_url: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Production goes back to the previous version; recorded in versions/history/."""
    from segflow.registry import rollback

    aliases = rollback(models, reason, storage=_storage_options(endpoint_url))
    human = f"production: {aliases['production']} (previous: {aliases['previous']})"
    _emit(aliases, as_json, human)


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the segflow version."""
    _emit({"segflow": __version__}, as_json, __version__)


def main() -> None:
    try:
        app()
    except SegflowError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
