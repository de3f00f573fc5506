"""Whole cohorts: one detection per scan into OUTDIR/<scan id>/, split into parts for job arrays, resumable.

A cohort run is a loop over scans that calls the same two functions as `synomaly detect`
(`prepare.read_scan`, `outputs.detect_to_folder`); it adds what a cluster needs:

- scan ids that are stable and safe as folder names, and a fixed, balanced partition of the sorted
  list, so that an array job's task needs only its index (`part_from_environment`);
- resumption: a scan whose folder is complete is skipped; results are moved into place whole
  (`outputs.write_results`), and the temporaries a killed run left behind are removed on the rerun;
- failure isolation: a failing scan is recorded (OUTDIR/_cohort/part-I-of-N.jsonl) with its message
  and the loop goes on;
- K worker processes on one machine (one device each when several GPUs exist, the CPU threads split
  between them otherwise).

`cohort_report` merges every part into OUTDIR/cohort.csv, a summary and a picture of the largest findings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .contract import RESULT_FILES
from .errors import InputError, PartialFailure, SettingsError, SynomalyError
from .prepare import SCAN_SUFFIXES, read_list
from .progress import ProgressFn, null_progress

log = logging.getLogger(__name__)

BOOKKEEPING = "_cohort"  # OUTDIR/_cohort/: the scan list and the per-part status files (no id starts with "_")
REPORT_COLUMNS = ["scan", "status", "lesion_count", "anomalous_ml", "max_score", "seconds", "message", "path"]
_NOT_IMAGES = (".txt", ".csv", ".json", ".md", ".py", ".sh", ".raw", ".zraw", ".gz", ".bak")  # never a DICOM file


class CohortFailures(PartialFailure):
    """Some scans of a cohort failed; the others have their results (exit code 6)."""


@dataclass(frozen=True)
class Scan:
    """One scan of a cohort: its id (the name of its result folder), where it is, and its DICOM series."""

    id: str
    path: str
    series: Optional[str] = None


# ---------------------------------------------------------------- finding scans and naming them


def safe_id(text: str) -> str:
    """A folder name from any text: letters, digits, '_' and '-' only, not hidden, at most 80 characters."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    if len(s) > 80:
        s = s[:71] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return s or "scan"


def _strip_suffix(name: str) -> str:
    """A file name without its image suffix ('sub-01_T1w.nii.gz' -> 'sub-01_T1w')."""
    low = name.lower()
    for suffix in SCAN_SUFFIXES + (".dcm",):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _scans_in_folder(folder: Path, root: Path) -> list[tuple[str, str, Optional[str]]]:
    """(name, path, series) of every scan under `folder`: each image file is one scan, each DICOM series
    one scan; sub-folders are searched too; hidden files and folders are ignored."""
    import SimpleITK as sitk

    if (folder / BOOKKEEPING).is_dir():  # a cohort's own results (OUTDIR inside the scans' folder) are no scans
        return []
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.name.lower().endswith(SCAN_SUFFIXES)]
    others = [p for p in files if p not in images and not p.name.lower().endswith(_NOT_IMAGES)]
    rel = folder.relative_to(root).as_posix() if folder != root else ""
    out: list[tuple[str, str, Optional[str]]] = []
    for p in images:
        out.append((f"{rel}/{_strip_suffix(p.name)}" if rel else _strip_suffix(p.name), str(p), None))
    if others:  # DICOM files (with or without the .dcm suffix): one scan per series
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        name = rel or folder.name
        if len(ids) == 1:
            out.append((name, str(folder), None))
        for sid in ids if len(ids) > 1 else []:
            out.append((f"{name}/{hashlib.sha1(sid.encode()).hexdigest()[:8]}", str(folder), sid))
    for sub in (p for p in entries if p.is_dir()):
        out.extend(_scans_in_folder(sub, root))
    return out


def _scans_in_csv(path: Path) -> list[tuple[str, str, Optional[str]]]:
    """Scans listed in a CSV file with a header: a 'path' column (else the first), optional 'id' and 'series'."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    columns = list(rows[0].keys())
    col = "path" if "path" in columns else columns[0]
    out = []
    for row in rows:
        value = (row.get(col) or "").strip()
        if not value or value.startswith("#"):
            continue
        p = Path(value) if Path(value).is_absolute() else path.parent / value
        if not p.exists():
            raise InputError(f"{path}: listed scan {value!r} does not exist")
        series = (row.get("series") or "").strip() or None
        given = (row.get("id") or "").strip()
        if given or series or not p.is_dir():
            out.append((given or _strip_suffix(p.name), str(p), series))
        else:
            out.extend(_scans_in_folder(p, p.parent))
    return out


def find_scans(items: Sequence[str]) -> list[Scan]:
    """The cohort's scans, sorted by id: files, folders of scans (searched recursively; one scan per image
    file or DICOM series), and .txt (one path a line) or .csv lists (a 'path' column; optional 'id' and
    'series'). Ids come from the file name (within a folder given: its path there, '/' -> '_'); two
    scans that would share an id both get a short hash of their path appended."""
    named: list[tuple[str, str, Optional[str]]] = []
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix.lower() == ".csv":
            named.extend(_scans_in_csv(p))
        elif p.is_file() and p.suffix.lower() == ".txt":
            named.extend((s.id, s.path, s.series) for s in find_scans(read_list(p)))
        elif p.is_dir():
            found = _scans_in_folder(p, p)
            if not found:
                raise InputError(f"{p}: folder holds no scans")
            named.extend(found)
        elif p.is_file():
            named.append((_strip_suffix(p.name), str(p), None))
        else:
            raise InputError(f"{p}: no such file or folder")
    seen: set[tuple[str, Optional[str]]] = set()
    unique = []
    for name, path, series in named:  # the same scan given twice is one scan
        key = (str(Path(path).resolve()), series)
        if key not in seen:
            seen.add(key)
            unique.append((safe_id(name), path, series))
    counts: dict[str, int] = {}
    for sid, _, _ in unique:
        counts[sid.casefold()] = counts.get(sid.casefold(), 0) + 1  # case-insensitive file systems too
    scans = []
    for sid, path, series in unique:
        if counts[sid.casefold()] > 1:
            digest = hashlib.sha1(f"{Path(path).resolve()}|{series or ''}".encode()).hexdigest()[:8]
            sid = f"{sid}-{digest}"
        scans.append(Scan(sid, path, series))
    return sorted(scans, key=lambda s: s.id)


# ---------------------------------------------------------------- parts of a job array


def partition(n: int, num_parts: int, part_id: int) -> range:
    """Indices of part `part_id` (0-based) of `num_parts` over n sorted items: contiguous, sizes differ by one
    at most, every item in exactly one part."""
    if num_parts < 1:
        raise SettingsError(f"the number of parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise SettingsError(f"the part id must lie between 0 and {num_parts - 1}, got {part_id}")
    return range(part_id * n // num_parts, (part_id + 1) * n // num_parts)


def _int_var(env: Mapping[str, str], name: str) -> Optional[int]:
    """An integer environment variable, None when unset or not a number ('undefined' in SGE)."""
    value = env.get(name, "").strip()
    return int(value) if re.fullmatch(r"-?\d+", value) else None


def part_from_environment(env: Mapping[str, str]) -> tuple[Optional[int], Optional[int], str]:
    """(0-based part id, number of parts or None, where from) of a job-array task, or (None, None, '').

    SLURM: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT (any start works; a
    step in --array does not). SGE/UGE (1-based): (SGE_TASK_ID - SGE_TASK_FIRST) / SGE_TASK_STEPSIZE,
    of (LAST - FIRST) / STEPSIZE + 1. LSF (1-based): LSB_JOBINDEX - 1 (give --num-parts). PBS Pro
    PBS_ARRAY_INDEX and Torque PBS_ARRAYID are taken as 0-based (give --num-parts)."""
    task = _int_var(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        low = _int_var(env, "SLURM_ARRAY_TASK_MIN") or 0
        return task - low, _int_var(env, "SLURM_ARRAY_TASK_COUNT"), "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN"
    task = _int_var(env, "SGE_TASK_ID")
    if task is not None:
        first = _int_var(env, "SGE_TASK_FIRST") or 1
        step = _int_var(env, "SGE_TASK_STEPSIZE") or 1
        last = _int_var(env, "SGE_TASK_LAST")
        count = (last - first) // step + 1 if last is not None else None
        return (task - first) // step, count, "(SGE_TASK_ID - SGE_TASK_FIRST) / SGE_TASK_STEPSIZE (SGE is 1-based)"
    task = _int_var(env, "LSB_JOBINDEX")
    if task is not None and task > 0:  # LSF sets 0 for a job that is not an array
        return task - 1, None, "LSB_JOBINDEX - 1 (LSF is 1-based)"
    for name in ("PBS_ARRAY_INDEX", "PBS_ARRAYID"):
        task = _int_var(env, name)
        if task is not None:
            return task, None, f"{name} (taken as 0-based)"
    return None, None, ""


def resolve_part(num_parts: Optional[int], part_id: Optional[int],
                 env: Optional[Mapping[str, str]] = None) -> tuple[int, int, str]:
    """(part id, number of parts, where they came from): the options, else the job array's variables,
    else the whole list as one part."""
    env = os.environ if env is None else env
    env_part, env_parts, source = part_from_environment(env)
    if part_id is not None:
        part, source = part_id, "--part-id"
    elif env_part is not None:
        part = env_part
    elif num_parts not in (None, 1):
        raise SettingsError("--num-parts needs --part-id (or a job array's index variable, e.g. SLURM_ARRAY_TASK_ID)")
    else:
        return 0, 1, "the whole list"
    parts = num_parts if num_parts is not None else (env_parts if part_id is None else None)
    if parts is None:
        raise SettingsError(f"the part comes from {source}; give the number of parts with --num-parts")
    if not 0 <= part < parts:
        raise SettingsError(f"part {part} (from {source}) does not lie between 0 and {parts - 1}")
    return part, parts, source


# ---------------------------------------------------------------- one scan


def is_complete(folder: Path) -> bool:
    """Whether a scan's result folder holds every output and a readable report."""
    if not all((folder / name).is_file() for name in RESULT_FILES.values()):
        return False
    try:
        json.loads((folder / RESULT_FILES["report"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def remove_temporaries(outdir: Path, scan_ids: Sequence[str]) -> int:
    """Delete what killed runs left for these scans: '.ID.tmp-*' (results being written), '.ID.old-*'
    (results being replaced) and '.ID.probe-*'; returns how many. Only the given ids are touched, so
    parts of an array running at the same time never remove each other's work."""
    removed = 0
    ids = set(scan_ids)
    for entry in outdir.iterdir() if outdir.is_dir() else []:
        m = re.fullmatch(r"\.(.+)\.(tmp|old|probe)-.*", entry.name)
        if m and m.group(1) in ids:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _max_score(report: dict[str, Any]) -> float:
    """The highest anomaly score inside the scan's lesions (0 when none)."""
    return max((float(r["max_score"]) for r in report.get("lesions", [])), default=0.0)


def _failure_message(exc: BaseException) -> str:
    """One line that says why a scan failed."""
    import torch

    if isinstance(exc, SynomalyError):
        return str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError):
        return f"out of memory: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"unexpected {type(exc).__name__}: {first}"


def process_scan(scan: Scan, model, settings, outdir: Path, *, expect: str = "any",
                 compress: bool = False) -> dict[str, Any]:
    """Detect in one scan into outdir/<id>/ exactly as `synomaly detect` does; a record of what happened
    (status 'ok' or 'failed' with the message) instead of an exception, except for interruptions."""
    from .outputs import detect_to_folder
    from .prepare import read_scan

    start = time.perf_counter()
    record: dict[str, Any] = {"scan": scan.id, "path": scan.path, "series": scan.series,
                              "device": str(model.device), "pid": os.getpid()}
    target = outdir / scan.id
    try:
        image = read_scan(scan.path, series_id=scan.series, expect=expect)
        result, _ = detect_to_folder(image, model, settings, target, overwrite=target.exists(), compress=compress)
    except Exception as exc:  # noqa: BLE001 - one scan's failure must not stop the cohort
        log.info("scan %s failed", scan.id, exc_info=True)
        record.update(status="failed", message=_failure_message(exc))
    else:
        rep = result.report
        record.update(status="ok", lesion_count=rep["lesion_count"], anomalous_ml=rep["anomalous_volume_ml"],
                      max_score=_max_score({"lesions": result.lesions}), network_seconds=rep["network_seconds"],
                      message="; ".join(rep.get("warnings", [])))
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record


# ---------------------------------------------------------------- the run


@dataclass
class CohortOptions:
    """How a cohort runs: which part, how many worker processes, what each detection accepts and writes."""

    num_parts: int = 1
    part_id: int = 0
    workers: int = 1
    expect: str = "any"
    compress: bool = False


def _write_scan_list(outdir: Path, scans: Sequence[Scan], num_parts: int) -> Path:
    """OUTDIR/_cohort/scans.csv: every scan of the cohort with its part (the same file from every part)."""
    folder = outdir / BOOKKEEPING
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scans.csv"
    tmp = folder / f".scans.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["scan", "path", "series", "part", "num_parts"])
        for part in range(num_parts):
            for i in partition(len(scans), num_parts, part):
                w.writerow([scans[i].id, scans[i].path, scans[i].series or "", part, num_parts])
    os.replace(tmp, path)
    return path


def _worker_devices(device: str, workers: int) -> list[str]:
    """The device of each worker: one GPU each (round robin) when several exist, else all the same."""
    import torch

    from .device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [str(dev)] * workers


def run_cohort(scans: Sequence[Scan], outdir: str | Path, model_ref: str | Path, settings,
               options: Optional[CohortOptions] = None, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Detect in this part's scans that have no complete results yet; returns counts, failures and times.

    The status of every scan attempted is appended to OUTDIR/_cohort/part-I-of-N.jsonl as it finishes."""
    from .modelio import read_card, resolve_model_path

    options = options or CohortOptions()
    settings = settings.validate()
    if options.workers < 1:
        raise SettingsError(f"--workers must be at least 1, got {options.workers}")
    outdir = Path(outdir)
    model_path = resolve_model_path(model_ref)
    read_card(model_path)  # a broken model file stops the run before any scan
    scans = sorted(scans, key=lambda s: s.id)
    mine = [scans[i] for i in partition(len(scans), options.num_parts, options.part_id)]
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        _write_scan_list(outdir, scans, options.num_parts)
    except OSError as exc:
        from .errors import OutputError

        raise OutputError(f"cannot write in {outdir}: {exc.strerror}") from exc
    cleaned = remove_temporaries(outdir, [s.id for s in mine])
    if cleaned:
        log.warning("removed %d temporary folder(s) left by an interrupted run", cleaned)
    todo = [s for s in mine if not is_complete(outdir / s.id)]
    status_path = outdir / BOOKKEEPING / f"part-{options.part_id}-of-{options.num_parts}.jsonl"
    summary: dict[str, Any] = {"scans": len(scans), "part": options.part_id, "num_parts": options.num_parts,
                               "in_part": len(mine), "skipped": len(mine) - len(todo), "ok": 0, "failed": 0,
                               "failures": [], "status_file": str(status_path), "cleaned": cleaned}
    t0 = time.perf_counter()
    progress("cohort", 0, len(todo), f"{len(todo)} of {len(mine)} scans to do ({summary['skipped']} complete)")
    with open(status_path, "a", encoding="utf-8") as status:

        def record(rec: dict[str, Any]) -> None:
            status.write(json.dumps(rec) + "\n")
            status.flush()
            summary[rec["status"]] += 1
            if rec["status"] == "failed":
                summary["failures"].append((rec["scan"], rec["message"]))
            done = summary["ok"] + summary["failed"]
            what = (f"{rec['lesion_count']} lesion(s), {rec['anomalous_ml']:.2f} mL" if rec["status"] == "ok"
                    else f"FAILED: {rec['message']}")
            progress("cohort", done, len(todo), f"{rec['scan']}: {what} ({rec['seconds']:.1f} s)")

        devices = _worker_devices(settings.device, options.workers)
        if options.workers == 1 or len(todo) <= 1:
            from .modelio import load_model

            model = load_model(model_path, device=devices[0], precision=settings.precision)
            for scan in todo:
                record(process_scan(scan, model, settings, outdir, expect=options.expect, compress=options.compress))
        else:
            _run_workers(todo, outdir, model_path, settings, options, devices, record)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# ---------------------------------------------------------------- worker processes


def _threads_per_worker(devices: Sequence[str]) -> int:
    """CPU threads for each worker: the CPU's threads split between the workers that compute on it."""
    import torch

    on_cpu = sum(d == "cpu" for d in devices)
    return max(1, torch.get_num_threads() // max(1, on_cpu))


def _worker_main(index: int, config: dict[str, Any], tasks, results) -> None:
    """A worker process: load the model once, then detect in each scan it is given until None."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the workers itself
    logging.basicConfig(level=config["log_level"], format="%(levelname)s %(name)s: %(message)s")
    if config["device"] == "cpu":
        torch.set_num_threads(config["threads"])
    try:
        from .modelio import load_model

        model = load_model(config["model"], device=config["device"], precision=config["precision"])
    except Exception as exc:  # noqa: BLE001 - told to the main process, which stops the run
        results.put(("fatal", index, _failure_message(exc)))
        return
    results.put(("ready", index, None))
    while True:
        scan = tasks.get()
        if scan is None:
            return
        rec = process_scan(scan, model, config["settings"], Path(config["outdir"]), expect=config["expect"],
                           compress=config["compress"])
        rec["worker"] = index
        results.put(("done", index, rec))


def _run_workers(todo: Sequence[Scan], outdir: Path, model_path: Path, settings, options: CohortOptions,
                 devices: Sequence[str], record) -> None:
    """Hand the scans to K worker processes one at a time; a worker that dies is replaced, and the scan it
    was working on is recorded as failed."""
    import queue
    from collections import deque

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pending = deque(todo)
    threads = _threads_per_worker(devices)
    base = {"model": str(model_path), "precision": settings.precision, "settings": settings, "outdir": str(outdir),
            "expect": options.expect, "compress": options.compress, "threads": threads,
            "log_level": logging.getLogger().level}
    workers: dict[int, dict[str, Any]] = {}

    def start(index: int) -> None:
        tasks = ctx.Queue()
        config = dict(base, device=devices[index % len(devices)])
        proc = ctx.Process(target=_worker_main, args=(index, config, tasks, results), daemon=True)
        proc.start()
        workers[index] = {"proc": proc, "tasks": tasks, "current": None, "index": index}

    def give(w: dict[str, Any]) -> None:
        if pending:
            w["current"] = pending.popleft()
            w["tasks"].put(w["current"])
        else:
            w["current"] = None
            w["tasks"].put(None)
            w["done"] = True

    for i in range(min(options.workers, len(todo))):
        start(i)
    next_index = len(workers)
    restarts = 0
    try:
        while any(not w.get("done") for w in workers.values()):
            try:
                kind, index, payload = results.get(timeout=0.5)
            except queue.Empty:
                for w in list(workers.values()):
                    if w.get("done") or w["proc"].is_alive():
                        continue
                    code = w["proc"].exitcode
                    if w["current"] is not None:
                        scan = w["current"]
                        why = "killed, perhaps for memory" if code == -9 else f"exit code {code}"
                        record({"scan": scan.id, "path": scan.path, "series": scan.series, "status": "failed",
                                "message": f"the worker process ended while detecting ({why})", "seconds": 0.0,
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
                    w["done"] = True
                    if pending and restarts < len(todo):
                        restarts += 1
                        start(next_index)
                        next_index += 1
                continue
            w = workers[index]
            if kind == "fatal":
                raise SynomalyError(f"worker {index} cannot load the model: {payload}")
            if kind == "done":
                if w["current"] is None or payload["scan"] != w["current"].id:
                    continue
                record(payload)
            give(w)
    finally:
        for w in workers.values():
            if w["proc"].is_alive() and not w.get("done"):
                w["proc"].terminate()
        for w in workers.values():
            w["proc"].join(timeout=30)
            if w["proc"].is_alive():
                w["proc"].kill()


# ---------------------------------------------------------------- the report


def _status_records(outdir: Path) -> dict[str, dict[str, Any]]:
    """The latest status record of each scan over every part's status file."""
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted((outdir / BOOKKEEPING).glob("part-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if rec.get("scan") and rec.get("finished", "") >= latest.get(rec["scan"], {}).get("finished", ""):
                latest[rec["scan"]] = rec
    return latest


def cohort_rows(outdir: str | Path) -> list[dict[str, Any]]:
    """One row per scan of the cohort: status ok (complete results), failed (with its message) or missing
    (not processed yet), lesion count, anomalous mL, highest score in a lesion, seconds."""
    outdir = Path(outdir)
    listing = outdir / BOOKKEEPING / "scans.csv"
    if not listing.is_file():
        raise InputError(f"{outdir} is not a cohort folder (no {BOOKKEEPING}/scans.csv); run `synomaly cohort` first")
    with open(listing, newline="", encoding="utf-8") as fh:
        scans = list(csv.DictReader(fh))
    latest = _status_records(outdir)
    rows = []
    for s in sorted(scans, key=lambda r: r["scan"]):
        sid = s["scan"]
        rec = latest.get(sid, {})
        row = {"scan": sid, "status": "missing", "lesion_count": "", "anomalous_ml": "", "max_score": "",
               "seconds": "", "message": "", "path": s["path"]}
        if is_complete(outdir / sid):
            report = json.loads((outdir / sid / "report.json").read_text(encoding="utf-8"))
            seconds = rec["seconds"] if rec.get("status") == "ok" else report.get("seconds", {}).get("total", "")
            row.update(status="ok", lesion_count=int(report["lesion_count"]),
                       anomalous_ml=round(float(report["anomalous_volume_ml"]), 4),
                       max_score=round(_max_score(report), 4), seconds=seconds,
                       message="; ".join(report.get("warnings", [])))
        elif rec.get("status") == "failed":
            row.update(status="failed", seconds=rec.get("seconds", ""), message=rec.get("message", ""))
        rows.append(row)
    return rows


def _overview_picture(outdir: Path, rows: Sequence[dict[str, Any]], top: int, width: int = 768):
    """The first row of each listed scan's overview.png (input | counterfactual | map | outline through its
    largest lesion), captioned and stacked: the scans with the largest anomalous volumes first."""
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image

    from .outputs import text_strip

    found = sorted((r for r in rows if r["status"] == "ok" and r["lesion_count"]),
                   key=lambda r: (-r["anomalous_ml"], r["scan"]))[:top]
    entries = []
    for r in found:
        pic = np.asarray(iio.imread(outdir / r["scan"] / "overview.png"))[..., :3]
        first = pic[: min(pic.shape[0], 260)]  # overview rows are 256 px high plus a 4 px gap
        h = max(1, round(first.shape[0] * width / first.shape[1]))
        first = np.asarray(Image.fromarray(first).resize((width, h), Image.BILINEAR))
        caption = (f"{r['scan']}: {r['lesion_count']} lesion(s), {r['anomalous_ml']:.2f} mL, "
                   f"max score {r['max_score']:.3f}")
        entries.append((caption, first))
    title = (f"Cohort: the {len(found)} scan(s) with the largest anomalous volumes" if found
             else "Cohort: no scan with a finding")
    parts = [text_strip(title, width, 18, bold=True),
             text_strip("input | counterfactual | anomaly map (0 to 2x threshold) | red: detected", width)]
    for caption, picture in entries:
        parts += [text_strip(caption, width), picture]
    return np.concatenate(parts, axis=0)


def cohort_report(outdir: str | Path, top: int = 12) -> dict[str, Any]:
    """Write OUTDIR/cohort.csv, cohort-summary.txt and cohort-overview.png; returns the summary and paths."""
    import imageio.v3 as iio
    import statistics

    outdir = Path(outdir)
    rows = cohort_rows(outdir)
    csv_path = outdir / "cohort.csv"
    tmp = outdir / f".cohort.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, csv_path)
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    missing = [r for r in rows if r["status"] == "missing"]
    with_findings = [r for r in ok if r["lesion_count"]]
    secs = [float(r["seconds"]) for r in ok if r["seconds"] != ""]
    lines = [f"{len(rows)} scans: {len(ok)} ok, {len(failed)} failed, {len(missing)} not processed yet"]
    if ok:
        lines.append(f"{len(with_findings)} of {len(ok)} scans with at least one lesion; anomalous volume "
                     f"median {statistics.median(r['anomalous_ml'] for r in ok):.2f} mL, "
                     f"largest {max(r['anomalous_ml'] for r in ok):.2f} mL")
    if secs:
        lines.append(f"seconds per scan: median {statistics.median(secs):.1f}, total {sum(secs):.0f} "
                     "(one process's time each)")
    largest = sorted(with_findings, key=lambda r: (-r["anomalous_ml"], r["scan"]))[:5]
    if largest:
        lines.append("largest findings: " + ", ".join(f"{r['scan']} ({r['anomalous_ml']:.2f} mL)" for r in largest))
    for r in failed[:10]:
        lines.append(f"failed: {r['scan']}: {r['message']}")
    if len(failed) > 10:
        lines.append(f"... and {len(failed) - 10} more failed (see cohort.csv)")
    text = "\n".join(lines) + "\n"
    summary_path = outdir / "cohort-summary.txt"
    summary_path.write_text(text, encoding="utf-8")
    picture = outdir / "cohort-overview.png"
    iio.imwrite(picture, _overview_picture(outdir, rows, top))
    return {"summary": text, "csv": str(csv_path), "summary_file": str(summary_path), "overview": str(picture),
            "ok": len(ok), "failed": len(failed), "missing": len(missing), "rows": rows}


# ---------------------------------------------------------------- throughput


def bench_cohort(model_ref: str | Path, settings, workdir: str | Path, *, scans: int = 4, slices: int = 40,
                 worker_counts: Sequence[int] = (1, 2), progress: ProgressFn = null_progress) -> list[dict[str, Any]]:
    """Scans per minute of `run_cohort` for each worker count on `scans` small volumes (the MNI152 demo case,
    resampled to 160 x 160 x `slices`, each with its own noise), and the seconds per scan outside the network."""
    import numpy as np
    import SimpleITK as sitk

    from .sampledata import demo_volume

    workdir = Path(workdir)
    vol = demo_volume(workdir, (160, 160, slices))
    arr = sitk.GetArrayFromImage(vol)
    paths = []
    for i in range(scans):
        rng = np.random.default_rng(i)
        noisy = sitk.GetImageFromArray((arr + rng.normal(0, 0.01 * float(arr.max()), arr.shape)).astype(np.float32))
        noisy.CopyInformation(vol)
        paths.append(workdir / f"scan{i:02d}.nrrd")
        sitk.WriteImage(noisy, str(paths[-1]))
    cohort = find_scans([str(p) for p in paths])
    figures = []
    for k in worker_counts:
        out = workdir / f"out-{k}"
        t0 = time.perf_counter()
        summary = run_cohort(cohort, out, model_ref, settings, CohortOptions(workers=k), progress=progress)
        wall = time.perf_counter() - t0
        recs = list(_status_records(out).values())
        overhead = [r["seconds"] - r.get("network_seconds", 0.0) for r in recs if r.get("status") == "ok"]
        figures.append({"workers": k, "scans": len(cohort), "ok": summary["ok"], "wall_seconds": round(wall, 2),
                        "scans_per_minute": round(60 * len(cohort) / wall, 2),
                        "seconds_per_scan": round(float(np.mean([r["seconds"] for r in recs])), 2),
                        "network_seconds_per_scan": round(float(np.mean([r.get("network_seconds", 0.0) for r in recs])), 2),
                        "overhead_per_scan": round(float(np.mean(overhead)), 2) if overhead else float("nan"),
                        "device": recs[0].get("device", "") if recs else ""})
    return figures
