//! `[cluster.tls]` files: read, parse and check the node's certificate chain, its private
//! key and the CA bundle, read by [`Config::read_tls`](super::Config::read_tls) when the
//! agent starts its peer links (like the secret, not at config load, so that `mdctrl`
//! commands that never talk to the peer need no access to the key).
//!
//! Every problem is a [`ConfigError::Tls`] naming the config file, the key
//! (`cluster.tls.cert`, `.key`, `.ca`), the file and what is wrong with it: unreadable, not
//! PEM, no certificate / no private key in it, a certificate that is expired or not yet
//! valid, a certificate not valid for this node's name, a key that does not match the
//! certificate, a CA bundle without a usable certificate.
//!
//! The validity period is read from the certificate's DER with a small bounded reader
//! ([`validity`]): webpki checks it at each handshake, but only here can the operator be
//! told at start-up, with the file name, that the certificate has expired.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;

use super::{ConfigError, Tls};

/// The checked contents of the `[cluster.tls]` files, ready for the peer links.
pub struct TlsMaterial {
    /// This node's certificate chain, end-entity first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// This node's private key (matches the end-entity certificate).
    pub key: PrivateKeyDer<'static>,
    /// The trust anchors from the CA bundle: the peer's certificate must chain to one.
    pub roots: Arc<RootCertStore>,
    /// The end-entity certificate's `notAfter`.
    pub not_after: SystemTime,
    /// The files they came from (for log lines).
    pub files: Tls,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_chain_len", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .field("roots", &self.roots.len())
            .field("not_after", &format_unix(unix_secs(self.not_after)))
            .field("files", &self.files)
            .finish()
    }
}

/// The crypto provider of the peer links (ring; TLS 1.3 suites only are enabled where the
/// configs are built, in `peer::tls`).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks `tls` for node `node` at time `now`; `config` is the config file (for
/// messages).
pub(super) fn read(
    config: &Path,
    tls: &Tls,
    node: &str,
    now: SystemTime,
) -> Result<TlsMaterial, ConfigError> {
    let err = |key: &'static str, path: &Path, problem: String| ConfigError::Tls {
        file: config.to_path_buf(),
        key,
        path: path.to_path_buf(),
        problem,
    };

    // The certificate chain.
    let cert_key = "cluster.tls.cert";
    let sections = read_pem(&tls.cert).map_err(|p| err(cert_key, &tls.cert, p))?;
    let cert_chain: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(k, _)| *k == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if cert_chain.is_empty() {
        return Err(err(
            cert_key,
            &tls.cert,
            format!(
                "contains no CERTIFICATE block (found: {})",
                kinds(&sections)
            ),
        ));
    }
    let ee = &cert_chain[0];
    let parsed = ParsedCertificate::try_from(ee).map_err(|e| {
        err(
            cert_key,
            &tls.cert,
            format!("the first certificate is not a valid X.509 certificate: {e}"),
        )
    })?;
    let (not_before, not_after) = validity(ee).ok_or_else(|| {
        err(
            cert_key,
            &tls.cert,
            "the first certificate's validity period cannot be read".to_string(),
        )
    })?;
    let now_s = unix_secs(now);
    if now_s > not_after {
        return Err(err(
            cert_key,
            &tls.cert,
            format!(
                "certificate expired: not valid after {} (now {})",
                format_unix(not_after),
                format_unix(now_s)
            ),
        ));
    }
    if now_s < not_before {
        return Err(err(
            cert_key,
            &tls.cert,
            format!(
                "certificate not valid yet: not valid before {} (now {}; check the clock)",
                format_unix(not_before),
                format_unix(now_s)
            ),
        ));
    }
    let name = ServerName::try_from(node.to_string()).map_err(|e| {
        err(
            cert_key,
            &tls.cert,
            format!("this node's name \"{node}\" cannot be checked against a certificate: {e}"),
        )
    })?;
    rustls::client::verify_server_name(&parsed, &name).map_err(|e| {
        let e = match e {
            rustls::Error::InvalidCertificate(c) => c.to_string(),
            other => other.to_string(),
        };
        err(
            cert_key,
            &tls.cert,
            format!(
                "certificate is not valid for this node's name \"{node}\" (the peer checks it; \
                 it must be a subjectAltName dNSName): {e}"
            ),
        )
    })?;

    // The private key.
    let key_key = "cluster.tls.key";
    let sections = read_pem(&tls.key).map_err(|p| err(key_key, &tls.key, p))?;
    let key = sections
        .iter()
        .find_map(|(k, der)| PrivateKeyDer::from_pem(*k, der.clone()))
        .ok_or_else(|| {
            err(
                key_key,
                &tls.key,
                format!(
                    "contains no private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY \
                     block; found: {})",
                    kinds(&sections)
                ),
            )
        })?;
    let provider = crypto_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            err(
                key_key,
                &tls.key,
                format!("unsupported or invalid private key: {e}"),
            )
        })?;
    let certified = rustls::sign::CertifiedKey::new(cert_chain.clone(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(err(
                key_key,
                &tls.key,
                format!(
                    "key does not match the certificate in {} (the certificate's public key \
                     belongs to another key)",
                    tls.cert.display()
                ),
            ))
        }
        Err(e) => {
            return Err(err(
                key_key,
                &tls.key,
                format!(
                    "cannot check the key against the certificate in {}: {e}",
                    tls.cert.display()
                ),
            ))
        }
    }

    // The CA bundle.
    let ca_key = "cluster.tls.ca";
    let sections = read_pem(&tls.ca).map_err(|p| err(ca_key, &tls.ca, p))?;
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for (i, (k, der)) in sections.iter().enumerate() {
        if *k != SectionKind::Certificate {
            continue;
        }
        n += 1;
        roots.add(CertificateDer::from(der.clone())).map_err(|e| {
            err(
                ca_key,
                &tls.ca,
                format!("block {} is not a usable CA certificate: {e}", i + 1),
            )
        })?;
    }
    if n == 0 {
        return Err(err(
            ca_key,
            &tls.ca,
            format!(
                "contains no CERTIFICATE block (found: {})",
                kinds(&sections)
            ),
        ));
    }

    Ok(TlsMaterial {
        cert_chain,
        key,
        roots: Arc::new(roots),
        not_after: UNIX_EPOCH + std::time::Duration::from_secs(not_after.max(0).unsigned_abs()),
        files: tls.clone(),
    })
}

/// All PEM blocks of `path`; `Err` is the problem text.
fn read_pem(path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if sections.is_empty() {
        return Err(format!(
            "not a PEM file: no \"-----BEGIN ...-----\" block found in {} bytes",
            bytes.len()
        ));
    }
    Ok(sections)
}

/// The PEM labels found, for messages.
fn kinds(sections: &[(SectionKind, Vec<u8>)]) -> String {
    let names: Vec<&str> = sections
        .iter()
        .map(|(k, _)| match k {
            SectionKind::Certificate => "CERTIFICATE",
            SectionKind::PublicKey => "PUBLIC KEY",
            SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
            SectionKind::PrivateKey => "PRIVATE KEY",
            SectionKind::EcPrivateKey => "EC PRIVATE KEY",
            SectionKind::Crl => "X509 CRL",
            SectionKind::Csr => "CERTIFICATE REQUEST",
            SectionKind::EchConfigList => "ECHCONFIG",
            _ => "other",
        })
        .collect();
    names.join(", ")
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn format_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One DER element: (tag, contents, rest). `None` when truncated or not DER-shaped; the
/// length is checked against the input before anything is sliced.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// `notBefore`, `notAfter` (Unix seconds) of an X.509 certificate:
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... } ... }`.
pub(crate) fn validity(cert_der: &[u8]) -> Option<(i64, i64)> {
    const SEQUENCE: u8 = 0x30;
    let (tag, cert, _) = tlv(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit [0] version
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (tag, validity, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (t1, nb, r) = tlv(validity)?;
    let (t2, na, _) = tlv(r)?;
    Some((der_time(t1, nb)?, der_time(t2, na)?))
}

/// UTCTime (tag 0x17, `YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (tag 0x18,
/// `YYYYMMDDHHMMSSZ`) to Unix seconds.
fn der_time(tag: u8, s: &[u8]) -> Option<i64> {
    let digits = |b: &[u8]| -> Option<i64> {
        b.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let f = |i: usize| digits(&rest[i..i + 2]);
    let (mo, d, h, mi, se) = (f(0)?, f(2)?, f(4)?, f(6)?, f(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn der_times_convert() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(0x17, b"500101000000Z"), Some(-631_152_000));
        assert_eq!(der_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(der_time(0x18, b"99991231235959Z"), Some(253_402_300_799));
        assert_eq!(der_time(0x17, b"700101000000+"), None);
        assert_eq!(der_time(0x17, b"701301000000Z"), None);
        assert_eq!(der_time(0x18, b"700101000000Z"), None);
        assert_eq!(format_unix(2_147_483_648), "2038-01-19 03:14:08 UTC");
        assert_eq!(format_unix(-1), "1969-12-31 23:59:59 UTC");
    }

    proptest! {
        #[test]
        fn civil_days_round_trip(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn validity_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = validity(&bytes);
        }
    }
}
