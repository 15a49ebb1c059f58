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
from segflow.errors import SegflowError

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


PredictionsOpt = Annotated[
    str | None,
    typer.Option(
        help="the output folder of `segflow predict` (masks/ + predictions.json), its masks/, or "
        "a folder of mask files",
        show_default=False,
    ),
]
LayoutOpt = Annotated[
    str | None,
    typer.Option(
        help="isic (<id>_segmentation.png) | folder (<id>.png): the masks' naming when they have "
        "no predict record (a predict run's own layout always applies)",
        show_default="the predict run's, else folder",
    ),
]


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


_VERSION_HELP = (
    "model version: id, production, previous or latest (default: production, else latest)"
)


def _version_folder(models: str, version: str | None, storage) -> str:
    """The run folder of ``version`` (default production, else latest) of a models URL with
    versions/; a plain `segflow train` output is its own folder."""
    from segflow.versions import resolve_version

    return resolve_version(models, version, storage).models


def _require(opts: dict[str, Any], command: str, *names: str) -> None:
    missing = [n for n in names if not opts.get(n)]
    if missing:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in missing)
        raise SegflowError(f"{command} needs {flags} (or the same keys in --config)")


@app.command()
def ingest(
    layout: Annotated[
        str | None, typer.Option(help="isic | nerve | luna | folder", show_default=False)
    ] = None,
    source: Annotated[str | None, typer.Option(help="URL of the raw archive")] = None,
    dataset: Annotated[str | None, typer.Option(help="URL of the Zarr dataset")] = None,
    masks: Annotated[str | None, typer.Option(help="URL of the masks, if elsewhere")] = None,
    size: Annotated[
        tuple[int, int] | None, typer.Option(help="target H W", show_default="256 256")
    ] = None,
    resize: Annotated[str | None, typer.Option(help="stretch | letterbox")] = None,
    workers: Annotated[int | None, typer.Option(help="local Dask workers")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Dask scheduler address")] = None,
    image_glob: Annotated[str | None, typer.Option(help="folder layout: image glob")] = None,
    mask_template: Annotated[
        str | None, typer.Option(help="folder layout: mask name, e.g. '{stem}_mask.png'")
    ] = None,
    annotations: Annotated[str | None, typer.Option(help="luna: annotations CSV URL")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="reject larger images")] = None,
    mask_positive: Annotated[
        str | None,
        typer.Option(help="mask foreground: auto | nonzero | ge128", show_default="auto"),
    ] = None,
    allow_external_links: Annotated[
        bool | None,
        typer.Option(
            "--allow-external-links",
            help="follow symbolic links that point outside the source (default: refused)",
        ),
    ] = None,
    require_masks: Annotated[
        bool | None, typer.Option("--require-masks/--allow-unlabeled", show_default=False)
    ] = None,
    strict: Annotated[
        bool | None, typer.Option("--strict", help="exit 1 if anything was rejected")
    ] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest a raw image archive into a Zarr dataset (incremental and resumable)."""
    from segflow.ingest import IngestConfig
    from segflow.ingest import ingest as run_ingest

    _setup_logging(as_json)
    cfg = IngestConfig.load(
        config,
        layout=layout,
        source=source,
        dataset=dataset,
        masks=masks,
        size=size,
        resize=resize,
        workers=workers,
        dask_address=dask_address,
        image_glob=image_glob,
        mask_template=mask_template,
        annotations=annotations,
        max_pixels=max_pixels,
        mask_positive=mask_positive,
        allow_external_links=allow_external_links,
        require_masks=require_masks,
        strict=strict,
        storage=_storage(endpoint_url),
    )
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


@app.command()
def train(
    dataset: Annotated[str | None, typer.Option(help="URL of the Zarr dataset")] = None,
    models: Annotated[str | None, typer.Option(help="URL of the models location")] = None,
    folds: Annotated[
        int | None, typer.Option(help="K of the K-fold split", show_default="5")
    ] = None,
    fold_ids: Annotated[str | None, typer.Option(help="train only these folds, e.g. 0,3")] = None,
    arch: Annotated[str | None, typer.Option(help="smp architecture (Unet, FPN...)")] = None,
    encoder: Annotated[str | None, typer.Option(help="smp encoder (resnet34...)")] = None,
    encoder_weights: Annotated[
        str | None,
        typer.Option(help="state-dict file/URL, or a named source: efficientnet-lite0-imagenet"),
    ] = None,
    size: Annotated[tuple[int, int] | None, typer.Option(help="input H W")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs", show_default="30")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size", show_default="16")] = None,
    loss: Annotated[str | None, typer.Option(help="dice|bce|bce_dice|focal|jaccard")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate", show_default="1e-3")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of split, init and augmentation")] = None,
    executor: Annotated[str | None, typer.Option(help="ray | inline")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster (auto, ray://...)")] = None,
    gpus_per_fold: Annotated[float | None, typer.Option(help="GPUs per fold (0 on CPU)")] = None,
    cpus_per_fold: Annotated[int | None, typer.Option(help="CPU threads per fold")] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite",
            help="when --models holds a training of another config, delete it and train "
            "afresh (default: refuse, naming the fields that differ)",
        ),
    ] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a K-fold U-Net: one fold per Ray task, resumable, with out-of-fold predictions."""
    from segflow.train import TrainConfig
    from segflow.train import train as run_train

    _setup_logging(as_json)
    ids = [int(x) for x in fold_ids.split(",") if x.strip()] if fold_ids else None
    cfg = TrainConfig.load(
        config,
        dataset=dataset,
        models=models,
        folds=folds,
        fold_ids=ids,
        arch=arch,
        encoder=encoder,
        encoder_weights=encoder_weights,
        size=size,
        epochs=epochs,
        batch_size=batch_size,
        loss=loss,
        lr=lr,
        seed=seed,
        executor=executor,
        ray_address=ray_address,
        gpus_per_fold=gpus_per_fold,
        cpus_per_fold=cpus_per_fold,
        overwrite=overwrite,
        storage=_storage(endpoint_url),
    )
    result = run_train(cfg)
    lines = [f"models: {result.models} ({result.seconds:.0f}s)"]
    for f in result.folds:
        if f.status == "failed":
            lines.append(f"  fold {f.fold}: FAILED {f.error}")
        else:
            lines.append(
                f"  fold {f.fold}: {f.status}, best epoch {f.best_epoch}, val Dice {f.dice:.4f}, "
                f"Jaccard {f.jaccard:.4f}, thresholded Jaccard {f.thresholded_jaccard:.4f}"
            )
    _emit(result.to_dict(), as_json, "\n".join(lines))
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def predict(
    models: Annotated[str | None, typer.Option(help="URL of the trained models")] = None,
    out: Annotated[str | None, typer.Option(help="URL to write masks to")] = None,
    dataset: Annotated[str | None, typer.Option(help="predict an ingested dataset")] = None,
    source: Annotated[str | None, typer.Option(help="or raw files at this URL")] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            help="isic | nerve | folder; isic names the masks <id>_segmentation.png, the others "
            "<id>.png (recorded in predictions.json for crops, evaluate, export-rle)",
            show_default="folder",
        ),
    ] = None,
    folds: Annotated[str | None, typer.Option(help="all, or e.g. 0,2")] = None,
    tta: Annotated[str | None, typer.Option(help="d4 | flips | none")] = None,
    threshold: Annotated[str | None, typer.Option(help="auto | 0..1")] = None,
    postprocess: Annotated[str | None, typer.Option(help="auto | none | lcc | lcc_fill")] = None,
    save_probabilities: Annotated[
        bool | None, typer.Option("--save-probabilities", help="also write probabilities")
    ] = None,
    executor: Annotated[str | None, typer.Option(help="ray | inline")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(help="GPUs per worker")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model batch")] = None,
    shard_size: Annotated[int | None, typer.Option(help="inputs per resumable shard")] = None,
    version: Annotated[str | None, typer.Option(help=_VERSION_HELP)] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Segment images with the fold ensemble + TTA; masks at the original resolution."""
    from segflow.predict.config import PredictConfig
    from segflow.predict.run import predict as run_predict

    _setup_logging(as_json)
    cfg = PredictConfig.load(
        config,
        models=models,
        out=out,
        dataset=dataset,
        source=source,
        layout=layout,
        folds=folds,
        tta=tta,
        threshold=threshold,
        postprocess=postprocess,
        save_probabilities=save_probabilities,
        executor=executor,
        ray_address=ray_address,
        gpus_per_worker=gpus_per_worker,
        batch_size=batch_size,
        shard_size=shard_size,
        storage=_storage(endpoint_url),
    )
    cfg = cfg.model_copy(update={"models": _version_folder(cfg.models, version, cfg.storage)})
    result = run_predict(cfg, progress=None if as_json else _progress_bar())
    human = (
        f"\n{result.n_images} masks in {result.out}/masks ({result.shards_run} of "
        f"{result.n_shards} shards run, {result.n_errors} errors; folds {result.folds}, "
        f"TTA {result.tta}, threshold {result.threshold:.2f}, post-processing "
        f"{result.postprocess}; {result.images_per_s} img/s)"
    )
    _emit(result.to_dict(), as_json, human)


def _progress_bar():
    def show(done: int, total: int, rate: float) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{total} images, {rate:.1f} img/s")
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
        typer.Option(help="truth file names from {stem}, e.g. '{stem}_lesion.bmp' (PH2)"),
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
        config, predictions=predictions, truth=truth, layout=layout, mask_template=mask_template
    )
    _require(opts, "evaluate", "predictions", "truth")
    r = run_evaluate(
        opts["predictions"],
        opts["truth"],
        layout=opts.get("layout"),
        storage=_storage_options(endpoint_url),
        mask_template=opts.get("mask_template"),
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
def crops(
    predictions: PredictionsOpt = None,
    source: Annotated[str | None, typer.Option(help="URL of the original images")] = None,
    out: Annotated[str | None, typer.Option(help="URL to write crops to")] = None,
    layout: LayoutOpt = None,
    mode: Annotated[str | None, typer.Option(help="masked | crop | mask | all")] = None,
    margin: Annotated[float | None, typer.Option(help="margin, fraction of the box")] = None,
    background: Annotated[str | None, typer.Option(help="black | mean | white")] = None,
    format: Annotated[str | None, typer.Option(help="png | jpeg")] = None,
    quality: Annotated[int | None, typer.Option(help="JPEG quality")] = None,
    min_area_frac: Annotated[float | None, typer.Option(help="smallest lesion kept")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Dask scheduler address")] = None,
    workers: Annotated[int | None, typer.Option(help="local Dask workers")] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Crop each image to its mask's largest component (for a downstream classifier)."""
    from segflow.crops import CropsConfig, make_crops

    _setup_logging(as_json)
    cfg = CropsConfig.load(
        config,
        predictions=predictions,
        source=source,
        out=out,
        layout=layout,
        mode=mode,
        margin=margin,
        background=background,
        format=format,
        quality=quality,
        min_area_frac=min_area_frac,
        dask_address=dask_address,
        workers=workers,
        storage=_storage(endpoint_url),
    )
    r = make_crops(cfg)
    human = (
        f"crops of {r.n_ok} images in {r.out} ({r.n_empty} empty, {r.n_error} errors; "
        f"manifest {r.manifest}) in {r.seconds:.1f}s"
    )
    _emit(r.to_dict(), as_json, human)


@app.command()
def serve(
    models: Annotated[str | None, typer.Option(help="URL of the trained models")] = None,
    version: Annotated[str | None, typer.Option(help=_VERSION_HELP)] = None,
    tta: Annotated[str | None, typer.Option(help="d4 | flips | none", show_default="flips")] = None,
    host: Annotated[str | None, typer.Option(help="bind address", show_default="127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port", show_default="8000")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    replicas: Annotated[int | None, typer.Option(help="model replicas", show_default="1")] = None,
    gpus_per_replica: Annotated[float | None, typer.Option(help="GPUs per replica")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="larger images get 413")] = None,
    endpoint_url: StorageOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the fold ensemble over HTTP (Ray Serve) until Ctrl-C: POST an image, get its mask."""
    from segflow.serve import ServeConfig
    from segflow.serve.deployment import serve_forever

    _setup_logging(as_json)
    cfg = ServeConfig.load(
        config,
        models=models,
        version=version,
        tta=tta,
        host=host,
        port=port,
        ray_address=ray_address,
        replicas=replicas,
        gpus_per_replica=gpus_per_replica,
        max_pixels=max_pixels,
        storage=_storage(endpoint_url),
    )

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
