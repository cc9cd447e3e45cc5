"""The ``instseg`` command line: ``train | eval | predict | convert | data | presets``.

Run ``instseg COMMAND -h`` for the options of a command.  Configuration errors, data errors
and missing files end with exit code 2 and a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import json
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


class CliError(Exception):
    """A usage error detected after argument parsing (exit code 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, CliError, FileNotFoundError, NotADirectoryError]
    from instseg.engine.checkpoint import CheckpointError

    errors.append(CheckpointError)
    try:
        from instseg.data import DataError

        errors.append(DataError)
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
    result = train(cfg, resume=args.resume, run_dir=run_dir)
    print(f"\nrun: {result['run_dir']}  ({result['iter']} iterations, {result['stopped']})")
    if result["metrics"]:
        print(format_metrics(result["metrics"]))
    if result["best"].get("metric"):
        print(f"best {result['best']['metric']} = {result['best']['value']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from instseg.data import DataError, build_dataset
    from instseg.engine.checkpoint import load_model_from_checkpoint
    from instseg.engine.inference import evaluate, format_metrics
    from instseg.engine.trainer import resolve_device

    if not Path(args.ann).is_file():
        raise FileNotFoundError(f"--ann: annotation file not found: {args.ann}")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images: folder not found: {args.images}")

    def update(cfg: Config) -> None:
        apply_overrides(cfg, [], _flatten(args.set))
        cfg.data.val_ann, cfg.data.val_images = str(args.ann), str(args.images)
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
    device = resolve_device(args.device or cfg.train.device)
    model.to(device).optimize_for_inference()
    ckpt = Path(args.checkpoint).resolve()
    if args.out:
        out_dir = Path(args.out)
    elif ckpt.parent.name == "checkpoints":  # runs/NAME/checkpoints/X.pt -> runs/NAME/eval_X
        out_dir = ckpt.parent.parent / f"eval_{ckpt.stem}"
    else:
        out_dir = Path(f"eval_{ckpt.stem}")
    metrics = evaluate(model, dataset, cfg, out_dir, cat_ids=ckpt_ids)
    print(format_metrics(metrics))
    print(f"results and metrics written to {out_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from instseg.data import build_test_loader
    from instseg.engine.checkpoint import load_model_from_checkpoint
    from instseg.engine.inference import ImageFiles, collect_images, predict_dataset
    from instseg.engine.trainer import resolve_device
    from instseg.evaluation.coco import detections_to_coco, write_results_json
    from instseg.visualize import save_overlay

    files = collect_images(args.images)
    model, cfg, classes = load_model_from_checkpoint(
        args.checkpoint, "cpu", update_cfg=lambda c: apply_overrides(c, [], _flatten(args.set))
    )
    device = resolve_device(args.device or cfg.train.device)
    model.to(device).optimize_for_inference()
    dataset = ImageFiles(files, cfg.data)
    loader = build_test_loader(cfg.data, dataset, batch_size=1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cat_ids = [int(c) for c in classes["cat_ids"]]
    names = list(classes.get("class_names") or [str(c) for c in cat_ids])
    results, images = [], []
    used_names: dict[str, int] = {}
    for meta, dets in predict_dataset(model, loader, device, progress=True):
        path = Path(meta.file_name)
        h, w = meta.original_size
        images.append({"id": meta.image_id, "file_name": str(path), "height": int(h), "width": int(w)})
        for r in detections_to_coco(dets, meta.image_id, cat_ids):
            r["file_name"] = str(path)
            results.append(r)
        stem = path.stem
        k = used_names.get(stem, 0)
        used_names[stem] = k + 1
        png = out_dir / (f"{stem}.png" if k == 0 else f"{stem}_{k}.png")
        save_overlay(png, dataset.load_image(meta.image_id), dets, names, score_thr=args.score_thr)
    write_results_json(results, out_dir / "predictions.json")
    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, names)]
    (out_dir / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1) + "\n")
    shown = sum(1 for r in results if r["score"] >= args.score_thr)
    print(f"{len(files)} images, {len(results)} detections ({shown} with score >= {args.score_thr})")
    print(f"overlays: {out_dir}/*.png\npredictions (COCO results): {out_dir / 'predictions.json'}\nimage list: {out_dir / 'images.json'}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from instseg.config.presets import list_presets

    for name in list_presets():
        print(name)
    return 0


def cmd_convert(rest: list[str]) -> int:
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: instseg convert mmdet CKPT --config PRESET --out FILE")
        return 0 if rest else 2
    if rest[0] != "mmdet":
        raise CliError(f"unknown converter {rest[0]!r}; available: mmdet")
    from instseg.convert.mmdet import main as convert_main

    return int(convert_main(rest[1:]) or 0)


def cmd_data(rest: list[str]) -> int:
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: instseg data synth --out DIR [...]")
        return 0 if rest else 2
    if rest[0] != "synth":
        raise CliError(f"unknown data command {rest[0]!r}; available: synth")
    from instseg.data.synthetic import main as synth_main

    return int(synth_main(rest[1:]) or 0)


# ---------------------------------------------------------------------------------- parser


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", action="append", nargs="+", metavar="KEY=VALUE", default=[],
        help="override a config field, e.g. --set train.lr=0.01 model.score_thr=0.3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instseg", description="Instance segmentation: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a model on COCO-format data",
                       description="Train a preset (or a config YAML) on any COCO-format data set.")
    t.add_argument("--config", required=True, help="preset name (see `instseg presets`) or a config YAML file")
    t.add_argument("--cfg-file", action="append", nargs="+", default=[], metavar="YAML", help="YAML override file(s)")
    _add_set(t)
    t.add_argument("--resume", action="store_true", help="continue runs/NAME from checkpoints/last.pt")
    t.add_argument("--name", help="run name: output goes to <train.output_dir>/NAME (default: the config name)")
    t.add_argument("--train-ann", help="COCO instances JSON of the training set (data.train_ann)")
    t.add_argument("--train-images", help="folder of the training images (data.train_images)")
    t.add_argument("--val-ann", help="COCO instances JSON of the validation set (data.val_ann)")
    t.add_argument("--val-images", help="folder of the validation images (data.val_images)")
    t.add_argument("--stuff-dir", dest="train_stuff", help="COCO-Stuff-style PNG maps of the training images (data.train_stuff)")
    t.add_argument("--val-stuff-dir", dest="val_stuff", help="stuff maps of the validation images (data.val_stuff)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO-evaluate a checkpoint on COCO-format data")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--ann", required=True, help="COCO instances JSON")
    e.add_argument("--images", required=True, help="folder of the images")
    e.add_argument("--max-dets", type=int, help="COCOeval maxDets (default: the checkpoint's data.max_dets)")
    e.add_argument("--stuff-dir", help="stuff maps folder (not needed for instance evaluation)")
    e.add_argument("--out", help="folder for results.json / metrics.json (default: RUN/eval_<checkpoint stem>)")
    e.add_argument("--device", help="cpu | cuda | auto (default: the checkpoint's train.device)")
    _add_set(e)
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="run a checkpoint on image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output folder (overlays, predictions.json)")
    p.add_argument("--score-thr", type=float, default=0.3, help="score threshold of the overlays")
    p.add_argument("--device", help="cpu | cuda | auto (default: the checkpoint's train.device)")
    _add_set(p)
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("convert", help="convert checkpoints (instseg convert mmdet -h)", add_help=False)
    c.set_defaults(func=None, passthrough=cmd_convert)
    d = sub.add_parser("data", help="data tools (instseg data synth -h)", add_help=False)
    d.set_defaults(func=None, passthrough=cmd_data)
    s = sub.add_parser("presets", help="list the config presets")
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
