"""Every Kubernetes manifest under infra/ (recursively, every document of multi-document files, and the
manifests that ConfigMaps carry as templates) parses and has what kubectl and KubeRay need."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def _documents() -> list[tuple[str, dict[str, Any], bool]]:
    """(where, document, embedded) for every manifest; embedded: a template inside a ConfigMap."""
    docs = []
    for path in FILES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            where = f"{path.relative_to(INFRA.parent)}#{i}"
            docs.append((where, doc, False))
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    inner = yaml.safe_load(text) if key.endswith((".yaml", ".yml")) else None
                    if isinstance(inner, dict) and "apiVersion" in inner:
                        docs.append((f"{where}:{key}", inner, True))
    return docs


DOCS = _documents()


def _at(doc: dict[str, Any], dotted: str, where: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{where}: {doc['kind']} needs {dotted}"
        node = node[part]
    return node


def _pod_spec(pod: dict[str, Any], where: str) -> None:
    containers = pod.get("containers")
    assert containers, f"{where}: a pod template needs containers"
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: every container needs a name and an image"
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: {c['name']} mounts undeclared volume {mount['name']}"


def _ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    _pod_spec(_at(spec, "headGroupSpec.template.spec", where), f"{where} head")
    for group in spec.get("workerGroupSpecs", []):
        assert group.get("groupName"), f"{where}: every worker group needs a groupName"
        _pod_spec(_at(group, "template.spec", where), f"{where} {group['groupName']}")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", group.get("replicas", 0))
        assert lo <= group.get("replicas", lo) <= hi, f"{where}: {group['groupName']} replicas out of range"


def _shardwise_command(entrypoint: str, where: str) -> None:
    """A `shardwise ...` / `python -m jobs ...` entrypoint must parse with the real CLI."""
    from jobs.cli import _parser

    argv = shlex.split(entrypoint)
    if argv[:1] == ["shardwise"]:
        args = argv[1:]
    elif argv[:3] == ["python", "-m", "jobs"]:
        args = argv[3:]
    else:
        return
    try:
        _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: entrypoint {entrypoint!r} is not a valid shardwise command")


def test_there_are_manifests():
    kinds = {doc["kind"] for _, doc, _ in DOCS}
    assert {"RayJob", "CronJob"} <= kinds, kinds


@pytest.mark.parametrize(("where", "doc", "embedded"), DOCS, ids=[w for w, _, _ in DOCS])
def test_manifest_has_what_kubectl_and_kuberay_need(where, doc, embedded):
    assert isinstance(doc, dict), f"{where}: not a mapping"
    assert doc.get("apiVersion") and doc.get("kind"), f"{where}: needs apiVersion and kind"
    meta = doc.get("metadata") or {}
    # A template made with `kubectl create` may let the API server name it (one object per run).
    assert meta.get("name") or (embedded and meta.get("generateName")), f"{where}: needs metadata.name"
    kind = doc["kind"]
    if kind == "RayJob":
        assert doc["apiVersion"].startswith("ray.io/")
        _shardwise_command(_at(doc, "spec.entrypoint", where), where)
        _ray_cluster_spec(_at(doc, "spec.rayClusterSpec", where), where)
    elif kind == "RayCluster":
        assert doc["apiVersion"].startswith("ray.io/")
        _ray_cluster_spec(_at(doc, "spec", where), where)
    elif kind == "CronJob":
        from croniter import croniter

        assert doc["apiVersion"] == "batch/v1"
        assert croniter.is_valid(_at(doc, "spec.schedule", where)), f"{where}: bad spec.schedule"
        pod = _at(doc, "spec.jobTemplate.spec.template.spec", where)
        assert pod.get("restartPolicy") in ("Never", "OnFailure"), f"{where}: a Job's pods need restartPolicy"
        _pod_spec(pod, where)
    elif kind in ("Role", "ClusterRole"):
        assert _at(doc, "rules", where)
    elif kind in ("RoleBinding", "ClusterRoleBinding"):
        assert _at(doc, "subjects", where) and _at(doc, "roleRef.name", where)


def test_the_cron_job_creates_the_rayjob_template_it_mounts():
    by_name = {(doc["kind"], doc["metadata"].get("name")): doc for _, doc, _ in DOCS}
    for _, cron, _ in DOCS:
        if cron["kind"] != "CronJob":
            continue
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        maps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
        script = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in pod["containers"])
        assert "kubectl create -f /templates/rayjob.yaml" in script
        template = by_name["ConfigMap", maps["templates"]]
        assert "rayjob.yaml" in template["data"]
        account = pod["serviceAccountName"]
        assert ("ServiceAccount", account) in by_name
        binding = next(
            d
            for _, d, _ in DOCS
            if d["kind"] == "RoleBinding" and any(s["name"] == account for s in d["subjects"])
        )
        role = by_name["Role", binding["roleRef"]["name"]]
        assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
