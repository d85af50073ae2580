//! Who a device is: the identity its transport or its credentials proved, the same type for
//! every southbound protocol (MQTT-SN, CoAP, HTTP), so authorisation (ACLs, rate limits) is
//! decided once, on the identity, whatever carried the data.
//!
//! Invariants: an [`Identity`] is made only by the layer that checked the proof (the DTLS
//! layer for a PSK identity or a client certificate, the HTTP auth for a token or a client
//! certificate) or, where the config allows it, from what a plain client claims (an MQTT-SN
//! ClientId, a CoAP `id` query). Cores compare and hash it; they never build a proven one.

use std::sync::Arc;

/// A device identity and how it was established.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The identity's name: a PSK identity, a certificate's subject CN (or SAN), an HTTP
    /// device id, or the claimed ClientId / CoAP id.
    pub name: Arc<str>,
    /// What proved it.
    pub source: IdentitySource,
    /// The MQTT-SN ClientIds this identity may CONNECT with (`[[psk]] client_ids`); `None`:
    /// any. An MQTT-SN CONNECT from a peer with a proven identity whose ClientId is not in the
    /// list is refused (CONNACK rc 0x03).
    pub client_ids: Option<Arc<[Arc<str>]>>,
}

impl Identity {
    /// An identity of `source` named `name`, with no ClientId restriction.
    pub fn new(name: impl Into<Arc<str>>, source: IdentitySource) -> Self {
        Identity {
            name: name.into(),
            source,
            client_ids: None,
        }
    }

    /// Whether an MQTT-SN client with this identity may use `client_id`.
    #[must_use]
    pub fn allows_client_id(&self, client_id: &str) -> bool {
        self.client_ids
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|id| &**id == client_id))
    }

    /// Whether the identity was proven cryptographically (DTLS, HTTP credentials), not
    /// merely claimed by a plain client.
    #[must_use]
    pub fn is_proven(&self) -> bool {
        !matches!(
            self.source,
            IdentitySource::ClientId | IdentitySource::CoapQuery | IdentitySource::Anonymous
        )
    }
}

/// How an [`Identity`] was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    /// Claimed by a plain MQTT-SN client in its CONNECT (only where the config allows it).
    ClientId,
    /// Claimed by a plain CoAP client in its `id` / `clientid` query.
    CoapQuery,
    /// A DTLS pre-shared key identity (`[[psk]] identity`), proven by the handshake.
    Psk,
    /// A DTLS client certificate verified against the configured CA (subject CN or SAN).
    Certificate,
    /// An HTTP bearer token from `[[http.device]]`.
    HttpToken,
    /// An HTTPS client certificate.
    HttpCertificate,
    /// An HTTP JWT bearer token (its verified claims).
    Jwt,
    /// No credentials, where anonymous access is allowed.
    Anonymous,
}

impl IdentitySource {
    /// The source's name in logs, metrics and `/clients`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::ClientId => "client_id",
            IdentitySource::CoapQuery => "coap_query",
            IdentitySource::Psk => "psk",
            IdentitySource::Certificate => "certificate",
            IdentitySource::HttpToken => "http_token",
            IdentitySource::HttpCertificate => "http_certificate",
            IdentitySource::Jwt => "jwt",
            IdentitySource::Anonymous => "anonymous",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_restrict_only_when_listed() {
        let mut id = Identity::new("dev1", IdentitySource::Psk);
        assert!(id.allows_client_id("anything"));
        id.client_ids = Some(Arc::from(vec![Arc::<str>::from("dev1")]));
        assert!(id.allows_client_id("dev1"));
        assert!(!id.allows_client_id("dev2"));
        assert!(id.is_proven());
        assert!(!Identity::new("x", IdentitySource::ClientId).is_proven());
    }
}
