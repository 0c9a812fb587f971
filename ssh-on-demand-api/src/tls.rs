//! TLS to platforms with self-signed certificates (Proxmox VE): trust one CA file, or pin the server
//! certificate's SHA-256 fingerprint as the Proxmox web interface shows it.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result, ensure};
use reqwest::ClientBuilder;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        WebPkiSupportedAlgorithms, aws_lc_rs, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use sha2::{Digest, Sha256};

/// Trusts only the CA certificates in `path` (PEM).
pub fn trust_ca_file(builder: ClientBuilder, path: &Path) -> Result<ClientBuilder> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{} holds no usable PEM certificate", path.display()))?;
    ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(builder.tls_certs_only(certs))
}

/// Accepts exactly the server certificate whose SHA-256 fingerprint is `fingerprint`
/// (`AB:CD:…` or plain hex), and no other, whoever signed it.
pub fn pin_fingerprint(builder: ClientBuilder, fingerprint: &str) -> Result<ClientBuilder> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let verifier = Pinned {
        sha256: parse_fingerprint(fingerprint)?,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(builder.tls_backend_preconfigured(config))
}

pub fn parse_fingerprint(text: &str) -> Result<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>();
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!("{text:?} is not a SHA-256 fingerprint (32 hex bytes, colons allowed)")
        })
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Sha256::digest(end_entity.as_ref());
        if seen.as_slice() == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {}, not the pinned {}",
                colon_hex(&seen),
                colon_hex(&self.sha256)
            )))
        }
    }

    // The pin vouches for the certificate; the handshake must still prove the server holds its key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_with_or_without_colons() {
        let colons = ["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("AB:CD").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        assert_eq!(colon_hex(&[0xab, 0x01]), "AB:01");
    }
}
