//! Who may call `vault api`: bearer tokens in two scopes, `read` (events, export, the page) and
//! `admin` (erasure, and everything `read` may do).
//!
//! A token is sent as `Authorization: Bearer TOKEN`; the HTML page also takes HTTP basic auth
//! with the token as the password, so that a browser asks for it. Tokens are kept as SHA-256
//! digests and a presented one is compared with every configured digest in constant time (no
//! early exit, no length leak); a token is never logged. A caller is named in logs and in the
//! erasure record by its scope and the first four bytes of its token's digest, never the token.
//! With no token configured every request is allowed: `vault api` then refuses to start unless
//! bound to loopback (see [`crate::api::ApiSettings::new`]).

use axum::http::{header, HeaderMap};

use crate::api::error::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub scope: Scope,
    /// `read-1a2b3c4d`, `admin-...`, or `anonymous` when no token is configured.
    pub name: String,
}

/// The configured tokens, as digests.
#[derive(Clone)]
pub struct Tokens {
    tokens: Vec<([u8; 32], Scope)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.tokens.len())
    }
}

/// How a request may present its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// `Authorization: Bearer TOKEN` only (the JSON API).
    Bearer,
    /// Bearer, or basic auth with the token as the password (the HTML page).
    BearerOrBasic,
}

impl Tokens {
    pub fn new(read: &[String], admin: &[String]) -> Tokens {
        let tokens = read
            .iter()
            .map(|t| (openssl::sha::sha256(t.as_bytes()), Scope::Read))
            .chain(
                admin
                    .iter()
                    .map(|t| (openssl::sha::sha256(t.as_bytes()), Scope::Admin)),
            )
            .collect();
        Tokens { tokens }
    }

    /// No token configured: every request is allowed.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller of a request that needs `need`: 401 without a valid token, 403 when its
    /// token's scope is not enough.
    pub fn check(
        &self,
        headers: &HeaderMap,
        need: Scope,
        how: Presented,
    ) -> Result<Caller, ApiError> {
        if self.is_open() {
            return Ok(Caller {
                scope: Scope::Admin,
                name: "anonymous".into(),
            });
        }
        let basic = how == Presented::BearerOrBasic;
        let unauthorized = |why: &str| ApiError::Unauthorized {
            message: why.to_owned(),
            basic,
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(if basic {
                "sign in with a token as the password (any user name), or send Authorization: Bearer TOKEN"
            } else {
                "send Authorization: Bearer TOKEN with a token of api.read_tokens or api.admin_tokens"
            }));
        };
        let value = value.to_str().unwrap_or("");
        let (kind, rest) = value.split_once(' ').unwrap_or((value, ""));
        let presented: Vec<u8> = if kind.eq_ignore_ascii_case("bearer") {
            rest.trim().as_bytes().to_vec()
        } else if basic && kind.eq_ignore_ascii_case("basic") {
            let decoded = openssl::base64::decode_block(rest.trim()).unwrap_or_default();
            match decoded.iter().position(|b| *b == b':') {
                Some(i) => decoded[i + 1..].to_vec(),
                None => Vec::new(),
            }
        } else {
            return Err(unauthorized(
                "the Authorization header is not of the form: Bearer TOKEN",
            ));
        };
        let digest = openssl::sha::sha256(&presented);
        // Every configured digest is compared, whatever matched first.
        let mut found: Option<Scope> = None;
        for (d, scope) in &self.tokens {
            if openssl::memcmp::eq(d, &digest) {
                found = found.max(Some(*scope));
            }
        }
        let Some(scope) = found else {
            return Err(unauthorized(
                "the token is not one of api.read_tokens or api.admin_tokens",
            ));
        };
        if scope < need {
            return Err(ApiError::Forbidden {
                message: format!(
                    "this needs a token of the {} scope (api.{}_tokens); yours has the {} scope",
                    need.name(),
                    need.name(),
                    scope.name()
                ),
            });
        }
        let fp: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Caller {
            scope,
            name: format!("{}-{fp}", scope.name()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn scopes_and_ways_of_presenting_a_token() {
        let (r, a) = ("r".repeat(20), "a".repeat(20));
        let t = Tokens::new(std::slice::from_ref(&r), std::slice::from_ref(&a));
        let bearer = |tok: &str| headers(&format!("Bearer {tok}"));
        let ok = t
            .check(&bearer(&r), Scope::Read, Presented::Bearer)
            .unwrap();
        assert_eq!(ok.scope, Scope::Read);
        assert!(ok.name.starts_with("read-") && !ok.name.contains(&r));
        assert!(matches!(
            t.check(&bearer(&r), Scope::Admin, Presented::Bearer),
            Err(ApiError::Forbidden { .. })
        ));
        assert_eq!(
            t.check(&bearer(&a), Scope::Read, Presented::Bearer)
                .unwrap()
                .scope,
            Scope::Admin,
            "admin may read"
        );
        assert!(matches!(
            t.check(
                &bearer("wrong-token-wrong-token"),
                Scope::Read,
                Presented::Bearer
            ),
            Err(ApiError::Unauthorized { basic: false, .. })
        ));
        assert!(matches!(
            t.check(&HeaderMap::new(), Scope::Read, Presented::BearerOrBasic),
            Err(ApiError::Unauthorized { basic: true, .. })
        ));
        let basic = headers(&format!(
            "Basic {}",
            openssl::base64::encode_block(format!("support:{r}").as_bytes())
        ));
        assert!(t
            .check(&basic, Scope::Read, Presented::BearerOrBasic)
            .is_ok());
        assert!(
            t.check(&basic, Scope::Read, Presented::Bearer).is_err(),
            "basic auth is for the page only"
        );
        let open = Tokens::new(&[], &[]);
        assert_eq!(
            open.check(&HeaderMap::new(), Scope::Admin, Presented::Bearer)
                .unwrap()
                .name,
            "anonymous"
        );
    }
}
