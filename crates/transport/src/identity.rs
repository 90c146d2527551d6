//! The identity and trust part of every daemon's config file.

use std::path::PathBuf;

use fedmesh_trust::{SharedBundles, Svid, TrustBundle, TrustBundles, TrustDomain};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    pub trust_domain: String,
    /// PEM roots, or SPIFFE bundle JSON when the file ends in `.json`.
    pub path: PathBuf,
}

/// Loads the SVID and every bundle, collecting all problems.
pub fn load_trust(
    identity: &IdentityFiles,
    bundles: &[BundleFile],
) -> Result<(Svid, SharedBundles), Vec<String>> {
    let mut errs = Vec::new();
    let svid = Svid::load(&identity.cert, &identity.key)
        .map_err(|e| errs.push(format!("identity: {e}")))
        .ok();
    let mut set = TrustBundles::new();
    for b in bundles {
        let td = match TrustDomain::new(&b.trust_domain) {
            Ok(td) => td,
            Err(e) => {
                errs.push(format!("bundles: trust_domain {:?}: {e}", b.trust_domain));
                continue;
            }
        };
        let text = match std::fs::read_to_string(&b.path) {
            Ok(t) => t,
            Err(e) => {
                errs.push(format!("bundles: {}: {e}", b.path.display()));
                continue;
            }
        };
        let parsed = if b.path.extension().is_some_and(|e| e == "json") {
            TrustBundle::from_spiffe_json(td, &text)
        } else {
            TrustBundle::from_pem(td, &text)
        };
        match parsed {
            Ok(bundle) => set.insert(bundle),
            Err(e) => errs.push(format!("bundles: {}: {e}", b.path.display())),
        }
    }
    if let Some(svid) = &svid {
        if set.get(&svid.id().trust_domain()).is_none() {
            errs.push(format!(
                "bundles: no bundle for this identity's own trust domain {}",
                svid.id().trust_domain()
            ));
        }
    }
    match svid {
        Some(svid) if errs.is_empty() => Ok((svid, SharedBundles::new(set))),
        _ => Err(errs),
    }
}

/// Reads and parses a YAML config file; the error says which file and why.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![e.to_string()])?;
    serde_yaml_ng::from_str(&text).map_err(|e| vec![e.to_string()])
}
