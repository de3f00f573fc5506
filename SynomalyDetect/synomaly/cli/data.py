"""`synomaly volumes` and `demo-data`: the data that ships in packages (`prepare` is in cli.preparation)."""

from __future__ import annotations

import json

from ..errors import InputError


def cmd_volumes(args) -> int:
    """List the healthy volumes that ship inside packages, their role, and whether they are installed here."""
    from ..sampledata import HEALTHY_VOLUMES, healthy_volume

    for name, v in HEALTHY_VOLUMES.items():
        try:
            where = str(healthy_volume(name)[0])
        except InputError:
            where = f"not installed ({v.install})"
        print(f"{name:14s} {v.role:6s} {v.what}: {where}")
    return 0


def cmd_demo_data(args) -> int:
    """Write the demo case (MNI152 with an implanted lesion) for the Slicer Sample Data module."""
    from ..sampledata import demo_case

    img, mask = demo_case(args.output)
    print(json.dumps({"image": str(img), "truth": str(mask)}))
    return 0


def add_parsers(sub) -> None:
    """Add volumes and demo-data to the sub-parsers."""
    vo = sub.add_parser("volumes", help="the healthy volumes inside packages: role (train, tune, eval) and where")
    vo.set_defaults(func=cmd_volumes)

    dd = sub.add_parser("demo-data", help="write the demo case (MNI152 with an implanted lesion)")
    dd.add_argument("-o", "--output", required=True)
    dd.set_defaults(func=cmd_demo_data)
