//! Standard Webhooks signatures (https://www.standardwebhooks.com/): what
//! an alert's webhook carries so that its receiver can tell it came from
//! us, unchanged, and recently. No I/O.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, signed
//! with HMAC-SHA256 under the secret's bytes, sent as
//! `webhook-signature: v1,<base64 of the MAC>`. The secret is written
//! `whsec_<base64>`; its decoded bytes are the key.

use std::fmt;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shortest key accepted, in bytes: the specification's lower bound.
pub const MIN_KEY_BYTES: usize = 24;

/// A webhook signing key. Never shown: Debug and Display print `***`.
#[derive(Clone)]
pub struct WebhookKey(Vec<u8>);

impl fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl WebhookKey {
    /// `whsec_<base64>` (the prefix may be left out, as the specification's
    /// libraries allow); at least 24 bytes once decoded. The error never
    /// quotes the value.
    pub fn parse(secret: &str) -> Result<WebhookKey, String> {
        let b64 = secret.trim();
        let b64 = b64.strip_prefix("whsec_").unwrap_or(b64);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| {
                "is not a Standard Webhooks secret: expected whsec_ followed by base64 (make one with \
                 `echo whsec_$(openssl rand -base64 32)`)"
                    .to_string()
            })?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "decodes to {} bytes, fewer than the {MIN_KEY_BYTES} the Standard Webhooks specification \
                 asks for (make one with `echo whsec_$(openssl rand -base64 32)`)",
                bytes.len()
            ));
        }
        Ok(WebhookKey(bytes))
    }

    /// The `webhook-signature` header's value: `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let sig = mac.finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(sig)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specification_s_example() {
        // The example of the Standard Webhooks specification (and of its
        // libraries' tests).
        let key = WebhookKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_secret_is_base64_of_at_least_24_bytes_and_never_shown() {
        assert!(WebhookKey::parse("whsec_not base64!").is_err());
        let short = WebhookKey::parse("whsec_c2hvcnQ=").unwrap_err();
        assert!(short.contains("5 bytes"), "{short}");
        assert!(!short.contains("c2hvcnQ"), "{short}");
        let k = WebhookKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{k:?}"), "***");
    }
}
