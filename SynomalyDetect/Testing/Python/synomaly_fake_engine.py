"""A stand-in for the `synomaly` command line, for testing the Slicer side without torch or a GPU.

It speaks the engine's contract (JSON progress lines on stdout, `synomaly: error: ...` on stderr,
exit codes, SIGTERM -> exit 130 with nothing written, atomic output folder) and writes result
files with the engine's own torch-free writers from a plain intensity rule: voxels far above the volume's
mean are "anomalous". Only numpy, SimpleITK (both ship with Slicer) and those writers are used.

Run as `python fake_engine.py [-m synomaly.cli] COMMAND ...`. Environment knobs:
FAKE_SYNOMALY_DELAY (seconds per progress step), FAKE_SYNOMALY_FAIL (exit with this code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# the engine's torch-free parts (the contract and the result writers) sit two folders up, as in Slicer
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from synomaly.contract import LESION_COLUMNS  # noqa: E402
from synomaly.outputs import write_segmentation  # noqa: E402

DELAY = float(os.environ.get("FAKE_SYNOMALY_DELAY", "0"))


class Interrupted(Exception):
    pass


def _on_term(signum, frame):  # noqa: ARG001
    raise Interrupted


def progress(stage: str, done: int, total: int, message: str = "", **extra) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total, "message": message, **extra}), flush=True)


def error(message: str, code: int) -> int:
    print(f"synomaly: error: {message}", file=sys.stderr, flush=True)
    return code


def ijk_to_ras(image) -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = flip @ np.array(image.GetOrigin())
    return m


def cmd_detect(args) -> int:
    if args.fail:
        return error("fake failure requested", args.fail)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        return error(f"{out} exists; use --overwrite", 4)
    try:
        image = sitk.ReadImage(args.input)
    except RuntimeError as exc:
        return error(f"cannot read {args.input}: {str(exc).splitlines()[0]}", 2)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return error("expected a 3D grey-scale volume", 2)
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    progress("prepare", 1, 1, "volume read")
    n = a.shape[0]
    for k in range(n):
        time.sleep(DELAY)
        progress("detect", k + 1, n, f"slice {k + 1} of {n}")
    z = (a - a.mean()) / (a.std() + 1e-6)
    anomaly = np.clip(z - 2.0, 0, None).astype(np.float32)
    threshold = 0.5 if args.threshold is None else float(args.threshold)
    mask = anomaly > threshold
    healed = np.where(mask, np.median(a), a).astype(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".fake-synomaly-", dir=out.parent))
    try:
        for name, array in (("counterfactual.nrrd", healed), ("anomaly_map.nrrd", anomaly)):
            result = sitk.GetImageFromArray(array)
            result.CopyInformation(image)
            sitk.WriteImage(result, str(tmp / name), True)
        seg = sitk.GetImageFromArray(mask.astype(np.uint8))
        seg.CopyInformation(image)
        write_segmentation(seg, tmp / "anomaly.seg.nrrd")  # the engine's own .seg.nrrd writer
        columns = list(LESION_COLUMNS)
        rows = []
        if mask.any():
            kk, jj, ii = np.nonzero(mask)
            centroid = ijk_to_ras(image) @ np.array([ii.mean(), jj.mean(), kk.mean(), 1.0])
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
            rows.append([1, round(mask.sum() * voxel_ml, 6), float(anomaly[mask].max()), float(anomaly[mask].mean()),
                         *[round(float(c), 4) for c in centroid[:3]],
                         int(ii.min()), int(jj.min()), int(kk.min()), int(ii.max()), int(jj.max()), int(kk.max()),
                         int(mask.sum())])
        with open(tmp / "lesions.csv", "w", encoding="utf-8") as fh:
            fh.write(",".join(columns) + "\n")
            for row in rows:
                fh.write(",".join(str(v) for v in row) + "\n")
        (tmp / "report.json").write_text(json.dumps({"threshold": threshold, "lesions": len(rows),
                                                     "model": args.model or "fake"}))
        progress("postprocess", 1, 1, "results written")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("done", 1, 1, f"{len(rows)} lesions")
    return 0


def cmd_train(args) -> int:
    if args.fail:
        return error("fake training failure requested", args.fail)
    start = 0
    if args.resume:
        start = json.loads(Path(args.resume).read_text())["iteration"]
    progress("prepare", 2, 2, f"{len(args.data)} scans")
    checkpoint = Path(args.checkpoint or Path(args.output).with_suffix(".ckpt"))
    it = start
    try:
        for it in range(start + 1, args.iterations + 1):
            time.sleep(DELAY)
            extra = {"loss": 1.0 / it, "it_per_s": 10.0}
            if it % 5 == 0:
                extra["val_loss"] = 1.2 / it
            progress("train", it, args.iterations, "", **extra)
            checkpoint.write_text(json.dumps({"iteration": it}))
    except Interrupted:
        checkpoint.write_text(json.dumps({"iteration": it}))
        raise
    progress("calibrate", 1, 1, "thresholds calibrated")
    Path(args.output).write_bytes(b"fake model " + (args.name or "").encode())
    print(json.dumps({"model": args.output, "iterations": args.iterations, "checkpoint": str(checkpoint)}))
    return 0


def cmd_tune(args) -> int:
    if args.fail:
        return error("fake tuning failure requested", args.fail)
    for i, t in enumerate((25, 50, 100), start=1):
        time.sleep(DELAY)
        progress("tune", i, 3, f"single-stage predictions at t = {t}")
    Path(args.output).write_bytes(b"fake tuned model " + args.model.encode() + b" " + str(len(args.data)).encode())
    return 0


def cmd_install(args) -> int:
    folder = Path(os.environ.get("SYNOMALY_MODELS_DIR", tempfile.gettempdir()))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.file, folder / f"{args.name or Path(args.file).stem}.safetensors")
    return 0


def cmd_demo(args) -> int:
    if args.fail:
        return error("fake demo failure requested", args.fail)
    for i in range(1, 3):
        time.sleep(DELAY)
        progress("demo", i, 2, "writing the demo case")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    k, j, i = np.mgrid[:24, :48, :48].astype(np.float32)
    head = ((i - 24) ** 2 + (j - 24) ** 2) / 20 ** 2 + ((k - 12) / 11) ** 2 < 1
    a = np.where(head, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, head.shape)
    lesion = (i - 30) ** 2 + (j - 20) ** 2 + ((k - 12) * 2) ** 2 < 16
    a[lesion] = 300.0
    image = sitk.GetImageFromArray(a.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(out / "demo_lesion.nrrd"), True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["-m", "synomaly.cli"]:
        argv = argv[2:]
    p = argparse.ArgumentParser(prog="synomaly")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("detect")
    d.add_argument("input")
    d.add_argument("-o", "--output", required=True)
    for flag in ("--model", "--fpr", "--t", "--stages", "--blur", "--min-size", "--seed", "--batch-size", "--device",
                 "--progress"):
        d.add_argument(flag)
    d.add_argument("--threshold", type=float)
    d.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--val-data", nargs="+")
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--iterations", type=int, default=10)
    for flag in ("--base", "--resume", "--checkpoint", "--batch-size", "--lr", "--device", "--name", "--progress",
                 "--seed"):
        t.add_argument(flag)
    u = sub.add_parser("tune")
    u.add_argument("model")
    u.add_argument("--data", nargs="+", required=True)
    u.add_argument("-o", "--output", required=True)
    for flag in ("--device", "--progress"):
        u.add_argument(flag)
    i = sub.add_parser("install-model")
    i.add_argument("file")
    i.add_argument("--name")
    m = sub.add_parser("demo-data")
    m.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    args.fail = int(os.environ.get("FAKE_SYNOMALY_FAIL", "0"))
    signal.signal(signal.SIGTERM, _on_term)
    try:
        return {"detect": cmd_detect, "train": cmd_train, "tune": cmd_tune, "install-model": cmd_install,
                "demo-data": cmd_demo}[args.command](args)
    except (Interrupted, KeyboardInterrupt):
        print("synomaly: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
