"""DeltaConfig: docs generated from the fields, CLI/YAML round trip, validation."""

import dataclasses
from pathlib import Path

import pytest
from trl import TrlParser

from delta_trl import DeltaArguments, DeltaConfig


def test_every_delta_field_has_help_and_is_documented():
    doc = DeltaConfig.__doc__
    for f in dataclasses.fields(DeltaArguments):
        assert f.metadata["help"].strip(), f.name
        assert f"{f.name} (`" in doc, f.name
    assert {f.name for f in dataclasses.fields(DeltaArguments)} <= {f.name for f in dataclasses.fields(DeltaConfig)}


def test_parser_round_trip_from_cli_and_yaml(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("output_dir: out\ndelta_mode: kd_only\ndistill_layers: [-1, 3]\nalpha_max: 3.0\n")
    (args,) = TrlParser((DeltaConfig,)).parse_args_and_config(
        ["--config", str(yaml_file), "--distill_weight", "0.25", "--teacher_r", "4", "--use_cpu", "true"]
    )
    assert args.delta_mode == "kd_only"
    assert args.distill_layers == [-1, 3]
    assert args.alpha_max == 3.0
    assert args.distill_weight == 0.25
    assert args.teacher_r == 4
    assert args.alpha_sampling == "curriculum"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"delta_mode": "tangent"}, "delta_mode='tangent' is not one of"),
        ({"alpha_sampling": "cosine"}, "alpha_sampling='cosine' is not one of"),
        ({"alpha_min": 2.0, "alpha_max": 0.5}, "empty or inverted"),
        ({"alpha_min": 1.0, "alpha_max": 1.0, "alpha_sampling": "uniform"}, "empty or inverted"),
        ({"alpha_min": 1.2, "alpha_max": 2.0}, "must contain 1"),
        ({"distill_weight": -1.0}, "distill_weight must be"),
        ({"distill_layers": []}, "at least one index"),
        ({"teacher_adapter_name": ""}, "non-empty"),
        ({"teacher_r": 0}, "positive rank"),
    ],
)
def test_bad_fields_are_refused(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DeltaConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_fixed_sampling_ignores_the_range(tmp_path):
    args = DeltaConfig(output_dir=str(tmp_path), use_cpu=True, alpha_sampling="fixed", alpha_min=3, alpha_max=1)
    assert args.alpha_sampling == "fixed"


def test_curvature_paths_expand_the_home_folder(tmp_path):
    args = DeltaConfig(output_dir=str(tmp_path), use_cpu=True, curvature_weight=0.01,
                       curvature_path="~/curv", curvature_dataset="~/ref.jsonl")  # fmt: skip
    assert args.curvature_path == str(Path.home() / "curv")
    assert args.curvature_dataset == str(Path.home() / "ref.jsonl")
    hub = DeltaConfig(output_dir=str(tmp_path), use_cpu=True, curvature_weight=0.01, curvature_path="org/curvature")
    assert hub.curvature_path == "org/curvature"
