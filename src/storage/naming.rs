//! Directory names of shared volumes, from a template over the PVC's namespace and name and the
//! PV's name, so an operator browsing the share sees `team-a-postgres-data` instead of `pvc-<uid>`.
//!
//! A rendered name is always one safe path component: characters outside `[A-Za-z0-9._-]` become
//! `-`, it starts with a letter or digit, it is cut to 100 bytes, and it never ends in `.json`.
//! Anything that cannot be made so falls back to the CSI name's own key.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::id::Key;

pub const PVC_NAMESPACE: &str = "${pvc.namespace}";
pub const PVC_NAME: &str = "${pvc.name}";
pub const PV_NAME: &str = "${pv.name}";

/// The sidecar parameters (external-provisioner with --extra-create-metadata) the placeholders read.
const SOURCES: [(&str, &str); 3] = [
    (PVC_NAMESPACE, "csi.storage.k8s.io/pvc/namespace"),
    (PVC_NAME, "csi.storage.k8s.io/pvc/name"),
    (PV_NAME, "csi.storage.k8s.io/pv/name"),
];

const MAX_RENDERED: usize = 100;

/// Checks a template: non-empty, no `/`, and only the known placeholders.
pub fn check_template(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("the template is empty".into());
    }
    if t.contains('/') {
        return Err(format!(
            "'{t}' contains '/': a volume is one directory directly under the pool"
        ));
    }
    let mut rest = t.to_string();
    for (p, _) in SOURCES {
        rest = rest.replace(p, "");
    }
    if rest.contains("${") {
        return Err(format!(
            "'{t}' has an unknown placeholder (known: {PVC_NAMESPACE}, {PVC_NAME}, {PV_NAME})"
        ));
    }
    Ok(())
}

/// The template with its placeholders filled in; `None` when a parameter it needs is missing.
pub fn render(template: &str, params: &BTreeMap<String, String>) -> Option<String> {
    let mut out = template.to_string();
    for (placeholder, key) in SOURCES {
        if out.contains(placeholder) {
            out = out.replace(placeholder, params.get(key)?);
        }
    }
    Some(out)
}

/// Makes any string one safe component, or `None` when nothing usable is left.
pub fn sanitize(s: &str) -> Option<String> {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut cut: String = out.chars().take(MAX_RENDERED).collect();
    while cut.ends_with(".json") {
        cut.truncate(cut.len() - 5);
    }
    Key::parse(&cut).ok().map(|k| k.as_str().to_string())
}

/// The key a shared volume is stored under: the rendered template, or the CSI name's key.
pub fn key_for(name: &str, template: Option<&str>, params: &BTreeMap<String, String>) -> Key {
    template
        .and_then(|t| render(t, params))
        .and_then(|r| sanitize(&r))
        .and_then(|s| Key::parse(&s).ok())
        .unwrap_or_else(|| Key::from_name(name))
}

/// A second key for a name whose first choice is taken by another volume: the first plus a short
/// hash of the CSI name, so two PVCs can never share a directory.
pub fn disambiguate(key: &Key, name: &str) -> Key {
    let h = hex::encode(Sha256::digest(name.as_bytes()));
    Key::parse(&format!("{}-{}", key.as_str(), &h[..8])).unwrap_or_else(|_| Key::from_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(ns: &str, pvc: &str) -> BTreeMap<String, String> {
        [
            ("csi.storage.k8s.io/pvc/namespace".to_string(), ns.to_string()),
            ("csi.storage.k8s.io/pvc/name".to_string(), pvc.to_string()),
            ("csi.storage.k8s.io/pv/name".to_string(), "pvc-1234".to_string()),
        ]
        .into()
    }

    const T: &str = "${pvc.namespace}-${pvc.name}";

    #[test]
    fn template_names_the_directory() {
        assert_eq!(
            key_for("pvc-1234", Some(T), &params("team-a", "data")).as_str(),
            "team-a-data"
        );
    }

    #[test]
    fn hostile_names_stay_one_component() {
        for pvc in [
            "../x",
            "a/b",
            "/abs",
            "..",
            ".",
            "ü-ñ",
            &"n".repeat(300),
            "x.json",
            "a\0b",
        ] {
            let k = key_for("pvc-1234", Some(T), &params("ns", pvc));
            assert!(
                !k.as_str().contains('/') && k.as_str() != ".." && !k.as_str().starts_with('.'),
                "{pvc} -> {}",
                k.as_str()
            );
            assert!(k.as_str().len() <= 128);
            assert!(!k.as_str().ends_with(".json"));
        }
    }

    #[test]
    fn missing_metadata_falls_back_to_the_csi_name() {
        assert_eq!(key_for("pvc-1234", Some(T), &BTreeMap::new()).as_str(), "pvc-1234");
        assert_eq!(key_for("pvc-1234", None, &params("a", "b")).as_str(), "pvc-1234");
    }

    #[test]
    fn colliding_names_are_told_apart() {
        let a = key_for("pvc-1", Some(T), &params("a-b", "c"));
        let b = key_for("pvc-2", Some(T), &params("a", "b-c"));
        assert_eq!(a, b, "the template alone collides");
        assert_ne!(disambiguate(&b, "pvc-2"), a);
    }

    #[test]
    fn templates_are_checked() {
        assert!(check_template(T).is_ok());
        assert!(check_template("vol-${pv.name}").is_ok());
        assert!(check_template("${pvc.namespace}/${pvc.name}").is_err());
        assert!(check_template("${node}").is_err());
        assert!(check_template("").is_err());
    }
}
