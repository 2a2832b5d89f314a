//! Page tokens (`next_page_token`): opaque to clients, tamper-evident, and valid on every
//! replica that shares the configuration.
//!
//! A token carries the resolved time range of the first page (so `since=7d` does not drift
//! while a client pages) and the position of the last event returned; it is signed with
//! HMAC-SHA-256 over those bytes, the user id and the request's filters as written (`since`,
//! `until`, `type`). A token altered, made for another user, or replayed with other filters
//! fails the check and is refused. The key comes from configuration (`api.page_token_secret`,
//! else the configured tokens), never from the process, so a token issued by one replica behind
//! a Service works on another.

use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use uuid::Uuid;

use crate::config::ApiConfig;
use crate::store::read::Position;

const VERSION: u8 = 1;
/// Bytes of the MAC kept in a token (128 bits).
const MAC_BYTES: usize = 16;
const BODY_BYTES: usize = 1 + 8 + 8 + 8 + 16;

/// The key page tokens are signed with.
#[derive(Clone)]
pub struct PageKey([u8; 32]);

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey(********)")
    }
}

impl PageKey {
    /// From `api.page_token_secret`, or, when it is empty, from every configured token (sorted,
    /// so the order they are listed in does not matter). With neither (an API open on
    /// loopback), a fixed key: tokens still detect accidental damage, not forgery, which on an
    /// API anyone may call grants nothing.
    pub fn from_config(c: &ApiConfig) -> PageKey {
        let mut material = b"vault page token key v1\0".to_vec();
        if c.page_token_secret.is_empty() {
            let mut tokens: Vec<(&str, &String)> = c
                .read_tokens
                .iter()
                .map(|t| ("read", t))
                .chain(c.admin_tokens.iter().map(|t| ("admin", t)))
                .collect();
            tokens.sort();
            for (scope, t) in tokens {
                material.extend_from_slice(scope.as_bytes());
                material.push(0);
                material.extend_from_slice(t.as_bytes());
                material.push(0);
            }
        } else {
            material.extend_from_slice(b"secret\0");
            material.extend_from_slice(c.page_token_secret.as_bytes());
        }
        PageKey(openssl::sha::sha256(&material))
    }

    fn mac(&self, body: &[u8], user_id: &str, filters: &str) -> [u8; MAC_BYTES] {
        let key = PKey::hmac(&self.0).expect("an HMAC key of 32 bytes");
        let mut signer =
            Signer::new(MessageDigest::sha256(), &key).expect("HMAC-SHA-256 is available");
        // Lengths first, so that no two (user, filters) pairs give the same input.
        for part in [body, user_id.as_bytes(), filters.as_bytes()] {
            signer
                .update(&(part.len() as u64).to_be_bytes())
                .and_then(|()| signer.update(part))
                .expect("HMAC update");
        }
        let full = signer.sign_to_vec().expect("HMAC sign");
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }
}

/// What a page token holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    /// The range of the first page, resolved (milliseconds).
    pub from_ms: i64,
    pub to_ms: i64,
    /// The last event returned.
    pub after: Position,
}

/// The request's filters as written, which a token is bound to: `since`, `until` and the
/// event types (sorted and deduplicated, so their order does not matter).
pub fn filters(since: Option<&str>, until: Option<&str>, types: &[String]) -> String {
    let mut t: Vec<&str> = types.iter().map(String::as_str).collect();
    t.sort_unstable();
    t.dedup();
    let field = |v: Option<&str>| v.map_or_else(|| "-".to_owned(), |v| format!("={v}"));
    // Each type with its length first: no type, whatever bytes it holds, reads as two.
    let types: String = t.iter().map(|t| format!("{}:{t}", t.len())).collect();
    format!("{}\0{}\0{types}", field(since), field(until))
}

/// Encodes `token` for `user_id` and `filters` (see [`filters`]).
pub fn encode(key: &PageKey, user_id: &str, filters: &str, token: &PageToken) -> String {
    let mut bytes = Vec::with_capacity(BODY_BYTES + MAC_BYTES);
    bytes.push(VERSION);
    bytes.extend_from_slice(&token.from_ms.to_be_bytes());
    bytes.extend_from_slice(&token.to_ms.to_be_bytes());
    bytes.extend_from_slice(&token.after.occurred_at_ms.to_be_bytes());
    bytes.extend_from_slice(token.after.event_id.as_bytes());
    let mac = key.mac(&bytes, user_id, filters);
    bytes.extend_from_slice(&mac);
    base64url(&bytes)
}

/// Decodes a token, or `None` when it is malformed, altered, or not for this user and filters.
pub fn decode(key: &PageKey, user_id: &str, filters: &str, text: &str) -> Option<PageToken> {
    let bytes = unbase64url(text)?;
    if bytes.len() != BODY_BYTES + MAC_BYTES || bytes[0] != VERSION {
        return None;
    }
    let (body, mac) = bytes.split_at(BODY_BYTES);
    let expected = key.mac(body, user_id, filters);
    if !openssl::memcmp::eq(&expected, mac) {
        return None;
    }
    let i64_at = |i: usize| i64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let token = PageToken {
        from_ms: i64_at(1),
        to_ms: i64_at(9),
        after: Position {
            occurred_at_ms: i64_at(17),
            event_id: Uuid::from_slice(&body[25..41]).expect("16 bytes"),
        },
    };
    Some(token)
}

fn base64url(bytes: &[u8]) -> String {
    openssl::base64::encode_block(bytes)
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect()
}

fn unbase64url(text: &str) -> Option<Vec<u8>> {
    if text.len() > 256
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    let mut std: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while std.len() % 4 != 0 {
        std.push('=');
    }
    openssl::base64::decode_block(&std).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_tell_every_set_of_types_apart_and_ignore_their_order() {
        let types = |t: &[&str]| {
            filters(
                None,
                None,
                &t.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>(),
            )
        };
        assert_ne!(types(&["a", "b"]), types(&["a\0b"]));
        assert_ne!(types(&["1:a"]), types(&["1", "a"]));
        assert_ne!(types(&[]), types(&[""]));
        assert_eq!(types(&["b", "a", "b"]), types(&["a", "b"]));
        assert_ne!(
            filters(Some("7d"), None, &[]),
            filters(None, Some("7d"), &[])
        );
    }

    fn token() -> PageToken {
        PageToken {
            from_ms: -5,
            to_ms: 1_764_000_000_000,
            after: Position {
                occurred_at_ms: 1_763_000_000_123,
                event_id: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
            },
        }
    }

    #[test]
    fn a_token_round_trips_and_any_change_is_refused() {
        let key = PageKey::from_config(&ApiConfig {
            read_tokens: vec!["r".repeat(20)],
            ..ApiConfig::default()
        });
        let f = filters(Some("7d"), None, &["view".into(), "click".into()]);
        let text = encode(&key, "u-1", &f, &token());
        assert!(
            text.len() < 100
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{text}"
        );
        assert_eq!(decode(&key, "u-1", &f, &text), Some(token()));
        // Type order does not matter; everything else does.
        let same = filters(Some("7d"), None, &["click".into(), "view".into()]);
        assert_eq!(decode(&key, "u-1", &same, &text), Some(token()));
        assert_eq!(decode(&key, "u-2", &f, &text), None, "another user");
        let other = filters(Some("8d"), None, &["view".into(), "click".into()]);
        assert_eq!(decode(&key, "u-1", &other, &text), None, "other filters");
        for i in 0..text.len() {
            let mut t = text.clone().into_bytes();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            assert_eq!(decode(&key, "u-1", &f, &t), None, "byte {i} changed: {t}");
        }
        assert_eq!(decode(&key, "u-1", &f, "not a token!"), None);
        assert_eq!(decode(&key, "u-1", &f, ""), None);
    }

    #[test]
    fn replicas_sharing_the_configuration_share_the_key() {
        let a = ApiConfig {
            read_tokens: vec!["r".repeat(20), "s".repeat(20)],
            admin_tokens: vec!["a".repeat(20)],
            ..ApiConfig::default()
        };
        let mut b = a.clone();
        b.read_tokens.reverse();
        let f = filters(None, None, &[]);
        let text = encode(&PageKey::from_config(&a), "u", &f, &token());
        assert_eq!(
            decode(&PageKey::from_config(&b), "u", &f, &text),
            Some(token()),
            "the order tokens are listed in does not matter"
        );
        let rotated = ApiConfig {
            read_tokens: vec!["t".repeat(20)],
            ..a.clone()
        };
        assert_eq!(
            decode(&PageKey::from_config(&rotated), "u", &f, &text),
            None
        );
        let secret = ApiConfig {
            page_token_secret: "k".repeat(32),
            ..a
        };
        let with_secret = encode(&PageKey::from_config(&secret), "u", &f, &token());
        let rotated_with_secret = ApiConfig {
            read_tokens: vec!["t".repeat(20)],
            ..secret.clone()
        };
        assert_eq!(
            decode(
                &PageKey::from_config(&rotated_with_secret),
                "u",
                &f,
                &with_secret
            ),
            Some(token()),
            "with page_token_secret, rotating the access tokens keeps page tokens valid"
        );
    }
}
