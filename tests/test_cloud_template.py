"""The CloudFormation template: it passes cfn-lint and declares what the devices need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_DIR = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_DIR / "cloud" / "template.yaml"


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that keeps CloudFormation's short-form tags (!Ref, !Sub, ...) as plain values."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node)}
    return {suffix: loader.construct_mapping(node)}


_CfnLoader.add_multi_constructor("!", _tag)


def _resources() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)["Resources"]


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    """Run the cfn-lint command installed beside this Python (the dev extra)."""
    command = Path(sys.executable).parent / "cfn-lint"
    assert command.is_file(), "cfn-lint is missing: install the dev extra"
    return subprocess.run([str(command), str(path)], capture_output=True, text=True, timeout=120)


def test_template_passes_cfn_lint():
    linted = _lint(TEMPLATE)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path):
    broken = TEMPLATE.read_text(encoding="utf-8").replace("TransitionInDays: 90", "TransitionInDays: ninety")
    path = tmp_path / "broken.yaml"
    path.write_text(broken, encoding="utf-8")
    linted = _lint(path)
    assert linted.returncode != 0
    assert "ninety" in linted.stdout


def test_both_buckets_are_versioned_with_ia_glacier_and_expiry():
    resources = _resources()
    for name in ("DataBucket", "MetadataBucket"):
        properties = resources[name]["Properties"]
        assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
        [rule] = properties["LifecycleConfiguration"]["Rules"]
        assert rule["Status"] == "Enabled"
        assert rule["Transitions"] == [
            {"StorageClass": "STANDARD_IA", "TransitionInDays": 30},
            {"StorageClass": "GLACIER", "TransitionInDays": 90},
        ]
        assert rule["ExpirationInDays"] == 365
        assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_table_api_function_and_alarms_are_declared():
    resources = _resources()
    table = resources["DetectionsTable"]["Properties"]
    assert table["KeySchema"] == [
        {"AttributeName": "device_id", "KeyType": "HASH"}, {"AttributeName": "timestamp", "KeyType": "RANGE"},
    ]
    function = resources["IngestFunction"]["Properties"]
    assert function["Handler"] == "cloud.ingest.handler.lambda_handler"
    assert function["Environment"]["Variables"]["TABLE_NAME"] == {"Ref": "DetectionsTable"}
    assert (REPO_DIR / "cloud" / "ingest" / "handler.py").is_file()
    method = resources["DetectionsPost"]["Properties"]
    assert method["ApiKeyRequired"] is True
    assert method["Integration"]["Type"] == "AWS_PROXY"
    assert resources["IngestUsagePlanKey"]["Properties"]["KeyType"] == "API_KEY"
    alarms = [resource for resource in resources.values() if resource["Type"] == "AWS::CloudWatch::Alarm"]
    assert {alarm["Properties"]["MetricName"] for alarm in alarms} >= {"Errors", "5XXError"}
