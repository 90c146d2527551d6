#!/usr/bin/env python3
"""Offline checks of what fedmesh applies to a cluster.

  validate-manifests.py --k8s 1.33.0 MANIFEST.yaml... [--crd-samples SAMPLE.yaml...]

Every object of every MANIFEST is validated (strict: unknown fields are
errors) against the Kubernetes JSON schemas of that version bundled in the
PyPI package `kubernetes-validate`. The CustomResourceDefinitions found in
the manifests then validate every object of the SAMPLE files of their kind
(structural schema -> JSON Schema; `x-kubernetes-*` keys dropped).

Before trusting a pass, it checks the checker: a Deployment with a wrong
field type and a ServiceImport with a bad `type` must both be refused, or
the run fails. Exit 0 when everything passed, 1 otherwise.
"""
import argparse
import copy
import sys

import jsonschema
import kubernetes_validate
import yaml


class K8sLoader(yaml.SafeLoader):
    """YAML as the API server reads it (sigs.k8s.io/yaml goes through
    JSON): an unquoted timestamp stays a string."""


K8sLoader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=K8sLoader) if d is not None]


def k8s_errors(obj, version):
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return f"{e.message} at {'.'.join(str(p) for p in e.path)}"
    except Exception as e:  # unknown kind/version is a failure too
        return f"{type(e).__name__}: {e}"


def strip_k8s(schema):
    if isinstance(schema, dict):
        return {k: strip_k8s(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [strip_k8s(v) for v in schema]
    return schema


def crd_schemas(manifests):
    out = {}
    for o in manifests:
        if o.get("kind") != "CustomResourceDefinition":
            continue
        spec = o["spec"]
        for v in spec["versions"]:
            key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
            out[key] = strip_k8s(v["schema"]["openAPIV3Schema"])
    return out


def crd_errors(obj, schemas):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        return f"no CRD for {key[0]} {key[1]}"
    v = jsonschema.Draft7Validator(schemas[key], format_checker=jsonschema.FormatChecker())
    errs = sorted(v.iter_errors(obj), key=lambda e: list(e.path))
    return "; ".join(f"{e.message} at {'.'.join(str(p) for p in e.path)}" for e in errs) or None


def name(o):
    m = o.get("metadata") or {}
    return f"{o.get('kind')}/{m.get('name')}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s", default="1.33.0")
    ap.add_argument("manifests", nargs="+")
    ap.add_argument("--crd-samples", nargs="*", default=[])
    a = ap.parse_args()

    failed = 0
    objects = []
    for path in a.manifests:
        for o in docs(path):
            objects.append(o)
            err = k8s_errors(o, a.k8s)
            if err:
                failed += 1
                print(f"FAIL {path}: {name(o)}: {err}")
    print(f"{len(objects)} objects from {len(a.manifests)} files checked against Kubernetes {a.k8s}")

    schemas = crd_schemas(objects)
    samples = 0
    for path in a.crd_samples:
        for o in docs(path):
            samples += 1
            err = crd_errors(o, schemas)
            if err:
                failed += 1
                print(f"FAIL {path}: {name(o)}: {err}")
    print(f"{samples} custom objects checked against the CRDs {sorted(k for _, k in schemas)}")

    # The checks must be able to fail.
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {}}}
    if k8s_errors(bad, a.k8s) is None:
        print("FAIL self-test: a Deployment with replicas: \"two\" passed")
        failed += 1
    if schemas:
        key = next(k for k in schemas if k[1] == "ServiceImport")
        bad_import = {"apiVersion": key[0], "kind": "ServiceImport", "metadata": {"name": "x"},
                      "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}
        if crd_errors(bad_import, schemas) is None:
            print("FAIL self-test: a ServiceImport of type LoadBalancer passed")
            failed += 1
    else:
        print("FAIL no CRDs in the manifests")
        failed += 1

    if failed:
        print(f"{failed} failed")
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
