"""The ``instseg`` command line: ``train | eval | predict | serve | export | convert | data | presets``.

Run ``instseg COMMAND -h`` for the options of a command.  Configuration errors, data errors,
checkpoints that do not fit and missing files end with exit code 2 and a one-line message (no
traceback); ``instseg data check`` ends with exit code 1 when it finds problems in the data.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from instseg.config.load import ConfigError, apply_overrides, set_value
from instseg.config.schema import Config

# convenience flags of `instseg train` -> config keys
_TRAIN_DATA_FLAGS = {
    "train_ann": "data.train_ann",
    "train_images": "data.train_images",
    "val_ann": "data.val_ann",
    "val_images": "data.val_images",
    "train_stuff": "data.train_stuff",
    "val_stuff": "data.val_stuff",
}


TTA_HELP = (
    "test-time augmentation of two-stage models, merged as mmdetection's aug_test: flip, ms (the COCO 2018 "
    "slides' five scales), ms-flip, or LONGxSHORT[,LONGxSHORT...][+flip]; '' turns off a preset's "
    "model.tta (default: the checkpoint's model.tta)"
)


class CliError(Exception):
    """A usage error detected after argument parsing (exit code 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, CliError, FileNotFoundError, NotADirectoryError]
    from instseg.engine.checkpoint import CheckpointError
    from instseg.engine.logging import TensorBoardMissing

    from instseg.api import PredictorError
    from instseg.serve import ServeError
    from instseg.video import VideoError

    errors += [CheckpointError, TensorBoardMissing, PredictorError, VideoError, ServeError]
    try:
        from instseg.convert.mmdet import ConversionError

        errors.append(ConversionError)
    except ImportError:  # pragma: no cover - during development
        pass
    try:
        from instseg.export import ExportError
        errors.append(ExportError)
    except ImportError:  # pragma: no cover - during development
        pass
    try:
        from instseg.data import DataError
        from instseg.data.formats import FormatError

        errors += [DataError, FormatError]
    except ImportError:  # pragma: no cover - during development
        pass
    return tuple(errors)


def _flatten(values: list | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(v if isinstance(v, list) else [v])
    return out


def _get_preset(name: str) -> Config:
    from instseg.config.presets import get_preset

    try:
        return get_preset(name)
    except KeyError as e:
        msg = e.args[0] if e.args else name
        raise ConfigError(str(msg)) from None


def resolve_config(name: str, cfg_files: list[str] = (), sets: list[str] = ()) -> Config:
    """A preset name (or a YAML file of a whole config, e.g. a run's ``config.yaml``) plus overrides."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        cfg = apply_overrides(Config(), [str(p)])
    else:
        cfg = _get_preset(name)
    for f in cfg_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--cfg-file not found: {f}")
    return apply_overrides(cfg, list(cfg_files), list(sets))


# ---------------------------------------------------------------------------------- commands


def _explicit_keys(cfg_files: list[str], sets: list[str]) -> set[str]:
    """The config keys a user set by hand (``--cfg-file`` YAML keys and ``--set`` keys)."""
    import yaml

    from instseg.config.load import _flatten as flatten_yaml

    keys = {item.split("=", 1)[0].strip() for item in sets if "=" in item}
    for f in cfg_files:
        try:
            data = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            keys.update(k for k, _ in flatten_yaml(data))
    return keys


def cmd_train(args: argparse.Namespace) -> int:
    from instseg.engine.inference import format_metrics
    from instseg.engine.trainer import train

    cfg = resolve_config(args.config, _flatten(args.cfg_file))
    for attr, key in _TRAIN_DATA_FLAGS.items():  # convenience flags, then --set (which wins)
        value = getattr(args, attr)
        if value is not None:
            set_value(cfg, key, str(value))
    apply_overrides(cfg, [], _flatten(args.set))
    for key in ("train_ann", "val_ann"):
        path = getattr(cfg.data, key)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"data.{key}: annotation file not found: {path}")
    for key in ("train_images", "val_images", "train_stuff", "val_stuff"):
        path = getattr(cfg.data, key)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"data.{key}: folder not found: {path}")
    if not cfg.data.train_ann:
        raise CliError("no training data: give --train-ann and --train-images (or set data.train_ann / data.train_images)")
    run_dir = Path(cfg.train.output_dir) / (args.name or cfg.name)
    pinned = _explicit_keys(_flatten(args.cfg_file), _flatten(args.set))
    result = train(cfg, resume=args.resume, run_dir=run_dir, pinned=pinned)
    from instseg.engine.distributed import env_info

    if env_info().rank != 0:  # under torchrun rank 0 alone reports
        return 0
    print(f"\nrun: {result['run_dir']}  ({result['iter']} iterations, {result['stopped']})")
    if result["metrics"]:
        print(format_metrics(result["metrics"]))
    if result["best"].get("metric"):
        print(f"best {result['best']['metric']} = {result['best']['value']:.4f}")
    return 0


def _with_tta(model, dataset, args: argparse.Namespace, cfg: Config):
    """Wraps the model in test-time augmentation when ``--tta`` (or ``model.tta``) asks for it."""
    from instseg.engine.tta import wrap_for_tta

    spec = cfg.model.tta if args.tta is None else args.tta
    if spec and not hasattr(model, "roi_head"):
        raise CliError(f"--tta {spec!r}: test-time augmentation is built for the two-stage models, not {cfg.model.arch}")
    try:
        return wrap_for_tta(model, dataset, spec, cfg.data)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from instseg.data import DataError, build_dataset
    from instseg.engine.checkpoint import load_model_from_checkpoint
    from instseg.engine.inference import format_metrics, run_evaluation
    from instseg.engine.trainer import resolve_device

    if not Path(args.ann).is_file():
        raise FileNotFoundError(f"--ann: annotation file not found: {args.ann}")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images: folder not found: {args.images}")

    def update(cfg: Config) -> None:
        apply_overrides(cfg, [], _flatten(args.set))
        cfg.data.val_ann, cfg.data.val_images = str(args.ann), str(args.images)
        cfg.data.val_fraction = 0.0  # --ann names the whole evaluation set (not a held-out part)
        cfg.data.val_stuff = str(args.stuff_dir or "")
        if args.max_dets is not None:
            cfg.data.max_dets = int(args.max_dets)
        cfg.model.max_per_img = max(cfg.model.max_per_img, cfg.data.max_dets)

    model, cfg, classes = load_model_from_checkpoint(args.checkpoint, "cpu", update_cfg=update)
    dataset = build_dataset(cfg.data, "val")
    ckpt_ids = [int(c) for c in classes["cat_ids"]]
    unknown = sorted(set(int(c) for c in dataset.cat_ids) - set(ckpt_ids))
    if unknown:
        raise DataError(
            f"{args.ann}: category ids {unknown} are not among the checkpoint's categories {ckpt_ids}; "
            "evaluate on data with the categories the model was trained on"
        )
    names = dict(zip(ckpt_ids, classes.get("class_names", [])))
    renamed = [(c, n, names[c]) for c, n in zip(dataset.cat_ids, dataset.class_names) if names.get(c) not in (None, n)]
    if renamed:
        print(f"warning: category names differ from the checkpoint's (id, data, checkpoint): {renamed[:5]}", file=sys.stderr)
    from instseg.engine import distributed as dist_utils
    from instseg.engine.amp import amp_dtype

    device = resolve_device(args.device or "auto")  # inference: wherever the checkpoint was trained
    owns_group = not dist_utils.is_initialized()
    dist_utils.init_from_env(device.type)  # under torchrun: each rank evaluates its shard of the images
    device = dist_utils.local_device(device)
    amp = amp_dtype(args.amp, device, key="--amp")
    model.to(device).optimize_for_inference()
    model, dataset = _with_tta(model, dataset, args, cfg)
    ckpt = Path(args.checkpoint).resolve()
    if args.out:
        out_dir = Path(args.out)
    elif ckpt.parent.name == "checkpoints":  # runs/NAME/checkpoints/X.pt -> runs/NAME/eval_X
        out_dir = ckpt.parent.parent / f"eval_{ckpt.stem}"
    else:
        out_dir = Path(f"eval_{ckpt.stem}")
    outcome = run_evaluation(
        model, dataset, cfg, out_dir, cat_ids=ckpt_ids, confusion_score_thr=args.confusion_score_thr, amp=amp,
        verbose=dist_utils.is_main(),
    )
    if owns_group:
        dist_utils.destroy()
    if dist_utils.env_info().rank != 0:  # under torchrun rank 0 alone reports
        return 0
    print(format_metrics(outcome.metrics))
    for x in outcome.left_out:
        print(f"left out (unreadable): {x.file_name}: {x.reason}", file=sys.stderr)
    if cfg.model.arch == "rpn":  # proposal models: recall (AR@100/300/1000, by size), as mmdet's proposal metric
        print(f"proposals (results.json), recall metrics and summary written to {out_dir}")
    else:
        print(f"results, metrics, per-class tables, PR curves and confusion matrices written to {out_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from instseg.api import VIDEO_SUFFIXES, Predictor
    from instseg.engine.inference import collect_images
    from instseg.video import camera_device

    sources = list(args.inputs or []) + list(args.images or [])
    if args.camera is not None:
        sources.append(f"camera:{args.camera}")
    if not sources:
        raise CliError("nothing to predict on: give image files, folders or videos (or --camera N)")
    # cameras are named camera:N (a bare number could be a file name)
    cameras = [s for s in sources if s.startswith("camera:") and camera_device(s)]
    streams = cameras + [s for s in sources if Path(s).suffix.lower() in VIDEO_SUFFIXES]
    for s in streams:
        if s not in cameras and not Path(s).is_file():
            raise FileNotFoundError(f"video file not found: {s}")
    files = collect_images([s for s in sources if s not in streams])
    from instseg.engine import distributed as dist_utils
    from instseg.engine.trainer import resolve_device

    try:
        device = resolve_device(args.device or "auto")
    except (RuntimeError, ValueError) as e:  # an unknown name, or cuda without CUDA
        raise CliError(f"--device {args.device!r}: {e}") from None
    owns_group = not dist_utils.is_initialized()
    info = dist_utils.init_from_env(device.type)  # under torchrun: each rank predicts its shard of the images
    if info.distributed and streams:
        raise CliError("videos and cameras are predicted by one process: run them without torchrun")
    device = dist_utils.local_device(device)
    predictor = Predictor(args.checkpoint, device=str(device), tta=args.tta, overrides=_flatten(args.set))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw_kw = dict(show_boxes=args.boxes, show_labels=args.labels)
    if files:
        _predict_images(predictor, files, out_dir, args.score_thr, args.batch_size, draw_kw)
    if owns_group:
        dist_utils.destroy()
    for source in streams:
        done = predictor.predict_video(source, out_dir, score_thr=args.score_thr, batch_size=args.batch_size,
                                       max_frames=args.max_frames, **draw_kw)
        print(f"{source}: {done.frames} frames at {done.fps:g} fps -> {done.video}, {done.jsonl}")
    return 0


def _predict_images(predictor, files: list[Path], out_dir: Path, score_thr: float, batch_size: int,
                    draw_kw: dict) -> None:
    """Overlay PNGs (``STEM.png``, ``STEM_1.png`` for a repeated stem), ``predictions.json`` and
    ``images.json`` of ``files``.

    Under torchrun each rank predicts (and draws) every N-th image; rank 0 gathers the records in
    the files' order and writes the two JSON files, which equal a single process's."""
    from tqdm import tqdm

    from instseg.api import coco_records, write_coco_json
    from instseg.engine import distributed as dist_utils

    # overlay names over the whole list (the same on every rank, as one process would name them)
    names, used_names = [], {}
    for f in files:
        k = used_names.get(f.stem, 0)
        used_names[f.stem] = k + 1
        names.append(f"{f.stem}.png" if k == 0 else f"{f.stem}_{k}.png")
    mine = dist_utils.shard(len(files))  # every index in a single process
    records, total = [], 0
    bar = tqdm(total=len(mine), desc="predict", leave=False, disable=not (sys.stderr.isatty() and dist_utils.is_main()))
    for pred in predictor.predict_iter([files[i] for i in mine], batch_size=batch_size):
        index = mine[pred.index]  # the image's position in the whole list: its COCO image id
        total += len(pred)
        pred.save(out_dir / names[index], score_thr=score_thr, **draw_kw)
        results, image = coco_records(pred, score_thr)  # RLE now: full-size masks are not kept
        for r in results:
            r["image_id"] = index
        image["id"] = index
        records.append((index, (results, image)))
        bar.update(1)
    bar.close()
    gathered = dist_utils.all_gather_object((records, total))
    if not dist_utils.is_main():
        return
    records = [rec for _, rec in sorted((r for part, _ in gathered for r in part), key=lambda r: r[0])]
    total = sum(t for _, t in gathered)
    categories = [{"id": c, "name": n} for c, n in zip(predictor.cat_ids, predictor.classes)]
    kept = write_coco_json(records, out_dir / "predictions.json", images_path=out_dir / "images.json",
                           categories=categories)
    print(f"{len(files)} images, {kept} detections with score >= {score_thr} "
          f"({total - kept} below it left out)")
    print(f"overlays: {out_dir}/*.png\npredictions (COCO results): {out_dir / 'predictions.json'}\n"
          f"image list: {out_dir / 'images.json'}")


def cmd_serve(args: argparse.Namespace) -> int:
    from instseg.api import Predictor
    from instseg.serve import require_extra, run

    for module in ("fastapi", "uvicorn", "multipart"):  # a missing extra fails before the model loads
        require_extra(module)
    predictor = Predictor(args.checkpoint, device=args.device or "auto", tta=args.tta, overrides=_flatten(args.set))
    print(f"instseg serve: {predictor.arch} on {predictor.device}; open http://{args.host}:{args.port}/", flush=True)
    run(predictor, args.host, args.port, max_upload_mb=args.max_upload_mb)
    return 0


_ARCH_NAMES = {"mask_rcnn": "Mask R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN", "htc": "HTC",
               "retinanet": "RetinaNet", "yolact": "YOLACT", "rdsnet": "RDSNet"}


def is_test_fixture(name: str, doc: str = "") -> bool:
    """Presets that exist for the parity tests (the small models of ``../shared/golden``)."""
    return name.endswith("_shapes") or "shared/golden" in doc


def describe_preset(name: str) -> str:
    """One line: the preset's own docstring (or what it builds), its backbone weights, and a
    ``[test fixture]`` mark for the parity-test models."""
    from instseg.config import presets

    fn = getattr(presets, "_PRESETS", {}).get(name)
    doc = " ".join((getattr(fn, "__doc__", None) or "").split("\n\n")[0].split()).replace("``", "")
    cfg = presets.get_preset(name)
    m = cfg.model
    what = doc or (f"{_ARCH_NAMES.get(m.arch, m.arch)}, {m.backbone}, "
                   + (f"{cfg.train.max_iters} iterations" if cfg.train.max_iters > 0 else f"{cfg.train.epochs} epochs"))
    if m.backbone_weights == "imagenet":
        weights = f"{m.backbone} from the bundled ImageNet weights"
    elif m.backbone_weights:
        weights = f"{m.backbone} from {m.backbone_weights}"
    else:
        weights = f"{m.backbone} from random init unless model.backbone_weights=FILE"
    mark = "[test fixture] " if is_test_fixture(name, doc) else ""
    return f"{mark}{what.rstrip('.')}; backbone: {weights}"


def cmd_presets(args: argparse.Namespace) -> int:
    from instseg.config.presets import list_presets

    names = list_presets()
    if args.names_only:
        print("\n".join(names))
        return 0
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe_preset(name)}")
    print("\nTrain with `instseg train --config NAME`; [test fixture] presets are the small models of the "
          "mmdetection parity tests, not meant for real training.")
    return 0


CONVERTERS = {
    "mmdet": "mmdetection v1-v3 checkpoint (.pth) of a Mask R-CNN / Cascade / HTC preset",
    "yolact": "official YOLACT checkpoint (.pth), e.g. yolact_base_54_800000.pth",
    "rdsnet": "official RDSNet checkpoint (.pth, mmdetection v1) of a rdsnet_* preset",
}

DATA_COMMANDS = {
    "check": ("instseg.data.tools", "check_main", "validate a COCO data set with the loader's rules; exit 1 on problems"),
    "browse": ("instseg.data.tools", "browse_main", "draw the annotations (optionally after the training transforms) to PNGs"),
    "convert": ("instseg.data.tools", "convert_main", "convert YOLO-seg / LabelMe to COCO, or COCO to YOLO-seg"),
    "synth": ("instseg.data.synthetic", "main", "write the built-in synthetic shapes data set"),
}


def _run_tool(fn, argv: list[str]) -> int:
    """Runs a sub-tool's ``main(argv)``; argparse's own exits become return codes."""
    try:
        return int(fn(argv) or 0)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2


def _list_usage(title: str, usage: str, entries: dict[str, str]) -> str:
    width = max(len(k) for k in entries)
    lines = [f"usage: {usage}", "", title]
    lines += [f"  {k:<{width}}  {v}" for k, v in entries.items()]
    return "\n".join(lines)


def cmd_convert(rest: list[str]) -> int:
    usage = _list_usage(
        "converters (instseg convert NAME -h for the options of one):",
        "instseg convert {" + ",".join(CONVERTERS) + "} CHECKPOINT --config PRESET --out FILE [...]",
        CONVERTERS,
    ) + "\n\nPRESET is an instseg preset name (`instseg presets` lists them), not an mmdetection config file."
    if not rest or rest[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    name = rest[0]
    if name not in CONVERTERS:
        raise CliError(f"unknown converter {name!r}; available: {', '.join(CONVERTERS)}")
    try:
        module = importlib.import_module(f"instseg.convert.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"instseg.convert.{name}":
            raise
        raise CliError(f"converter {name!r} is not part of this installation (no module instseg.convert.{name})") from None
    return _run_tool(module.main, rest[1:])


def cmd_export(rest: list[str]) -> int:
    from instseg.export import main as export_main

    return _run_tool(export_main, rest)


def cmd_data(rest: list[str]) -> int:
    usage = _list_usage(
        "commands (instseg data COMMAND -h for the options of one):",
        "instseg data {" + ",".join(DATA_COMMANDS) + "} ...",
        {k: v[2] for k, v in DATA_COMMANDS.items()},
    )
    if not rest or rest[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    if rest[0] not in DATA_COMMANDS:
        raise CliError(f"unknown data command {rest[0]!r}; available: {', '.join(DATA_COMMANDS)}")
    module_name, fn_name, _ = DATA_COMMANDS[rest[0]]
    module = importlib.import_module(module_name)
    return _run_tool(getattr(module, fn_name), rest[1:])


# ---------------------------------------------------------------------------------- parser


def _add_set(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set", action="append", nargs="+", metavar="KEY=VALUE", default=[],
        help=f"override a config field, e.g. --set {example} (repeatable; quote values with brackets "
             "or write them without: data.scale=800,600)",
    )


_CHECKPOINT_HELP = "instseg checkpoint (.pt): RUN/checkpoints/{last,best}.pt, or one written by `instseg convert`"

_TRAIN_DESCRIPTION = """Train a preset (or a config YAML) on any COCO-format data set.

Output goes to <train.output_dir>/NAME (default runs/<config name>): config.yaml, metrics.jsonl and
metrics.csv, checkpoints/{last,best}.pt, eval/ (COCO results, per-class tables, PR curves,
confusion matrices) and plots/.  If that folder already holds a run and --resume is not given, the
new run goes to NAME_1 (NAME_2, ...) and says so: an earlier run is never overwritten.
Useful options: train.patience=N (early stopping), train.ema=true (EMA weights),
train.tensorboard=true (needs the tensorboard extra), train.skip_nonfinite=true.
Several GPUs or machines: torchrun --nproc-per-node N -m instseg train ... (data.batch_size is per
process; see the README, "Distributed training")."""

_EVAL_DESCRIPTION = """COCO-evaluate a checkpoint (bbox, and segm for mask models) on COCO-format data.

Writes to --out: results.json, metrics.json, summary.txt (COCO's summary and a per-class table),
per_class_{bbox,segm}.csv, pr_{bbox,segm}.png (precision-recall curves) and
confusion_{bbox,segm}.{csv,png} (confusion matrix at IoU 0.5 with a background row and column).
An image that cannot be read is left out with a warning and listed in metrics.json."""

_PREDICT_DESCRIPTION = """Run a checkpoint on image files, folders, videos or a camera.

Images (read with their EXIF orientation applied) -> --out: one overlay PNG per image (masks
coloured by class), predictions.json (COCO results of the detections with score >= --score-thr,
each with its file_name) and images.json (the image list and categories).
Videos (.mp4, .mkv, .avi, .mov, .webm, ...; needs the video extra, PyAV) and --camera N ->
--out/NAME.mp4 (the overlays, one per frame, same frame rate) and --out/NAME.jsonl (one JSON line
per frame: frame, time, detections with RLE masks)."""


_SERVE_DESCRIPTION = """Serve a checkpoint over HTTP (FastAPI + uvicorn; needs the serve extra).

  GET  /          a web page: upload an image, see the overlay and the detections
  GET  /health    model, classes, device
  POST /predict   multipart field 'file' = the image; query score_thr (default 0.3), overlay=true
                  -> {"image", "detections" (COCO results with RLE masks and class_name), "categories"
                  [, "overlay": PNG data URL]}
Bad uploads get 400 (empty, no file), 413 (too large) or 415 (not an image) with {"detail": "..."}."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instseg", description="Instance segmentation: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a model on COCO-format data", description=_TRAIN_DESCRIPTION,
                       formatter_class=fmt)
    t.add_argument("--config", required=True, help="preset name (see `instseg presets`) or a config YAML file")
    t.add_argument("--cfg-file", action="append", nargs="+", default=[], metavar="YAML", help="YAML override file(s)")
    _add_set(t, "train.lr=0.01 train.patience=3")
    t.add_argument("--resume", action="store_true", help="continue runs/NAME from checkpoints/last.pt")
    t.add_argument("--name", help="run name: output goes to <train.output_dir>/NAME (default: the config name)")
    t.add_argument("--train-ann", metavar="JSON", help="COCO instances JSON of the training set (data.train_ann)")
    t.add_argument("--train-images", metavar="DIR", help="folder of the training images (data.train_images)")
    t.add_argument("--val-ann", metavar="JSON", help="COCO instances JSON of the validation set (data.val_ann)")
    t.add_argument("--val-images", metavar="DIR", help="folder of the validation images (data.val_images)")
    t.add_argument("--stuff-dir", dest="train_stuff", metavar="DIR",
                   help="COCO-Stuff-style PNG maps of the training images (data.train_stuff)")
    t.add_argument("--val-stuff-dir", dest="val_stuff", metavar="DIR", help="stuff maps of the validation images (data.val_stuff)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO-evaluate a checkpoint on COCO-format data", description=_EVAL_DESCRIPTION,
                       formatter_class=fmt)
    e.add_argument("--checkpoint", required=True, metavar="PT", help=_CHECKPOINT_HELP)
    e.add_argument("--ann", required=True, metavar="JSON", help="COCO instances JSON")
    e.add_argument("--images", required=True, metavar="DIR", help="folder of the images")
    e.add_argument("--max-dets", type=int, metavar="N", help="COCOeval maxDets (default: the checkpoint's data.max_dets)")
    e.add_argument("--stuff-dir", metavar="DIR", help="stuff maps folder (not needed for instance evaluation)")
    e.add_argument("--out", metavar="DIR", help="output folder (default: RUN/eval_<checkpoint stem>)")
    e.add_argument("--confusion-score-thr", type=float, default=0.3, metavar="S",
                   help="detections scoring below S are left out of the confusion matrix (default 0.3)")
    e.add_argument("--device", help="cpu | cuda | auto (default auto: CUDA when available)")
    e.add_argument("--tta", default=None, metavar="SPEC", help=TTA_HELP)
    e.add_argument("--amp", default="", choices=["", "fp16", "bf16"],
                   help="mixed-precision inference: fp16 (CUDA) or bf16 autocast; box decoding and NMS stay float32")
    _add_set(e, "model.score_thr=0.01 model.mask_merge=last")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="run a checkpoint on image files or folders", description=_PREDICT_DESCRIPTION,
                       formatter_class=fmt)
    p.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders, video files and/or camera:N")
    p.add_argument("--checkpoint", required=True, metavar="PT", help=_CHECKPOINT_HELP)
    p.add_argument("--images", nargs="+", metavar="PATH", help="image files and/or folders (same as PATH)")
    p.add_argument("--camera", type=int, metavar="N", help="also read camera N (/dev/videoN) until Ctrl-C or --max-frames")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop each video / camera after N frames")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per model call (default 1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (overlays, predictions.json, images.json; NAME.mp4 + NAME.jsonl per video)")
    p.add_argument("--score-thr", type=float, default=0.3, metavar="S",
                   help="keep detections with score >= S, in predictions.json and in the overlays (default 0.3)")
    p.add_argument("--boxes", action=argparse.BooleanOptionalAction, default=None,
                   help="draw boxes (default: only while an image shows at most 40 detections)")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=None,
                   help="draw 'class score' labels (default: only while an image shows at most 40 detections)")
    p.add_argument("--device", help="cpu | cuda | auto (default auto: CUDA when available)")
    p.add_argument("--tta", default=None, metavar="SPEC", help=TTA_HELP)
    _add_set(p, "model.score_thr=0.05 model.max_per_img=300")
    p.set_defaults(func=cmd_predict)

    v = sub.add_parser("serve", help="serve a checkpoint over HTTP (POST /predict, GET /health, a web page at /)",
                       description=_SERVE_DESCRIPTION, formatter_class=fmt)
    v.add_argument("--checkpoint", required=True, metavar="PT", help=_CHECKPOINT_HELP)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                   help="larger uploads are refused with 413 (default 10)")
    v.add_argument("--device", help="cpu | cuda | auto (default auto: CUDA when available)")
    v.add_argument("--tta", default=None, metavar="SPEC", help=TTA_HELP)
    _add_set(v, "model.max_per_img=300")
    v.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="export to ONNX / torch.export and verify (instseg export -h)", add_help=False)
    x.set_defaults(func=None, passthrough=cmd_export)
    c = sub.add_parser("convert", help="convert foreign checkpoints (instseg convert -h)", add_help=False)
    c.set_defaults(func=None, passthrough=cmd_convert)
    d = sub.add_parser("data", help="data tools: check, browse, convert, synth (instseg data -h)", add_help=False)
    d.set_defaults(func=None, passthrough=cmd_data)
    s = sub.add_parser("presets", help="list the config presets with a description of each",
                       description="List the config presets: name, what it builds, where its backbone weights come from.")
    s.add_argument("--names-only", action="store_true", help="print only the names")
    s.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if getattr(args, "passthrough", None) is None and rest:
            parser.parse_args(argv)  # reports the unknown arguments and exits 2
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    errors = _user_errors()
    try:
        if getattr(args, "passthrough", None) is not None:
            return args.passthrough(rest)
        return args.func(args)
    except errors as e:
        msg = e.args[0] if isinstance(e, (KeyError,)) and e.args else str(e)
        print(f"instseg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # NonFiniteLossError
        print(f"instseg {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
