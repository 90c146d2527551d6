//! `fedmesh ca`: root CAs and X.509-SVID issuance.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use fedmesh_trust::{CertificateAuthority, SpiffeId, TrustDomain};

#[derive(Subcommand)]
pub enum Command {
    /// Create a root CA for a trust domain: writes ca.pem, ca.key (0600), chain.pem, bundle.pem.
    Init {
        /// Trust domain, e.g. `east.acme` (lowercase letters, digits, `.`, `-`, `_`).
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Validity of the root, e.g. `8760h` or `365d`.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Overwrite an existing CA in `out`.
        #[arg(long)]
        force: bool,
    },
    /// Create an intermediate CA signed by an existing CA.
    Intermediate {
        /// Directory of the signing CA.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long)]
        force: bool,
    },
    /// Issue an X.509-SVID: writes svid.pem (leaf + intermediates), svid.key (0600), bundle.pem.
    Issue {
        /// Directory of the issuing CA (from `ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// The identity, e.g. `spiffe://east.acme/ns/shop/sa/api`.
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[arg(long)]
        out: PathBuf,
        /// Validity, e.g. `24h`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn refuse_overwrite(out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    if !force && out.join("ca.key").exists() {
        bail!(
            "{} already holds a CA key; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Init {
            trust_domain,
            out,
            ttl,
            force,
        } => {
            refuse_overwrite(&out, force)?;
            let ca = CertificateAuthority::new_root(trust_domain, ttl)?;
            ca.save(&out)?;
            println!(
                "created root CA for {} in {} (bundle fingerprint {})",
                ca.trust_domain(),
                out.display(),
                ca.bundle().fingerprint()
            );
        }
        Command::Intermediate {
            ca,
            out,
            ttl,
            force,
        } => {
            refuse_overwrite(&out, force)?;
            let parent = CertificateAuthority::load(&ca)
                .with_context(|| format!("loading CA from {}", ca.display()))?;
            let inter = parent.new_intermediate(ttl)?;
            inter.save(&out)?;
            println!(
                "created intermediate CA for {} in {}",
                inter.trust_domain(),
                out.display()
            );
        }
        Command::Issue {
            ca,
            spiffe_id,
            out,
            ttl,
        } => {
            let ca_dir = ca;
            let ca = CertificateAuthority::load(&ca_dir)
                .with_context(|| format!("loading CA from {}", ca_dir.display()))?;
            let svid = ca.issue(&spiffe_id, ttl)?;
            svid.save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            std::fs::write(out.join("bundle.pem"), ca.bundle().to_pem())?;
            println!(
                "issued {} into {} (valid {})",
                svid.id(),
                out.display(),
                humantime::format_duration(ttl)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
