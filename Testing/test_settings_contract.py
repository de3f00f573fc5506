"""Detection options are defined once (contract.DETECTION_SETTINGS): the settings, the command line, the
validation and the Slicer job's command line all follow that one table."""

from __future__ import annotations

import dataclasses

import pytest

from synomaly.cli import build_parser
from synomaly.contract import DETECTION_SETTING, DETECTION_SETTINGS
from synomaly.detect import DetectionSettings
from synomaly.errors import SettingsError


def parse(*options: str):
    return build_parser().parse_args(["detect", "scan.nii.gz", "-o", "out", *options])


def test_every_setting_is_a_field_with_the_same_default():
    fields = {f.name: f for f in dataclasses.fields(DetectionSettings)}
    defaults = DetectionSettings()
    for spec in DETECTION_SETTINGS:
        assert spec.name in fields, spec.name
        assert getattr(defaults, spec.name) == spec.default, spec.name
    # the fields without a flag are the engine's internal knobs (the map's form is the card's, from `synomaly tune`)
    assert set(fields) - set(DETECTION_SETTING) == {"fusion_threshold", "tolerance", "signed_map", "tissue_bins",
                                                       "mirror_mm"}


def test_the_command_line_gives_back_the_defaults_and_every_value():
    from synomaly.cli.common import detection_settings

    assert detection_settings(parse()) == DetectionSettings()
    given = detection_settings(parse("--t", "25", "--stages", "3", "--fpr", "0.001", "--grow-fpr", "0.01",
                                     "--blur", "7", "--min-size", "20", "--draws", "2", "--seed", "4",
                                     "--batch-size", "3", "--device", "cpu", "--precision", "fp32",
                                     "--allow-modality-mismatch"))
    assert given == DetectionSettings(t=25, max_stages=3, fpr=0.001, grow_fpr=0.01, blur_kernel=7, min_lesion_mm3=20.0,
                                      noise_draws=2, seed=4, batch_size=3, device="cpu", precision="fp32",
                                      allow_modality_mismatch=True)
    with pytest.raises(SystemExit):
        parse("--threshold", "0.3", "--fpr", "0.001")  # one or the other


@pytest.mark.parametrize("name, bad, good", [("t", 0, 999), ("max_stages", 51, 50), ("blur_kernel", 4, 5),
                                             ("fpr", 1.0, 0.5), ("grow_fpr", 1.0, 0.0), ("noise_draws", 65, 64),
                                             ("batch_size", 0, 1), ("threshold", -0.1, 0.0),
                                             ("min_lesion_mm3", -1.0, 0.0), ("precision", "fp8", "bf16")])
def test_validation_follows_the_table(name, bad, good):
    DetectionSettings(**{name: good}).validate()
    with pytest.raises(SettingsError) as err:
        DetectionSettings(**{name: bad}).validate()
    assert str(err.value) == DETECTION_SETTING[name].problem(bad)


def test_a_negative_tolerance_runs_every_stage_and_is_allowed():
    DetectionSettings(tolerance=-1.0).validate()  # what `synomaly bench --all-stages` sets
    with pytest.raises(SettingsError):
        DetectionSettings(tolerance=1.0).validate()


def test_the_slicer_job_command_line_is_read_back_by_the_engine():
    import slicer_support  # noqa: F401  (puts SynomalyDetect/ on sys.path, as Slicer does; alone, too)
    from synomaly.cli.common import detection_settings
    from SynomalyDetectLib import jobs

    options = jobs.DetectionOptions(model="m", fpr=1e-4, t=25, stages=3, blur=7, region="brain", min_size_mm3=20.0,
                                    seed=2, batch_size=4, device="cpu")
    args = build_parser().parse_args(["detect", "scan.nii.gz", "-o", "out", *options.cli_args()])
    assert args.model == "m"
    assert detection_settings(args) == DetectionSettings(fpr=1e-4, t=25, max_stages=3, blur_kernel=7, region="brain",
                                                         min_lesion_mm3=20.0, seed=2, batch_size=4, device="cpu")
    assert not options.problems()
    alone = build_parser().parse_args(["detect", "s.nii.gz", "-o", "o", *jobs.DetectionOptions(single_model=True).cli_args()])
    assert detection_settings(alone).single_model is True, "the panel's 'this model alone' reaches the engine"
    assert "--single-model" not in jobs.DetectionOptions().cli_args()
    assert jobs.DetectionOptions(t=1000).problems() == [DETECTION_SETTING["t"].problem(1000)]
    assert jobs.DetectionOptions(region="skull").problems() == [DETECTION_SETTING["region"].problem("skull")]


def test_evaluate_takes_its_detection_options_from_the_table():
    """`synomaly evaluate` runs detections too: its --t, --stages, --blur, --smooth, --region, --min-size, --seed,
    --batch-size, --device and --precision have the table's flag, type, default and choices (only the help differs)."""
    parser = build_parser()
    evaluate = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "evaluate")[1]
    actions = {a.option_strings[0]: a for a in evaluate._actions if a.option_strings}
    for name in ("t", "max_stages", "blur_kernel", "smooth_mm", "region", "min_lesion_mm3", "seed", "batch_size",
                 "device", "precision"):
        spec = DETECTION_SETTING[name]
        action = actions[spec.flag]
        assert action.type is spec.kind and action.default == spec.default, name
        assert tuple(action.choices or ()) == spec.choices, name
    args = parser.parse_args(["evaluate", "--data", "br35h", "-o", "out", "--smooth", "3", "--stages", "2"])
    assert (args.smooth, args.stages, args.min_size, args.precision, args.region) == (3.0, 2, 50.0, "auto", None)
    assert parser.parse_args(["evaluate", "--data", "implanted", "-o", "out", "--region", "brain"]).region == "brain"
