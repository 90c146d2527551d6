//! `fedmesh trust verify`: check a certificate chain as an X.509-SVID.
//! Exit 0 and the SPIFFE ID when valid, 1 with the reason when not, 2 on
//! usage errors (bad flags, unreadable files).
//!
//! `fedmesh trust endorse`: sign a cluster's next bundle with a root of its
//! current one, so federated peers accept a root rotation on their own
//! (`docs/operations.md`, "Rotating a cluster's root").

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;
use fedmesh_trust::{pem, verify_svid, TrustBundle, TrustBundles, TrustDomain, Usage};

#[derive(Subcommand)]
pub enum Command {
    /// Verify a chain (leaf first) against the bundle of the leaf's own trust domain.
    Verify {
        /// `TRUST_DOMAIN=ROOTS` where ROOTS is a PEM file or SPIFFE bundle JSON (`.json`). Repeatable.
        #[arg(long = "bundle", required = true, value_parser = parse_bundle_arg)]
        bundles: Vec<(TrustDomain, PathBuf)>,
        /// PEM chain: leaf first, then intermediates.
        #[arg(long)]
        cert: PathBuf,
        /// Verify as of this time (RFC 3339) instead of now.
        #[arg(long, value_parser = parse_time)]
        at: Option<SystemTime>,
        /// Check the chain for use as a server certificate instead of a client one.
        #[arg(long)]
        server: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Endorse a cluster's next bundle with a root its peers trust now
    /// (append to the controller's `endorsements` JSON list).
    Endorse {
        /// The next bundle (PEM roots), e.g. old+new during a rotation.
        #[arg(long)]
        bundle: PathBuf,
        /// The endorsing root CA's directory (`fedmesh ca init --out`).
        #[arg(long)]
        by: PathBuf,
        /// The endorsements file to write (JSON list; replaced).
        #[arg(long)]
        out: PathBuf,
    },
}

fn endorse(bundle: PathBuf, by: PathBuf, out: PathBuf) -> ExitCode {
    let ca = match fedmesh_trust::CertificateAuthority::load(&by) {
        Ok(c) => c,
        Err(e) => return usage(format!("CA {}: {e}", by.display())),
    };
    let text = match std::fs::read_to_string(&bundle) {
        Ok(t) => t,
        Err(e) => return usage(format!("reading bundle {}: {e}", bundle.display())),
    };
    let b = match TrustBundle::from_pem(ca.trust_domain().clone(), &text) {
        Ok(b) => b,
        Err(e) => return usage(format!("bundle {}: {e}", bundle.display())),
    };
    let e = match fedmesh_trust::rotation::endorse(&ca, &b) {
        Ok(e) => e,
        Err(e) => return usage(format!("endorsing: {e}")),
    };
    let json = match serde_json::to_string_pretty(&vec![e]) {
        Ok(j) => j,
        Err(e) => return usage(e.to_string()),
    };
    if let Err(e) = std::fs::write(&out, json) {
        return usage(format!("writing {}: {e}", out.display()));
    }
    println!(
        "endorsed bundle {} ({}) by root {}",
        bundle.display(),
        b.fingerprint(),
        by.display()
    );
    ExitCode::SUCCESS
}

fn parse_bundle_arg(s: &str) -> Result<(TrustDomain, PathBuf), String> {
    let (td, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} must be TRUST_DOMAIN=PATH"))?;
    let td = TrustDomain::new(td).map_err(|e| format!("trust domain {td:?}: {e}"))?;
    Ok((td, PathBuf::from(path)))
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
    Ok(SystemTime::from(t))
}

fn usage(msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

pub fn run(cmd: Command) -> ExitCode {
    let (bundles, cert, at, server, json) = match cmd {
        Command::Verify {
            bundles,
            cert,
            at,
            server,
            json,
        } => (bundles, cert, at, server, json),
        Command::Endorse { bundle, by, out } => return endorse(bundle, by, out),
    };
    let mut set = TrustBundles::new();
    for (td, path) in bundles {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => return usage(format!("reading bundle {}: {e}", path.display())),
        };
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            TrustBundle::from_spiffe_json(td, &text)
        } else {
            TrustBundle::from_pem(td, &text)
        };
        match parsed {
            Ok(b) => set.insert(b),
            Err(e) => return usage(format!("bundle {}: {e}", path.display())),
        }
    }
    let text = match std::fs::read_to_string(&cert) {
        Ok(t) => t,
        Err(e) => return usage(format!("reading {}: {e}", cert.display())),
    };
    let now = at.unwrap_or_else(SystemTime::now);
    let usage_kind = if server { Usage::Server } else { Usage::Client };
    let result = pem::decode_certs(&text)
        .map_err(|e| e.to_string())
        .and_then(|chain| verify_svid(&set, &chain, now, usage_kind).map_err(|e| e.to_string()));
    match (result, json) {
        (Ok(id), false) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        (Ok(id), true) => {
            let v = serde_json::json!({
                "valid": true,
                "spiffe_id": id.as_str(),
                "trust_domain": id.trust_domain_name(),
            });
            println!("{v}");
            ExitCode::SUCCESS
        }
        (Err(e), false) => {
            println!("invalid: {e}");
            ExitCode::FAILURE
        }
        (Err(e), true) => {
            println!("{}", serde_json::json!({"valid": false, "error": e}));
            ExitCode::FAILURE
        }
    }
}
