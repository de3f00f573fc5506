"""Where the brain atlas's registration spends its time, and what a coarser optimiser stop would change.

For the bench volume (`synomaly bench`'s: the MNI152 brain with a lesion, 240 x 240 x 155) or the volumes given:
the seconds of each step of `atlas.atlas_brain_mask` (median of --rounds), the optimiser's iterations for the
similarity and the affine transform, and, for each --min-steps value, the iterations, seconds and the grown brain
mask's Dice against the shipped stop (atlas.MIN_STEP); the masks of other sampling seeds are given for scale.
Timings mean something only with nothing else running. Usage:
    python scripts/registration-profile.py [VOLUME ...] [--rounds 2] [--min-steps 1e-4 1e-2] [--seeds 2 3]
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SynomalyDetect"))

from synomaly import atlas  # noqa: E402
from synomaly.metrics import dice  # noqa: E402
from synomaly.prepare import foreground_mask, read_image  # noqa: E402
from synomaly.sampledata import demo_volume  # noqa: E402


def steps(image: sitk.Image, fg: np.ndarray, template: str) -> tuple[dict[str, float], list[int]]:
    """atlas_brain_mask's steps, timed one by one (the same calls in the same order; `template`: the one it chose)."""
    head, brain_t1, brain = atlas._load_atlas()
    t, times, its = time.perf_counter(), {}, []
    work = atlas._work_copy(atlas._head_box(image, fg))
    times["work copy"], t = time.perf_counter() - t, time.perf_counter()
    transform = atlas.register(work, brain_t1 if template == "brain" else head, iterations=its)
    times["register"], t = time.perf_counter() - t, time.perf_counter()
    mask = sitk.GetArrayFromImage(sitk.Resample(brain, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
    times["resample"], t = time.perf_counter() - t, time.perf_counter()
    atlas.grow(mask, image, atlas.MARGIN_MM)
    times["grow"] = time.perf_counter() - t
    return times, its


@contextlib.contextmanager
def registering(register):
    """atlas_brain_mask with `register` in place of the shipped registration (to pass a stop, a seed or an
    iteration counter through it); the shipped function is back afterwards, also when a call raises."""
    shipped = atlas.register
    atlas.register = register
    try:
        yield
    finally:
        atlas.register = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="*", help="volume files (default: the bench volume)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-steps", type=float, nargs="+", default=[atlas.MIN_STEP, 1e-2])
    parser.add_argument("--seeds", type=int, nargs="*", default=[2, 3], help="other sampling seeds, for scale")
    args = parser.parse_args()
    images = {Path(v).name: read_image(v) for v in args.volumes} or {
        "bench volume": demo_volume(tempfile.mkdtemp(), (240, 240, 155))}
    shipped_register = atlas.register
    for name, image in images.items():
        fg = foreground_mask(sitk.GetArrayFromImage(image).astype(np.float32))
        template = atlas.atlas_brain_mask(image, fg).template  # also the warm-up: reads the atlas
        rounds = [steps(image, fg, template) for _ in range(args.rounds)]
        whole = [atlas.atlas_brain_mask(image, fg) for _ in range(args.rounds)]
        ref = whole[0]
        print(f"{name}: template {ref.template}, atlas_brain_mask {statistics.median(w.seconds for w in whole):.2f} s; "
              + ", ".join(f"{k} {statistics.median(r[0][k] for r in rounds):.2f} s" for k in rounds[0][0])
              + f"; iterations similarity {rounds[0][1][0]}, affine {rounds[0][1][1]}")
        if ref.mask is None:
            print(f"  refused: {ref.problem}")
            continue
        for step in args.min_steps:
            its: list[int] = []
            with registering(lambda f, m, seed=1, _step=step, _its=its: shipped_register(f, m, seed, _step, _its)):
                found = atlas.atlas_brain_mask(image, fg)
            print(f"  stop at step {step:g}: iterations {its[0]} + {its[1]}, {found.seconds:.2f} s, "
                  f"Dice against the shipped stop {dice(found.mask, ref.mask):.4f}")
        for seed in args.seeds:
            with registering(lambda f, m, seed_=1, _s=seed: shipped_register(f, m, _s)):
                found = atlas.atlas_brain_mask(image, fg)
            print(f"  sampling seed {seed} (shipped stop): Dice against seed 1 {dice(found.mask, ref.mask):.4f}")


if __name__ == "__main__":
    main()
