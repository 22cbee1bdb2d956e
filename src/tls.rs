//! Telling TLS configuration mistakes from network trouble: a certificate that does not verify
//! will not verify on the next attempt either, so it is reported instead of retried.

use std::error::Error;

/// Whether `err`, or anything in its source chain, is a rustls certificate rejection.
pub fn certificate_rejected(err: &(dyn Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(inner) = current {
        // tokio-rustls reports handshake failures as an io::Error wrapping the rustls::Error,
        // and io::Error's `source` skips the wrapped error itself.
        let tls = inner.downcast_ref::<rustls::Error>().or_else(|| {
            inner
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|e| e.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            use rustls::AlertDescription as Alert;
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
                    // The server refused our client certificate, or its absence (mutual TLS).
                    | rustls::Error::AlertReceived(
                        Alert::BadCertificate
                            | Alert::CertificateRequired
                            | Alert::UnsupportedCertificate
                            | Alert::CertificateRevoked
                            | Alert::CertificateExpired
                            | Alert::CertificateUnknown
                            | Alert::UnknownCA
                    )
            );
        }
        current = inner.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_certificate_error_wrapped_in_io() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(certificate_rejected(&io));
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!certificate_rejected(&other));
        let decrypt =
            std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(!certificate_rejected(&decrypt));
    }

    #[test]
    fn a_server_refusing_our_client_certificate_is_a_rejection() {
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        assert!(certificate_rejected(&io));
        let closed = rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify);
        assert!(!certificate_rejected(&std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            closed
        )));
    }
}
