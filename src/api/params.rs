//! The query parameters of the read endpoints, parsed and checked in one place: each bad value
//! is refused with the parameter's name and what it accepts.
//!
//! - `since`, `until`: RFC 3339 (`2025-11-24T10:00:00Z`), or a duration before now (`7d`,
//!   `36h`, `90min`); both bounds included; default: all of the user's history.
//! - `type`: an event type, repeatable; default: every type.
//! - `limit`: events per page, 1 to `api.max_limit` (default `api.default_limit`).
//! - `page_token`: the previous page's `next_page_token`, with the same `since`, `until` and
//!   `type` as that page.
//! - An unknown parameter is refused (a misspelled filter must not be silently ignored).

use crate::api::error::ApiError;
use crate::api::token::{self, PageKey, PageToken};
use crate::event::{MAX_EVENT_TYPE_BYTES, MAX_USER_ID_BYTES};

/// Durations before now longer than this are not a time anyone means.
const MAX_AGO: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
/// Event types one request may filter on.
pub const MAX_TYPES: usize = 32;

/// The decoded `name=value` pairs of a query string, in order.
pub fn pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let name = decode(name).ok_or_else(|| {
            ApiError::bad(
                "query",
                "a parameter name is not valid percent-encoded UTF-8",
            )
        })?;
        let value = decode(value).ok_or_else(|| {
            ApiError::bad(
                "query",
                format!("the value of {name} is not valid percent-encoded UTF-8"),
            )
        })?;
        out.push((name, value));
    }
    Ok(out)
}

/// Percent-decoding of a query component (`+` is a space, as forms send it).
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                // Two hex digits, nothing else (`from_str_radix` alone would take a sign).
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a query or path component.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refuses a user id no event can have.
pub fn check_user_id(user_id: &str) -> Result<(), ApiError> {
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::bad(
            "user_id",
            format!(
                "a user id is 1 to {MAX_USER_ID_BYTES} bytes; this one has {}",
                user_id.len()
            ),
        ));
    }
    Ok(())
}

/// A time parameter: RFC 3339, or a duration before `now_ms`.
pub fn parse_time(parameter: &'static str, value: &str, now_ms: i64) -> Result<i64, ApiError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.timestamp_millis());
    }
    match humantime::parse_duration(value) {
        Ok(d) if d <= MAX_AGO => {
            Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
        }
        Ok(_) => Err(ApiError::bad(
            parameter,
            format!("{parameter}={value}: a duration before now of at most 100 years"),
        )),
        Err(_) => Err(ApiError::bad(
            parameter,
            format!(
                "{parameter}={value} is not a time: give RFC 3339 (2025-11-24T10:00:00Z) or a \
                 duration before now (7d, 36h, 90min)"
            ),
        )),
    }
}

/// The parameters of a page of events (the JSON list and the HTML page), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsQuery {
    pub since: Option<String>,
    pub until: Option<String>,
    pub types: Vec<String>,
    pub limit: usize,
    pub page_token: Option<String>,
    /// The range the page reads: from the page token when there is one, else resolved now.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Where the page resumes (from the page token).
    pub after: Option<crate::store::read::Position>,
}

impl EventsQuery {
    /// Reads and checks the parameters. With `drop_empty` (the HTML form, which sends its empty
    /// fields), an empty value counts as absent.
    pub fn parse(
        pairs: &[(String, String)],
        user_id: &str,
        key: &PageKey,
        now_ms: i64,
        default_limit: usize,
        max_limit: usize,
        drop_empty: bool,
    ) -> Result<EventsQuery, ApiError> {
        let (mut since, mut until, mut limit, mut page_token) = (None, None, None, None);
        let mut types: Vec<String> = Vec::new();
        for (name, value) in pairs {
            let known = ["since", "until", "limit", "page_token", "type"].contains(&name.as_str());
            if drop_empty && known && value.trim().is_empty() {
                continue;
            }
            let once = |slot: &Option<String>, p: &'static str| match slot {
                Some(_) => Err(ApiError::bad(
                    p,
                    format!("{p} is given twice: give it once"),
                )),
                None => Ok(Some(value.clone())),
            };
            match name.as_str() {
                "since" => since = once(&since, "since")?,
                "until" => until = once(&until, "until")?,
                "limit" => limit = once(&limit, "limit")?,
                "page_token" => page_token = once(&page_token, "page_token")?,
                "type" => {
                    if value.is_empty() || value.len() > MAX_EVENT_TYPE_BYTES {
                        return Err(ApiError::bad(
                            "type",
                            format!("an event type is 1 to {MAX_EVENT_TYPE_BYTES} bytes"),
                        ));
                    }
                    types.push(value.clone());
                    if types.len() > MAX_TYPES {
                        return Err(ApiError::bad(
                            "type",
                            format!("at most {MAX_TYPES} event types at once"),
                        ));
                    }
                }
                other => {
                    return Err(ApiError::bad(
                        "query",
                        format!(
                            "unknown parameter {other:?}: the parameters are since, until, type, \
                             limit and page_token"
                        ),
                    ))
                }
            }
        }
        let limit = match &limit {
            None => default_limit,
            Some(l) if !l.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(ApiError::bad(
                    "limit",
                    format!("limit={l}: a number of events from 1 to {max_limit}"),
                ))
            }
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=max_limit).contains(&n) => n,
                Ok(n) if n > max_limit => {
                    return Err(ApiError::bad(
                        "limit",
                        format!(
                            "limit={n} is above the maximum of {max_limit} (api.max_limit): ask \
                             for at most {max_limit} and follow next_page_token"
                        ),
                    ))
                }
                _ => {
                    return Err(ApiError::bad(
                        "limit",
                        format!("limit={l}: a number of events from 1 to {max_limit}"),
                    ))
                }
            },
        };
        let from = since
            .as_deref()
            .map(|v| parse_time("since", v, now_ms))
            .transpose()?;
        let to = until
            .as_deref()
            .map(|v| parse_time("until", v, now_ms))
            .transpose()?;
        let (from_ms, to_ms) = (from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX));
        if from_ms > to_ms {
            return Err(ApiError::bad(
                "since",
                format!(
                    "since ({}) is after until ({}): give a start before the end",
                    since.as_deref().unwrap_or(""),
                    until.as_deref().unwrap_or("")
                ),
            ));
        }
        let mut q = EventsQuery {
            since,
            until,
            types,
            limit,
            page_token,
            from_ms,
            to_ms,
            after: None,
        };
        if let Some(text) = &q.page_token {
            let t = token::decode(key, user_id, &q.filters(), text).ok_or_else(|| {
                ApiError::bad(
                    "page_token",
                    "page_token is not valid for this user and these filters: it was altered, or \
                     since, until or type differ from the request that returned it; repeat them \
                     exactly, or start again without page_token",
                )
            })?;
            q.from_ms = t.from_ms;
            q.to_ms = t.to_ms;
            q.after = Some(t.after);
        }
        Ok(q)
    }

    /// The filters a page token is bound to.
    pub fn filters(&self) -> String {
        token::filters(self.since.as_deref(), self.until.as_deref(), &self.types)
    }

    /// The token of the page after one that ended at `last`.
    pub fn next_token(
        &self,
        key: &PageKey,
        user_id: &str,
        last: crate::store::read::Position,
    ) -> String {
        token::encode(
            key,
            user_id,
            &self.filters(),
            &PageToken {
                from_ms: self.from_ms,
                to_ms: self.to_ms,
                after: last,
            },
        )
    }

    /// The query string of this request's filters and limit (no page token), for links.
    pub fn query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.since {
            parts.push(format!("since={}", encode(s)));
        }
        if let Some(u) = &self.until {
            parts.push(format!("until={}", encode(u)));
        }
        for t in &self.types {
            parts.push(format!("type={}", encode(t)));
        }
        parts.push(format!("limit={}", self.limit));
        parts.join("&")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiConfig;

    fn parse(q: &str) -> Result<EventsQuery, ApiError> {
        let key = PageKey::from_config(&ApiConfig::default());
        EventsQuery::parse(
            &pairs(Some(q))?,
            "u",
            &key,
            1_764_000_000_000,
            100,
            1000,
            false,
        )
    }

    fn parameter(e: ApiError) -> &'static str {
        match e {
            ApiError::BadParameter { parameter, .. } => parameter,
            other => panic!("not a bad parameter: {other:?}"),
        }
    }

    #[test]
    fn parameters_are_parsed_and_each_bad_one_is_named() {
        let q = parse("since=7d&until=2025-11-24T10:00:00Z&type=click&type=page%20view&limit=5")
            .unwrap();
        assert_eq!(q.from_ms, 1_764_000_000_000 - 7 * 86_400_000);
        assert_eq!(q.to_ms, 1_763_978_400_000);
        assert_eq!(q.types, ["click", "page view"]);
        assert_eq!(q.limit, 5);
        let all = parse("").unwrap();
        assert_eq!(
            (all.from_ms, all.to_ms, all.limit),
            (i64::MIN, i64::MAX, 100)
        );
        assert_eq!(parameter(parse("since=yesterday").unwrap_err()), "since");
        assert_eq!(parameter(parse("until=2025-13-01").unwrap_err()), "until");
        assert_eq!(parameter(parse("since=1h&until=2d").unwrap_err()), "since");
        assert_eq!(parameter(parse("limit=1001").unwrap_err()), "limit");
        assert!(parse("limit=1001")
            .unwrap_err()
            .message()
            .contains("maximum of 1000"));
        assert_eq!(parameter(parse("limit=0").unwrap_err()), "limit");
        assert_eq!(parameter(parse("limit=ten").unwrap_err()), "limit");
        assert_eq!(parameter(parse("limt=10").unwrap_err()), "query");
        assert_eq!(parameter(parse("since=1d&since=2d").unwrap_err()), "since");
        assert_eq!(
            parameter(parse("page_token=AAAA").unwrap_err()),
            "page_token"
        );
        assert_eq!(parameter(parse("type=").unwrap_err()), "type");
        assert_eq!(parameter(parse("since=%ZZ").unwrap_err()), "query");
        assert_eq!(
            parameter(parse("type=%+1").unwrap_err()),
            "query",
            "a sign is no digit"
        );
        assert_eq!(parameter(parse("limit=+5").unwrap_err()), "limit");
        // The page's form sends empty fields, and drops them; an unknown name still counts.
        let key = PageKey::from_config(&ApiConfig::default());
        let form =
            |q: &str| EventsQuery::parse(&pairs(Some(q)).unwrap(), "u", &key, 0, 100, 1000, true);
        assert!(form("since=&type=&limit=").is_ok());
        assert_eq!(parameter(form("limt=").unwrap_err()), "query");
        assert_eq!(
            parameter(check_user_id(&"u".repeat(257)).unwrap_err()),
            "user_id"
        );
        assert!(check_user_id(&"u".repeat(256)).is_ok());
    }

    #[test]
    fn a_page_token_carries_the_first_pages_range() {
        let key = PageKey::from_config(&ApiConfig::default());
        let first = parse("since=7d&type=click").unwrap();
        let at = crate::store::read::Position {
            occurred_at_ms: 1_763_999_000_000,
            event_id: uuid::Uuid::nil(),
        };
        let token = first.next_token(&key, "u", at);
        // An hour later, "7d" means something else: the token keeps the first range.
        let later = EventsQuery::parse(
            &pairs(Some(&format!("since=7d&type=click&page_token={token}"))).unwrap(),
            "u",
            &key,
            1_764_000_000_000 + 3_600_000,
            100,
            1000,
            false,
        )
        .unwrap();
        assert_eq!((later.from_ms, later.to_ms), (first.from_ms, first.to_ms));
        assert_eq!(later.after, Some(at));
        assert!(
            parse(&format!("since=7d&page_token={token}")).is_err(),
            "type dropped"
        );
        assert_eq!(encode("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(decode("a%20b%2F%C3%BC+c").as_deref(), Some("a b/ü c"));
    }
}
