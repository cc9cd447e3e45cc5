"""Export to ONNX or ``torch.export`` with post-processing that both runtimes share.

A detector is cut into *parts*: the network pieces with fixed tensor inputs and outputs, each a
method of one submodule (``extract_feats`` = backbone + FPN, the RPN / dense head's ``forward``,
HTC's semantic head, each cascade stage's box head and its mask head's ``features`` / ``logits``).
Each part becomes one graph (``DIR/NAME.onnx`` or ``DIR/NAME.pt2``).  Everything between the parts
-- anchors and box decoding, NMS, RoIAlign, cascade refinement, YOLACT's prototype assembly, mask
pasting -- stays in instseg's torch code and is *the same code* for both runtimes:
:func:`runtime_model` returns a copy of the model whose part methods call the exported graphs
(onnxruntime sessions or reloaded ``ExportedProgram`` s), so torch and the runtime differ only in
the graphs.

Input size: the dense parts take one image padded to a fixed square ``size`` (the config's largest
scale rounded up to the size divisor; :func:`pad_batch`), so their outputs have static shapes;
RoI parts take any number of RoIs (a dynamic first dimension).

``DIR/export.json`` names the parts, their files and the input/output structure of each (lists,
tuples, dataclasses such as the dense heads' outputs, constants such as level sizes).

The ``onnx`` format needs the ``export`` extra (``pip install 'instseg[export]'``: onnx,
onnxruntime, onnxscript); ``torch_export`` needs only torch.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.structures.instances import Detections, ImageBatch

FORMATS = ("onnx", "torch_export")
MANIFEST = "export.json"
OPSET = 18


class ExportError(ValueError):
    """A user-facing export problem (missing extra, unsupported model, failed verification)."""


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or an :class:`ExportError` naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"--format onnx needs the 'export' extra ({e.name} is missing): pip install 'instseg[export]'"
        ) from None
    return onnx, onnxruntime


# ------------------------------------------------------------------------ nested structures
# A part's arguments and results are nested lists / tuples / dataclasses of tensors (e.g. the FPN
# levels, ``DenseOutputs``).  A *spec* records the nesting, so the graphs can take and return flat
# tensor tuples and the shared torch code still receives the objects it expects.  Specs are plain
# JSON: {"t": i} a tensor leaf, {"list"|"tuple": [...]}, {"dc": "module:Class", "fields": {...}},
# {"const": value} for anything without tensors (None, level sizes).


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(o) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_has_tensor(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


def _to_json(value: Any) -> Any:
    """Constants as JSON, tuples marked so that they come back as tuples."""
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ExportError(f"cannot record a constant of type {type(value).__name__} in an export spec")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def flatten(obj: Any, leaves: list[Tensor] | None = None) -> tuple[list[Tensor], Any]:
    """``(tensor leaves in order, spec)`` of a nested structure."""
    leaves = [] if leaves is None else leaves
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return leaves, {"t": len(leaves) - 1}
    if not _has_tensor(obj):
        return leaves, {"const": _to_json(obj)}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return leaves, {kind: [flatten(o, leaves)[1] for o in obj]}
    fields = {f.name: flatten(getattr(obj, f.name), leaves)[1] for f in dataclasses.fields(obj)}
    return leaves, {"dc": f"{type(obj).__module__}:{type(obj).__qualname__}", "fields": fields}


def unflatten(leaves: Sequence[Tensor], spec: Any) -> Any:
    """Inverse of :func:`flatten`."""
    if "t" in spec:
        return leaves[spec["t"]]
    if "const" in spec:
        return _from_json(spec["const"])
    if "list" in spec:
        return [unflatten(leaves, s) for s in spec["list"]]
    if "tuple" in spec:
        return tuple(unflatten(leaves, s) for s in spec["tuple"])
    module, name = spec["dc"].split(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: unflatten(leaves, s) for k, s in spec["fields"].items()})


def flatten_spec_leaves(spec: Any) -> list[int]:
    """The tensor-leaf indices of a spec."""
    if "t" in spec:
        return [spec["t"]]
    if "const" in spec:
        return []
    children = spec.get("list") or spec.get("tuple") or list((spec.get("fields") or {}).values())
    return [i for child in children for i in flatten_spec_leaves(child)]


# ------------------------------------------------------------------------------------ parts


@dataclass(frozen=True)
class Part:
    """One exported graph: ``owner`` (dotted attribute path from the model; "" = the model) and
    the ``method`` of it that the graph replaces; ``rois``: its first dimension counts RoIs."""

    name: str
    owner: str
    method: str
    rois: bool = False


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for attr in filter(None, path.split(".")):
        obj = obj[int(attr)] if attr.isdigit() else getattr(obj, attr)
    return obj


def model_parts(model: nn.Module) -> list[Part]:
    """The parts of a detector, by the submodules it has (no family names: any two-stage model
    with a cascade RoI head, any model with ``bbox_head`` / ``mask_head`` is covered)."""
    parts = [Part("features", "", "extract_feats")]
    roi_head = getattr(model, "roi_head", None)
    if roi_head is not None:
        parts.append(Part("rpn", "rpn_head", "forward"))
        if getattr(roi_head, "semantic_head", None) is not None:
            parts.append(Part("semantic", "roi_head.semantic_head", "forward"))
        for t, stage in enumerate(roi_head.stages):
            parts.append(Part(f"stage{t}_box", f"roi_head.stages.{t}.box_head", "forward", rois=True))
            if getattr(stage, "mask_head", None) is not None:
                owner = f"roi_head.stages.{t}.mask_head"
                parts.append(Part(f"stage{t}_mask_features", owner, "features", rois=True))
                parts.append(Part(f"stage{t}_mask_logits", owner, "logits", rois=True))
        return parts
    if getattr(model, "bbox_head", None) is not None:
        parts.append(Part("head", "bbox_head", "forward"))
    if getattr(model, "mask_head", None) is not None:
        parts.append(Part("mask", "mask_head", "forward"))
    return parts


def record_calls(model: nn.Module, parts: Sequence[Part], runs: Sequence[Callable[[], Any]]) -> dict[str, tuple]:
    """The arguments of the first call of every part during ``runs`` (e.g. ``predict`` on each
    sample image, until every part has been reached: an image without detections skips the masks)."""
    seen: dict[str, tuple] = {}
    patched = []
    for part in parts:
        owner = _resolve(model, part.owner)
        original = getattr(owner, part.method)

        def recorder(*args: Any, _part: Part = part, _orig: Callable = original) -> Any:
            seen.setdefault(_part.name, args)
            return _orig(*args)

        setattr(owner, part.method, recorder)
        patched.append((owner, part.method))
    try:
        for run in runs:
            if len(seen) == len(parts):
                break
            run()
    finally:
        for owner, method in patched:
            delattr(owner, method)  # the instance attribute goes; the class method shows again
    missing = [p.name for p in parts if p.name not in seen]
    if missing:
        raise ExportError(f"the sample images gave no detections, so they did not reach the parts {missing}; "
                          "give images with objects (--images)")
    return seen


def _export_owner(model: nn.Module, part: Part) -> nn.Module:
    """The module whose parameters a part's graph holds: the part's owner, except that the
    model-level ``extract_feats`` gets a shallow copy of the model that keeps only backbone and
    neck (``torch.export`` stores every parameter of the module it is given, used or not)."""
    owner = _resolve(model, part.owner)
    if owner is not model:
        return owner
    holder = copy.copy(model)
    holder._modules = {k: m for k, m in model._modules.items() if k in ("backbone", "neck")}
    holder._parameters, holder._buffers = {}, {}
    return holder


class PartModule(nn.Module):
    """A part as a graph-friendly module: flat tensors in, flat tensor tuple out."""

    def __init__(self, owner: nn.Module, method: str, in_spec: Any) -> None:
        super().__init__()
        self.owner = owner  # registered: its parameters become the graph's weights
        self.method = method
        self.in_spec = in_spec

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        args = unflatten(flat, self.in_spec)
        return tuple(flatten(getattr(self.owner, self.method)(*args))[0])


# -------------------------------------------------------------------------- fixed-size input


def export_size(cfg: Any) -> int:
    """The square input side of the dense parts: the largest resized side, rounded up to the size divisor."""
    d = max(int(cfg.data.size_divisor), 1)
    side = max(int(s) for s in cfg.data.scale)
    return (side + d - 1) // d * d


def pad_batch(batch: ImageBatch, size: int) -> ImageBatch:
    """``batch`` zero-padded (bottom / right, as ``collate`` pads) to ``size x size``."""
    h, w = batch.images.shape[-2:]
    if h > size or w > size:
        raise ExportError(f"an input of {h}x{w} does not fit the exported size {size}x{size}")
    images = F.pad(batch.images, (0, size - w, 0, size - h))
    return dataclasses.replace(batch, images=images)


def load_batches(files: Sequence[str | Path], cfg: Any, size: int) -> list[ImageBatch]:
    """One padded single-image batch per file, through the model's test transforms."""
    from instseg.data.collate import collate
    from instseg.engine.inference import ImageFiles

    dataset = ImageFiles(files, cfg.data)
    return [pad_batch(collate([dataset[i]], cfg.data.size_divisor)[0], size) for i in range(len(dataset))]


def synthetic_images(folder: Path, num: int = 2) -> list[Path]:
    """A few of the built-in synthetic shape images (the default ``--verify`` input)."""
    from instseg.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(folder, num_train=0, num_val=num, seed=0, min_size=320, max_size=480)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:num]


# ---------------------------------------------------------------------------------- export


def export_model(
    model: nn.Module, samples: ImageBatch | Sequence[ImageBatch], out_dir: str | Path, fmt: str, *, meta: dict | None = None
) -> dict:
    """Writes every part of ``model`` (eval mode) as a graph under ``out_dir`` plus the manifest.

    ``samples`` (padded batches of one image, :func:`pad_batch`) go through ``predict`` to record
    each part's example inputs, until one with detections has reached the RoI / mask parts.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
        deform = sorted({type(m).__name__ for m in model.modules() if "deform" in type(m).__name__.lower()})
        if deform:
            # measured: the TorchScript exporter writes torchvision's deform_conv2d, but onnxruntime's
            # result differs completely (GA-RPN's adapted features), so refuse rather than export wrong
            raise ExportError(f"this model has deformable convolutions ({', '.join(deform)}: DCN or GA-RPN), "
                              "which do not export correctly to ONNX here")
    samples = [samples] if isinstance(samples, ImageBatch) else list(samples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    parts = model_parts(model)
    with torch.no_grad():
        calls = record_calls(model, parts, [lambda b=b: model.predict(b) for b in samples])
    entries = []
    for part in parts:
        flat_in, in_spec = flatten(list(calls[part.name]))
        module = PartModule(_export_owner(model, part), part.method, in_spec).eval()
        with torch.no_grad():
            flat_out, out_spec = flatten(getattr(_resolve(model, part.owner), part.method)(*calls[part.name]))
        file = out / f"{part.name}.{'onnx' if fmt == 'onnx' else 'pt2'}"
        t0 = time.perf_counter()
        try:
            (_export_onnx if fmt == "onnx" else _export_program)(module, flat_in, len(flat_out), part.rois, file)
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; name the part
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ExportError(f"part {part.name!r} ({part.owner or 'model'}.{part.method}) does not export "
                              f"to {fmt}: {type(e).__name__}: {first}") from e
        entries.append({
            **dataclasses.asdict(part), "file": file.name, "in_spec": in_spec, "out_spec": out_spec,
            "export_s": round(time.perf_counter() - t0, 2),
        })
    manifest = {"format": fmt, "size": int(samples[0].images.shape[-1]), "parts": entries, **(meta or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _roi_dims(n_in: int, n_out: int, rois: bool) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    names_in = [f"in{i}" for i in range(n_in)]
    names_out = [f"out{i}" for i in range(n_out)]
    dynamic = {name: {0: "rois"} for name in names_in + names_out} if rois else {}
    return names_in, names_out, dynamic


def _export_onnx(module: PartModule, flat_in: list[Tensor], n_out: int, rois: bool, file: Path) -> None:
    # The TorchScript-based exporter (dynamo=False): it handles these conv / linear / interpolate
    # graphs with a dynamic RoI dimension directly, where the dynamo exporter specialises sizes
    # that reach Python ints (e.g. ``flatten`` of the RoI features) unless every one is declared.
    names_in, names_out, dynamic = _roi_dims(len(flat_in), n_out, rois)
    torch.onnx.export(
        module, tuple(flat_in), str(file), input_names=names_in, output_names=names_out,
        dynamic_axes=dynamic or None, opset_version=OPSET, dynamo=False,
    )


def _export_program(module: PartModule, flat_in: list[Tensor], n_out: int, rois: bool, file: Path) -> None:
    dynamic = None
    if rois:
        n = torch.export.Dim("rois", min=1)
        dynamic = (tuple({0: n} for _ in flat_in),)  # one entry: the ``*flat`` varargs
    with torch.no_grad():
        program = torch.export.export(module, tuple(flat_in), dynamic_shapes=dynamic)
    torch.export.save(program, str(file))


# --------------------------------------------------------------------------------- runtime


def _onnx_runner(file: Path, threads: int) -> Callable[[list[Tensor]], list[Tensor]]:
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(flat: list[Tensor]) -> list[Tensor]:
        feeds = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, flat)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return run


def _program_runner(file: Path) -> Callable[[list[Tensor]], list[Tensor]]:
    module = torch.export.load(str(file)).module()

    def run(flat: list[Tensor]) -> list[Tensor]:
        with torch.no_grad():
            return list(module(*flat))

    return run


def runtime_model(model: nn.Module, export_dir: str | Path, *, threads: int = 0) -> nn.Module:
    """A copy of ``model`` whose parts run the exported graphs of ``export_dir``; everything else
    (pre- and post-processing) is ``model``'s own code.  Call ``predict`` on :func:`pad_batch`
    batches of the manifest's ``size``."""
    folder = Path(export_dir)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise ExportError(f"{folder} has no {MANIFEST}; export with `instseg export` first")
    manifest = json.loads(manifest_file.read_text())
    clone = copy.deepcopy(model).eval()
    for entry in manifest["parts"]:
        file = folder / entry["file"]
        runner = _onnx_runner(file, threads) if manifest["format"] == "onnx" else _program_runner(file)
        owner = _resolve(clone, entry["owner"])
        n_inputs = len(flatten_spec_leaves(entry["in_spec"]))
        setattr(owner, entry["method"], _graph_call(runner, entry["out_spec"], entry["name"], n_inputs))
    clone.export_size = manifest["size"]
    return clone


def _graph_call(
    runner: Callable[[list[Tensor]], list[Tensor]], out_spec: Any, name: str, n_inputs: int
) -> Callable[..., Any]:
    """The replacement method: flattens the arguments, runs the graph, rebuilds the result."""
    def call(*args: Any) -> Any:
        # (RoI graphs take 0 or 1 RoIs too: checked for both runtimes, the dimension is not specialised)
        flat, _ = flatten(list(args))
        if len(flat) != n_inputs:
            raise ExportError(f"part {name}: called with {len(flat)} tensors, the graph takes {n_inputs}")
        return unflatten(runner(flat), out_spec)

    return call


# -------------------------------------------------------------------------------- verification


def compare_detections(ref: Detections, got: Detections, *, score_thr: float = 0.05) -> dict:
    """Matches ``ref``'s detections at or above ``score_thr`` to ``got``'s (same label, closest
    box; each used once) and returns the worst differences."""
    keep = ref.scores >= score_thr
    cand = got.scores >= score_thr - 0.01  # a score at the threshold may sit just below in the other runtime
    rb, rl = ref.boxes[keep], ref.labels[keep]
    gb, gl = got.boxes[cand], got.labels[cand]
    rm = ref.masks[keep] if ref.masks is not None else None
    gm = got.masks[cand] if got.masks is not None else None
    used: set[int] = set()
    max_box, min_iou, unmatched = 0.0, 1.0, 0
    for i in range(rb.shape[0]):
        diff = (gb - rb[i]).abs().amax(dim=1) if gb.numel() else torch.zeros(0)
        order = [j for j in torch.argsort(diff).tolist() if j not in used and int(gl[j]) == int(rl[i])]
        if not order or float(diff[order[0]]) > 4.0:
            unmatched += 1
            continue
        j = order[0]
        used.add(j)
        max_box = max(max_box, float(diff[j]))
        if rm is not None and gm is not None:
            a, b = rm[i], gm[j]
            union = int((a | b).sum())
            min_iou = min(min_iou, 1.0 if union == 0 else int((a & b).sum()) / union)
    return {
        "detections": int(rb.shape[0]), "unmatched": unmatched, "labels_equal": unmatched == 0,
        "max_box_diff_px": max_box, "min_mask_iou": min_iou if rm is not None else None,
    }


def verify(model: nn.Module, runtime: nn.Module, batches: Sequence[ImageBatch], *, score_thr: float = 0.05) -> list[dict]:
    """torch vs the exported runtime on each batch (one image each): see :func:`compare_detections`."""
    rows = []
    for batch in batches:
        with torch.no_grad():
            ref = model.predict(batch)[0]
            got = runtime.predict(batch)[0]
        rows.append(compare_detections(ref, got, score_thr=score_thr))
    return rows


def verification_passed(rows: Sequence[dict], *, box_tol: float = 0.5, iou_min: float = 0.98) -> bool:
    return all(
        r["unmatched"] == 0 and r["max_box_diff_px"] <= box_tol
        and (r["min_mask_iou"] is None or r["min_mask_iou"] > iou_min)
        for r in rows
    )


# -------------------------------------------------------------------------------------- CLI


def format_rows(files: Sequence[str | Path], rows: Sequence[dict]) -> str:
    lines = [f"{'image':<28} {'dets':>5} {'unmatched':>9} {'max box diff px':>16} {'min mask IoU':>13}"]
    for f, r in zip(files, rows):
        iou = "-" if r["min_mask_iou"] is None else f"{r['min_mask_iou']:.4f}"
        lines.append(f"{Path(f).name[:28]:<28} {r['detections']:>5} {r['unmatched']:>9} "
                     f"{r['max_box_diff_px']:>16.2e} {iou:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``instseg export --checkpoint C --format onnx|torch_export --out DIR [--verify [--images ...]]``."""
    import argparse
    import tempfile

    from instseg.engine.checkpoint import load_model_from_checkpoint
    from instseg.engine.inference import collect_images

    parser = argparse.ArgumentParser(
        prog="instseg export",
        description="Export a checkpoint's network as ONNX or torch.export graphs (one per part: features, "
        "proposal / dense head, RoI-head stages); decoding, NMS, RoIAlign and mask pasting stay in instseg's "
        "torch code, shared by both runtimes. --verify compares torch with the exported runtime on images.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="instseg checkpoint (.pt)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (graphs + export.json)")
    parser.add_argument("--verify", action="store_true",
                        help="run torch and the exported runtime on --images and compare (exit 1 on a mismatch)")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="images for the example run and --verify (default: 2 built-in synthetic images)")
    parser.add_argument("--score-thr", type=float, default=0.05, metavar="S",
                        help="--verify compares the detections scoring >= S (default 0.05)")
    args = parser.parse_args(argv)
    if args.format == "onnx":
        require_onnx()
    model, cfg, classes = load_model_from_checkpoint(args.checkpoint, "cpu")
    size = export_size(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        files = collect_images(args.images) if args.images else synthetic_images(Path(tmp) / "synthetic")
        batches = load_batches(files, cfg, size)
        meta = {"checkpoint": str(args.checkpoint), "arch": cfg.model.arch, "classes": classes}
        manifest = export_model(model, batches, args.out, args.format, meta=meta)
        print(f"wrote {len(manifest['parts'])} {args.format} graphs ({', '.join(p['name'] for p in manifest['parts'])}) "
              f"for {size}x{size} inputs to {args.out}")
        if not args.verify:
            return 0
        rows = verify(model, runtime_model(model, args.out), batches, score_thr=args.score_thr)
        print(format_rows(files, rows))
    ok = verification_passed(rows)
    print("verify: " + ("OK (same labels, boxes within 0.5 px, mask IoU > 0.98)" if ok else "FAILED"))
    return 0 if ok else 1
